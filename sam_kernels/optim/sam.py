"""The SAM optimizer: the step loop of every variant. It decides *what* happens; the maths is in
``sam_kernels.ops`` (fused kernels or the eager reference, whichever the dispatcher picks).

Extension points (how the variants plug in without forking this class):

- ``policy`` (:mod:`.policy`): whether a step is a SAM step (SS-SAM, AE-SAM, LookSAM).
- ``modifiers`` (:mod:`.descent`): change gradients before the base step (Stable SAM, LookSAM).
- ``perturbation_options(params, grads)``: override in a subclass to return extra keyword
  arguments of ``ops.perturb_`` (``masks``, ``keep_prob``, ``seed``, ``sq_norm``) — Sparse SAM's
  masks, ESAM's stochastic weight perturbation.
- ``ascent_params()``: override to restrict which parameters are perturbed (ESAM per-tensor SWP).

Mixed precision lives in :mod:`.amp`, the ``torch.optim`` contract (hooks, scheduler accounting,
hyperparameter checks) in :mod:`.contract`, the fused descent in :mod:`.base_step`.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from .. import ops
from . import amp
from .base_step import restore_and_step
from .contract import (LIGHTNING_FIX, SAM_KEYS, check_closure, check_group, check_no_duplicates, complete_groups,
                       mark_stepped, run_step_hooks)
from .descent import Modifier, Renormalize
from .distributed import GlobalSync, make_sync
from .policy import Policy
from .stats import SCRATCH_KEY, Telemetry
from .telemetry import DispatchSummary, had_layout_fallback, records_step, summary


def pop_saved(state_dict: dict, key: str, owner: str):
    """``state_dict.pop(key)``, or a ValueError saying the dict was not saved by ``owner.state_dict()``."""
    try:
        return state_dict.pop(key)
    except KeyError:
        raise ValueError(f"{owner}.load_state_dict: no {key!r} entry; the state dict was not saved by "
                         f"sam_kernels.{owner}.state_dict()") from None



@contextlib.contextmanager
def _hooks_silenced(opt: torch.optim.Optimizer, *names: str) -> Iterator[None]:
    """Run torch's own ``state_dict``/``load_state_dict`` without their hooks: SAM runs them itself
    around the WHOLE dict (base optimizer and SAM state included)."""
    saved = [getattr(opt, n) for n in names]
    try:
        for n in names:
            setattr(opt, n, OrderedDict())
        yield
    finally:
        for n, hooks in zip(names, saved):
            setattr(opt, n, hooks)


class _StepState:
    """Where SAM keeps what changes during a step. A plain object on purpose: torch.compile keeps
    attribute stores on it, but drops those on ``torch.optim.Optimizer`` instances (torch 2.14,
    Dynamo's optimizer handling), so SAM reaches these through the properties below."""

    def __init__(self):
        self.step_count = 0
        self.decision: Optional[bool] = None
        self.perturbed: Optional[list[torch.Tensor]] = None
        self.backup_of: dict[torch.Tensor, torch.Tensor] = {}  # perturbed param -> its backup (tensor keys: copyable)
        self.found: Optional[torch.Tensor] = None  # AMP: overflow flag of this step, on the device
        self.fresh = False     # the gradients were made by the closure of step() (AMP: the scaler's scale)
        self.stepping = False  # inside step(): torch's wrapper runs the step hooks
        self.begun = False     # this optimizer step has run its pre hooks
        self.groups_checked = 0
        self.dispatch_log: Optional[list] = None  # the dispatch records of the last step (telemetry)
        self.telemetry: Optional[Telemetry] = None  # sharpness values and cost counters (.stats)


def _now(name: str) -> property:
    return property(lambda self: getattr(self._now, name), lambda self, value: setattr(self._now, name, value),
                    doc=f"``_StepState.{name}`` of this optimizer")


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer (drop-in for the popular
    ``SAM(params, base_optimizer, rho, adaptive, **kwargs)`` class).

    Args:
        params: parameters or parameter groups (groups may set ``rho``, ``adaptive``, ``eta``).
            Each tensor once (a duplicate raises ``ValueError``).
        base_optimizer: an optimizer class (built on this object's param groups with ``kwargs``)
            or an existing instance (its param groups become this object's).
        rho: perturbation radius (default 0.05; ASAM uses 0.5–2.0); finite, >= 0.
        adaptive: ASAM, e = rho·T²·g/‖T⊙g‖ with T = |w| + eta.
        eta: ASAM's offset (0.01; the popular class uses 0); finite, >= 0.
        backend: kernel backend for every op ("auto", "eager", "cpp", "cuda", "triton"; None = global choice).
        finite_check: raise ``FloatingPointError`` on NaN/Inf gradients. Each check is one host sync
            (one in ``first_step``, one in ``second_step``, one in ``base_step``); with False there is none, a non-finite
            first-pass norm still leaves the weights unperturbed, and non-finite gradients reach the
            base optimizer as they would in plain torch. Under AMP (``grad_scaler``) an overflow is
            expected and skips the step on the device instead: no check, no sync.
        policy: when to take SAM steps (default: always).
        renormalize: add Stable SAM's renormalization (:class:`~sam_kernels.optim.descent.Renormalize`).
        modifiers: more descent modifiers, applied in order after ``renormalize``.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 loop (see :mod:`sam_kernels.optim.amp`).
        distributed: ``"global"`` (both backwards synchronized: DDP's default, FSDP2) or ``"m-sam"``
            (first backward under DDP's ``no_sync()``); see :mod:`sam_kernels.optim.distributed`.
        telemetry: keep ‖g(w)‖, ‖g(w+e)‖, their cosine, ‖e‖ and L(w+e) − L(w) of each SAM step on the
            device (taken inside the step's kernels where they read the data; the cosine costs one read
            of g(w): see :mod:`sam_kernels.optim.stats`); ``"norms"``: all but the cosine (no pass over
            the parameters). The step and pass counters of :meth:`stats` are kept either way.
        telemetry_decay: the factor of their exponential moving averages (0.9).

    Raises ``ValueError``/``TypeError`` for bad hyperparameters of any group (naming the group and
    the key), at construction, ``add_param_group`` and ``load_state_dict``.

    Protocol (manual loop)::

        loss_fn(model(x), y).backward()
        if opt.wants_sam():                   # policy decision, once per step
            opt.first_step(zero_grad=True)    # w <- w + e(w), backup kept
            loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)   # w <- backup; base step with g(w + e)
        else:
            opt.base_step(zero_grad=True)     # one pass: plain (or LookSAM reuse) step

    ``step(closure)`` does the same, the closure re-evaluating the loss and calling ``backward``;
    if no parameter has a gradient yet, it evaluates the closure for the first pass too. Calling
    ``first_step`` directly always takes a SAM step (a stateful policy such as AE-SAM's still folds
    that step's gradient norm into its statistics, without a sync).

    One optimizer step (``first_step`` + ``second_step``, or ``base_step``, or ``step``) runs the
    step pre and post hooks once and counts as a step for LR schedulers, on this object and on the
    base optimizer (whose ``step()`` the fused descent replaces).
    """

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale / found_inf (see .amp)

    step_count = _now("step_count")
    _decision = _now("decision")
    _perturbed = _now("perturbed")
    _backup_of = _now("backup_of")
    _found = _now("found")
    _fresh = _now("fresh")
    _stepping = _now("stepping")
    _begun = _now("begun")
    _groups_checked = _now("groups_checked")
    _dispatch_log = _now("dispatch_log")
    telemetry = _now("telemetry")

    def __init__(self, params: Iterable, base_optimizer: Union[type, torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, *, eta: float = 0.01, backend: Optional[str] = None,
                 finite_check: bool = True, policy: Optional[Policy] = None, renormalize: bool = False,
                 modifiers: Sequence[Modifier] = (), grad_scaler: Optional[torch.amp.GradScaler] = None,
                 distributed: Union[str, GlobalSync] = "global", telemetry: Union[bool, str] = False,
                 telemetry_decay: float = 0.9, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **kwargs)
        check_group(defaults, 0, f"{type(self).__name__} (keyword arguments)")
        self._now = _StepState()
        self.telemetry = Telemetry(telemetry, telemetry_decay)
        super().__init__(params, defaults)
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if kwargs:
                raise TypeError(f"SAM: base optimizer keyword arguments {sorted(kwargs)} given with an optimizer "
                                f"instance; set them on the instance instead")
            mine = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if mine != theirs:
                raise ValueError("SAM: the base optimizer instance must hold exactly the parameters given to SAM")
            complete_groups(base_optimizer.param_groups, defaults, 0, type(self).__name__)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        else:
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                            f"got {base_optimizer!r}")
        self.param_groups = self.base_optimizer.param_groups
        self._groups_checked = len(self.param_groups)
        self.distributed = make_sync(distributed, [p for g in self.param_groups for p in g["params"]])
        self.defaults.update(self.base_optimizer.defaults)
        self.backend = backend
        ops.dispatch.preload({p.device.type for g in self.param_groups for p in g["params"]}, backend)
        self.finite_check = finite_check
        self.grad_scaler = grad_scaler
        self.policy = policy if policy is not None else Policy()
        self.modifiers: list[Modifier] = ([Renormalize()] if renormalize else []) + list(modifiers)

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim``, plus SAM's keys (defaults filled, checked) and a duplicate check;
        the group is shared with the base optimizer."""
        owner = type(self).__name__
        params = param_group["params"]
        if not isinstance(params, set):  # torch rejects sets itself, with its message
            param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for key in SAM_KEYS:
            param_group.setdefault(key, self.defaults[key])
        check_group(param_group, len(self.param_groups), owner)
        check_no_duplicates([*self.param_groups, param_group], owner)
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during __init__: the base optimizer is built on these groups afterwards
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)  # appends to the list both optimizers share
            self._groups_checked = len(self.param_groups)

    def _begin(self) -> None:
        """Start of an optimizer step: groups added behind SAM's back get their keys; pre hooks."""
        self._groups_checked = complete_groups(self.param_groups, self.defaults, self._groups_checked,
                                               type(self).__name__)
        if had_layout_fallback(self):  # e.g. the model went channels_last after its state was made
            self._relayout_state()
        if not self._begun:
            self._begun = True
            if not self._stepping:
                run_step_hooks(self, "pre")

    # ------------------------------------------------------------------ helpers

    def _with_grads(self, params: Optional[Iterable[torch.Tensor]] = None) -> list[tuple[dict, torch.Tensor]]:
        """(group, param) for every param with a gradient, in group order."""
        wanted = None if params is None else {id(p) for p in params}
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and (wanted is None or id(p) in wanted):
                    if g.is_sparse:  # here, not in the ops: a rejected fused descent would leave weights perturbed
                        raise TypeError("SAM: sparse gradients are not supported (use dense gradients, e.g. "
                                        "nn.Embedding(sparse=False))")
                    out.append((group, p))
        return out

    def _sq_norm(self, entries: list[tuple[dict, torch.Tensor]], restored: bool = False) -> torch.Tensor:
        """One global squared norm over all entries; ASAM groups contribute ‖(|w|+eta)⊙g‖².

        ``restored``: T is taken at the weights the restore will give back (the backups of the
        perturbed params), i.e. at w rather than w + e (Stable SAM's descent norm in ASAM mode).
        """
        classes: dict = {}
        last_group, members = None, []
        for group, p in entries:
            if group is not last_group:  # one key per param group, not per param: this runs every step
                last_group = group
                members = classes.setdefault((group["eta"],) if group["adaptive"] else None, [])
            members.append(p)
        weights = self._restored if restored else (lambda p: p)
        parts = [ops.grad_sq_norm([p.grad for p in ps], params=[weights(p) for p in ps] if key else None,
                                  eta=key[0] if key else 0.0, backend=self.backend)
                 for key, ps in classes.items()]
        return parts[0] if len(parts) == 1 else torch.stack([x.to(parts[0].device) for x in parts]).sum()

    @property
    def loss_scale(self) -> Optional[torch.Tensor]:
        """The loss scale the gradients carry now (0-dim device tensor; None when unscaled or without AMP)."""
        return amp.current_scale(self, fresh=self._fresh)

    def _policy_norm(self) -> Optional[Callable[[], torch.Tensor]]:
        """‖g‖² of the current (first-pass) gradients, unscaled, as a device tensor, for policies that read it."""
        if not self.policy.needs_grad_norm:
            return None
        def sq_norm() -> torch.Tensor:
            grads = [p.grad for _, p in self._with_grads()]
            if not grads:  # a step without gradients is a no-op; NaN: the policy learns nothing from it
                return torch.tensor(float("nan"))
            sq = self.distributed.policy_sq_norm(self, ops.grad_sq_norm(grads, backend=self.backend))
            return amp.unscaled(sq, self.loss_scale)
        return sq_norm

    def _restored(self, p: torch.Tensor) -> torch.Tensor:
        """The weight ``p`` will have after the restore: its backup while it is perturbed."""
        return self._backup_of.get(p, p)

    def _check_finite(self, sq: torch.Tensor, where: str) -> None:
        if self.finite_check and not bool(torch.isfinite(sq)):  # the documented host sync
            raise FloatingPointError(f"SAM.{where}: the gradients contain NaN or Inf (squared norm {float(sq)}); "
                                     f"the weights were left unperturbed. Skip this batch (zero_grad) or lower the "
                                     f"learning rate; finite_check=False disables this check")

    def _screen(self, sq: Optional[torch.Tensor], where: str) -> None:
        """Non-finite gradients: under AMP fold them into this step's overflow flag (device); else check."""
        if sq is None:
            return
        if amp.active(self.grad_scaler):
            found = amp.overflow(sq, self)
            self._found = found if self._found is None else torch.maximum(self._found, found.to(self._found.device))
        else:
            self._check_finite(sq, where)

    def ascent_params(self) -> Optional[list[torch.Tensor]]:
        """Params to perturb this step (None: every param with a gradient). Override for ESAM."""
        return None

    def perturbation_options(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> dict:
        """Extra ``ops.perturb_`` keyword arguments (masks, keep_prob, seed, sq_norm). Override for variants."""
        return {}

    # ------------------------------------------------------------------ the step

    def wants_sam(self) -> bool:
        """Whether this step is a SAM step (asks the policy once per step, after the first backward)."""
        if self._decision is None:
            self._decision = bool(self.policy.decide(self.step_count, self._policy_norm()))
        return self._decision

    @records_step(starts_step=True)
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Optional[torch.Tensor] = None) -> None:
        """w ← w + e(w) for every param with a gradient; the backups are kept in ``self.state``.

        ``loss``: the first-pass loss L(w) (telemetry's sharpness; not read in the step)."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.first_step() called twice: call second_step() (or restore()) first")
        amp.check_attached(self)
        self._begin()
        self._found = None
        self.telemetry.see_loss("before", loss)
        try:
            self._ascend()
        except BaseException:  # the weights are at w (_ascend undoes what it wrote): the step did not begin
            self._begun = False
            self._found = None
            self.telemetry.discard()
            raise
        self._decision = True
        if zero_grad:
            self.zero_grad()

    def _ascend(self) -> None:
        chosen = self.ascent_params()
        entries = self._with_grads(chosen)
        if self._decision is None and entries:  # SAM forced without wants_sam(): stateful policies still learn
            self.policy.observe(self.step_count, self._policy_norm())
        scale = self.loss_scale
        sq = self._sq_norm(entries) if entries else None
        agreed = None if sq is None else self.distributed.ascent_sq_norm(self, sq)  # m-SAM: the rank mean
        self._screen(agreed, "first_step")
        params = [p for _, p in entries]
        grads = [p.grad for p in params]
        for m in self.modifiers:
            m.after_ascent(self, params, grads, None if agreed is None else amp.unscaled(agreed, scale))
        extra = self.perturbation_options(params, grads) if entries else {}
        if amp.active(self.grad_scaler):
            extra.update(grad_scale=scale, found_inf=self._found)
        backups = self._backups(params)
        buckets: dict = {}
        last_group, bucket = None, []
        for i, (group, _) in enumerate(entries):
            if group is not last_group:  # one key per param group, not per param: this runs every step
                last_group = group
                bucket = buckets.setdefault((group["rho"], group["adaptive"], group["eta"]), [])
            bucket.append(i)
        # plain SAM: ‖e‖ follows from the norm (scalar maths); else perturb_ sums it as applied
        plain = len(buckets) == 1 and not next(iter(buckets))[1] and not any(
            k in extra for k in ("masks", "keep_prob", "sq_norm"))
        applied = self.telemetry.perturbation_sq(params) if not plain else None
        if applied is not None:
            extra["perturbation_sq"] = applied
        copies = self.telemetry.grad_copies(self, params, grads) if chosen is None else None
        if copies is not None:  # g(w) for the cosine, written by perturb_ while it reads the grads
            extra["grad_copies"] = copies
        done: list[int] = []
        try:
            for b, ((rho, adaptive, eta), idx) in enumerate(buckets.items()):
                whole = len(idx) == len(params)
                ps = params if whole else [params[i] for i in idx]
                gs = grads if whole else [grads[i] for i in idx]
                kw = {k: ([v[i] for i in idx] if k in ("masks", "grad_copies") and v is not None else v)
                      for k, v in extra.items()}
                kw.setdefault("sq_norm", sq)
                if b and kw.get("seed") is not None:
                    # perturb_ keys its element RNG by (seed, position in this bucket): give each bucket
                    # its own seed so buckets of equal shapes do not repeat the first bucket's draws.
                    kw["seed"] = (int(kw["seed"]) + 0x9E3779B97F4A7C15 * b) % (1 << 62)
                for retry in (False, True):
                    try:
                        ops.perturb_(ps, gs, backups if whole else [backups[i] for i in idx], rho,
                                     adaptive=adaptive, eta=eta, backend=self.backend, **kw)
                        break
                    except (TypeError, ValueError):  # rejected before writing anything
                        if retry or not self._renew_stale_backups(params, backups, idx):
                            raise
                done.extend(idx)
        except BaseException:  # never leave weights perturbed: undo the buckets that ran
            if done:
                self._copy_back([params[i] for i in done], [backups[i] for i in done])
            raise
        self._set_perturbed(params, backups)
        if self.telemetry.enabled:
            everyone = entries if chosen is None else self._with_grads()
            self.telemetry.ascended(self, entries, everyone, sq, extra, next(iter(buckets))[0] if plain else None,
                                    scale, applied, copies)

    def _set_perturbed(self, params: Optional[list[torch.Tensor]],
                       backups: Optional[list[torch.Tensor]] = None) -> None:
        self._perturbed = params
        if params is None:
            self._backup_of = {}
        else:
            if backups is None:
                backups = [self.state[p]["backup"] for p in params]
            self._backup_of = dict(zip(params, backups))

    def _backups(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The backup buffer of each param, created on first use. Their layouts are not compared
        with the params' here (three attribute pairs per param, every step): perturb_ checks them
        and rejects a mismatch before writing, and first_step then renews the stale ones."""
        out = []
        for p in params:
            st = self.state[p]
            b = st.get("backup")
            if b is None:
                b = st["backup"] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(b)
        return out

    def _renew_stale_backups(self, params: list[torch.Tensor], backups: list[torch.Tensor], idx: list[int]) -> bool:
        """Replace (in ``backups`` and the state) the backups of ``params[idx]`` whose shape, dtype or
        device no longer match their param (it was resized, cast or moved); whether any did."""
        renewed = False
        for i in idx:
            p, b = params[i], backups[i]
            if b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                backups[i] = self.state[p]["backup"] = torch.empty_like(p, memory_format=torch.preserve_format)
                renewed = True
        return renewed

    def _relayout_state(self) -> None:
        """Give every state tensor of this optimizer and of the base the memory layout of its param,
        so that the next step runs fused (the kernels need one layout per tensor across the lists)."""
        for opt in (self, self.base_optimizer):
            for p, st in opt.state.items():
                for k, t in st.items():
                    if isinstance(t, torch.Tensor) and t.shape == p.shape and t.stride() != p.stride():
                        st[k] = torch.empty_like(p, dtype=t.dtype, device=t.device).copy_(t)

    def _copy_back(self, params: list[torch.Tensor], backups: list[torch.Tensor]) -> None:
        """params ← backups: the fused restore, or a per-tensor copy when a param changed dtype or
        device since its backup was taken (``model.double()`` mid-step), so an error never leaves w + e."""
        try:
            ops.restore_(params, backups, backend=self.backend)
        except (TypeError, ValueError):  # rejected before writing anything
            for p, b in zip(params, backups):
                p.copy_(b)

    @records_step(starts_step=False)
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Optional[torch.Tensor] = None) -> None:
        """w ← backup, then the base optimizer's step with the gradients taken at w + e.

        ``loss``: the second-pass loss L(w + e) (telemetry's sharpness; not read in the step).

        Any error restores w (bitwise) before it propagates, and the optimizer is ready for the next step.
        """
        if self._perturbed is None:
            raise RuntimeError("SAM.second_step() called before first_step(): call first_step() after the first "
                               "backward, then backward again at the perturbed weights")
        self.telemetry.see_loss("after", loss)
        try:
            self._descend(self._perturbed)
        except BaseException:
            self.restore()
            raise
        self._finish(zero_grad)

    def _descend(self, perturbed: list[torch.Tensor]) -> None:
        entries = self._with_grads()
        params = [p for _, p in entries]
        grads = [p.grad for p in params]
        if perturbed is None:
            self.distributed.before_plain_descent(grads)  # m-SAM: the first backward left them unsynchronized
        scale = self.loss_scale
        sq = None
        if grads and (self.finite_check or amp.active(self.grad_scaler)):
            # before the modifiers, so no NaN reaches their state (LookSAM's g_v)
            sq = ops.grad_sq_norm(grads, backend=self.backend)
            self._screen(sq, "second_step" if perturbed is not None else "base_step")
        if perturbed is not None:
            sq = self.telemetry.descending(self, params, grads, sq, scale)
            self.distributed.before_sam_descent(self)
        for m in self.modifiers:
            sq = m.before_descent(self, params, grads, perturbed is not None, sq)
        if perturbed is None and not amp.active(self.grad_scaler) and not torch.compiler.is_compiling():
            self.base_optimizer.step()  # a plain step is exactly the base optimizer's own step
            return
        # Under AMP (in-kernel unscale) and under torch.compile (torch.optim's step graph-breaks), plain
        # steps of SGD/AdamW also run the fused descent, each param its own backup.
        restore_and_step(self, perturbed or [], self._backup_of, self.backend, grad_scale=scale, found_inf=self._found,
                         telemetry=self.telemetry.fused_args() if perturbed is not None else None)
        if self._found is not None:
            amp.report(self, self._found)

    @records_step(starts_step=True)
    @torch.no_grad()
    def base_step(self, zero_grad: bool = False) -> None:
        """A step without the ascent: descent modifiers (e.g. LookSAM reuse), then the base step."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.base_step() called between first_step() and second_step()")
        amp.check_attached(self)
        self._begin()
        self._found = None
        try:
            self._descend(None)
        except BaseException:
            self._begun = False
            self._decision = None
            raise
        self._finish(zero_grad)

    def _finish(self, zero_grad: bool) -> None:
        self.telemetry.finish(self, sam_step=self._perturbed is not None)
        self._set_perturbed(None)
        self._decision = None
        self._found = None
        self._fresh = False
        self.step_count += 1
        self._begun = False
        if not self._stepping:  # inside step() torch's wrapper does both
            mark_stepped(self)
            run_step_hooks(self, "post")
        if zero_grad:
            self.zero_grad()

    @records_step(starts_step=False)
    @torch.no_grad()
    def restore(self) -> None:
        """Undo a first_step without a base step (bitwise), e.g. to skip a bad batch."""
        if self._perturbed:
            self._copy_back(self._perturbed, list(self._backup_of.values()))
        self.telemetry.discard()
        self._set_perturbed(None)
        self._decision = None
        self._found = None
        self._fresh = False
        self._begun = False

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, *, loss: Optional[torch.Tensor] = None):
        """One full optimizer step.

        With a closure (it re-evaluates the loss and calls ``backward``; it runs with gradients
        enabled): if no parameter has a gradient, the closure first gives the first pass; then a
        SAM step (first_step, closure, second_step) or a plain one, as the policy decides. Returns
        the closure's loss of the second pass on SAM steps; on plain steps the first pass's loss
        when this call evaluated it, else None.

        ``loss``: the loss L(w) of a first pass run before this call (telemetry's sharpness, with the
        closure's L(w + e); not read in the step).

        Without a closure (how ``GradScaler.step(opt)`` ends the manual loop): the second step
        after ``first_step``, or the plain step after ``wants_sam()`` said no; otherwise ``ValueError``.
        """
        amp.check_attached(self)
        check_closure(closure, type(self).__name__)
        self._stepping = True
        try:
            return self._step(closure, loss)
        finally:
            self._stepping = False

    def _step(self, closure, first_loss=None):
        if closure is None:
            if self._perturbed is not None:
                self.second_step()
            elif self._decision is False:
                self.base_step()
            else:
                raise ValueError("SAM.step() without a closure can only end a step begun by hand (after first_step(), "
                                 "or after wants_sam() returned False). Pass a closure that re-evaluates the loss and "
                                 f"calls backward, or use first_step()/second_step(). {LIGHTNING_FIX}. With a "
                                 f"GradScaler:\n{amp.LOOP}")
            return None
        loss = None
        if not any(p.grad is not None for g in self.param_groups for p in g["params"]):
            with torch.enable_grad():
                loss = first_loss = closure()  # the first pass: nothing was backpropagated before this step
        if not self.wants_sam():
            self.base_step()
            return loss
        self.first_step(zero_grad=True, loss=first_loss)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self._fresh = True
        self.second_step(loss=loss)
        return loss

    # ------------------------------------------------------------------ copies and state

    _variant_keys: tuple[str, ...] = ()
    """Top-level state-dict entries a variant adds beside "sam" (filled by ``_variant_state``)."""

    def _variant_state(self) -> dict:
        """A variant's own state, ``{key: state}`` for each of ``_variant_keys``. Override."""
        return {}

    def _load_variant_state(self, saved: dict) -> None:
        """Load what ``_variant_state`` saved (called after the SAM state is loaded). Override."""

    def __getstate__(self) -> dict:
        """Everything but hooks (as torch.optim) and the GradScaler (the user's object: attach it
        again to a copy with ``opt.grad_scaler = scaler``); mid-step copies keep their backups."""
        state = {k: v for k, v in self.__dict__.items() if not (k.startswith("_optimizer_") and k.endswith("_hooks"))}
        state["grad_scaler"] = None
        return state

    def dispatch_summary(self) -> DispatchSummary:
        """Which backend ran how many elements of each op in the last step (``print`` it for a table);
        ``fused_share < 1`` means some tensors ran on the slow eager path (see ``ops.dispatch``)."""
        return summary(self)

    def stats(self, ema: bool = False) -> dict[str, float]:
        """Telemetry and cost counters as Python floats, keys exactly ``sam_kernels.optim.stats.KEYS``:
        ``grad_norm``, ``sam_grad_norm``, ``grad_cosine``, ``perturbation_norm``, ``sharpness`` (of the
        last SAM step; their EMAs with ``ema=True``; NaN before the first SAM step, when
        ``telemetry=False`` or when not known), ``steps``, ``sam_steps``, ``sam_step_fraction``,
        ``forward_passes``, ``backward_passes`` (full-batch equivalents) and ``optimizer_bytes`` (at
        the ops' bytes floors). Units: the loss's and the gradients'; bytes. One host sync (none
        without device values). Definitions and costs: :mod:`sam_kernels.optim.stats`."""
        return self.telemetry.stats(ema)

    def state_dict(self) -> dict:
        """Base optimizer state + SAM state (policy, modifiers, step count; backups only mid-step).

        State-dict hooks registered on this optimizer see the whole dict.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        with _hooks_silenced(self, "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
            sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        if self._perturbed is None:  # backups and first-pass copies are scratch between steps: small checkpoints
            scratch = {"backup", SCRATCH_KEY, *(k for m in self.modifiers for k in m.transient_keys)}
            sd["state"] = {k: {n: v for n, v in st.items() if n not in scratch} for k, st in sd["state"].items()}
        sd["sam"] = {
            "step_count": self.step_count,
            "decision": self._decision,
            "perturbed": None if self._perturbed is None else [index[id(p)] for p in self._perturbed],
            "policy_kind": type(self.policy).__name__,
            "policy": self.policy.state_dict(),
            "modifier_kinds": [type(m).__name__ for m in self.modifiers],
            "modifiers": [m.state_dict() for m in self.modifiers],
            "telemetry": self.telemetry.state_dict(),
        }
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd.update(self._variant_state())
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a run saved by :meth:`state_dict` (mid-step saves included).

        Groups saved by an older version get the current defaults for keys they lack (as
        torch.optim does); every group's SAM hyperparameters are checked before anything is loaded.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        sam_state = pop_saved(state_dict, "sam", "SAM")
        base_state = pop_saved(state_dict, "base_optimizer", "SAM")
        variant = {k: pop_saved(state_dict, k, type(self).__name__) for k in self._variant_keys}
        # Every check runs before anything is loaded, so a rejected state dict leaves this optimizer as it was.
        kinds = [type(m).__name__ for m in self.modifiers]
        saved_kinds = sam_state.get("modifier_kinds", kinds)
        if len(sam_state["modifiers"]) != len(self.modifiers) or saved_kinds != kinds:
            raise ValueError(f"SAM.load_state_dict: saved with descent modifiers {saved_kinds}, this optimizer has "
                             f"{kinds}; build it with the same options")
        policy_kind = sam_state.get("policy_kind", type(self.policy).__name__)
        if policy_kind != type(self.policy).__name__:
            raise ValueError(f"SAM.load_state_dict: saved with a {policy_kind}, this optimizer uses a "
                             f"{type(self.policy).__name__}; build it with the same variant")
        perturbed = sam_state["perturbed"]
        if perturbed is not None and any("backup" not in state_dict["state"].get(i, {}) for i in perturbed):
            raise ValueError("SAM.load_state_dict: saved mid-step but the backups are missing")
        groups = [dict(g) for g in state_dict["param_groups"]]
        for i, g in enumerate(groups):
            for key, value in self.defaults.items():
                g.setdefault(key, value)
            check_group(g, i, f"{type(self).__name__}.load_state_dict")
        state_dict["param_groups"] = groups
        self.base_optimizer.load_state_dict(base_state)
        with _hooks_silenced(self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups  # share the groups again (LR schedulers)
        self._groups_checked = len(self.param_groups)
        params = [p for g in self.param_groups for p in g["params"]]
        self._set_perturbed(None if perturbed is None else [params[i] for i in perturbed])
        self.step_count = sam_state["step_count"]
        self._decision = sam_state["decision"]
        self._begun = perturbed is not None
        self.policy.load_state_dict(sam_state["policy"])
        for m, st in zip(self.modifiers, sam_state["modifiers"]):
            m.load_state_dict(st)
        if "telemetry" in sam_state:  # state dicts saved before telemetry existed: counters start at 0
            self.telemetry.load_state_dict(sam_state["telemetry"])
        self._load_variant_state(variant)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
