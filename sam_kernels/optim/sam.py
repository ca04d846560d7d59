"""The SAM optimizer: the step loop of every variant. It decides *what* happens; the maths is in
``sam_kernels.ops`` (fused kernels or the eager reference, whichever the dispatcher picks).

Extension points (how the variants plug in without forking this class):

- ``policy`` (:mod:`.policy`): whether a step is a SAM step (SS-SAM, AE-SAM, LookSAM).
- ``modifiers`` (:mod:`.descent`): change gradients before the base step (Stable SAM, LookSAM).
- ``perturbation_options(params, grads)``: override in a subclass to return extra keyword
  arguments of ``ops.perturb_`` (``masks``, ``keep_prob``, ``seed``, ``sq_norm``) — Sparse SAM's
  masks, ESAM's stochastic weight perturbation.
- ``ascent_params()``: override to restrict which parameters are perturbed (ESAM per-tensor SWP).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .. import ops
from .base_step import restore_and_step
from .descent import Modifier, Renormalize
from .distributed import GlobalSync, make_sync
from .policy import Policy


def pop_saved(state_dict: dict, key: str, owner: str):
    """``state_dict.pop(key)``, or a ValueError saying the dict was not saved by ``owner.state_dict()``."""
    try:
        return state_dict.pop(key)
    except KeyError:
        raise ValueError(f"{owner}.load_state_dict: no {key!r} entry; the state dict was not saved by "
                         f"sam_kernels.{owner}.state_dict()") from None


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer (drop-in for the popular
    ``SAM(params, base_optimizer, rho, adaptive, **kwargs)`` class).

    Args:
        params: parameters or parameter groups (groups may set ``rho``, ``adaptive``, ``eta``).
        base_optimizer: an optimizer class (built on this object's param groups with ``kwargs``)
            or an existing instance (its param groups become this object's).
        rho: perturbation radius (default 0.05; ASAM uses 0.5–2.0).
        adaptive: ASAM, e = rho·T²·g/‖T⊙g‖ with T = |w| + eta.
        eta: ASAM's offset (0.01; the popular class uses 0).
        backend: kernel backend for every op ("auto", "eager", "cpp", "cuda", "triton"; None = global choice).
        finite_check: raise ``FloatingPointError`` on NaN/Inf gradients. Each check is one host sync
            (one in ``first_step``, one in ``second_step``, one in ``base_step``); with False there is none, a non-finite
            first-pass norm still leaves the weights unperturbed, and non-finite gradients reach the
            base optimizer as they would in plain torch.
        policy: when to take SAM steps (default: always).
        renormalize: add Stable SAM's renormalization (:class:`~sam_kernels.optim.descent.Renormalize`).
        modifiers: more descent modifiers, applied in order after ``renormalize``.
        distributed: ``"global"`` (both backwards synchronized: DDP's default, FSDP2) or ``"m-sam"``
            (first backward under DDP's ``no_sync()``); see :mod:`sam_kernels.optim.distributed`.

    Protocol (manual loop)::

        loss_fn(model(x), y).backward()
        if opt.wants_sam():                   # policy decision, once per step
            opt.first_step(zero_grad=True)    # w <- w + e(w), backup kept
            loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)   # w <- backup; base step with g(w + e)
        else:
            opt.base_step(zero_grad=True)     # one pass: plain (or LookSAM reuse) step

    ``step(closure)`` does the same after the first backward, the closure re-evaluating the loss
    and calling ``backward``. Calling ``first_step`` directly always takes a SAM step (a stateful
    policy such as AE-SAM's still folds that step's gradient norm into its statistics, without a sync).
    """

    def __init__(self, params: Iterable, base_optimizer: Union[type, torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, *, eta: float = 0.01, backend: Optional[str] = None,
                 finite_check: bool = True, policy: Optional[Policy] = None, renormalize: bool = False,
                 modifiers: Sequence[Modifier] = (), distributed: Union[str, GlobalSync] = "global", **kwargs):
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **kwargs)
        super().__init__(params, defaults)
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if kwargs:
                raise TypeError(f"SAM: base optimizer keyword arguments {sorted(kwargs)} given with an optimizer "
                                f"instance; set them on the instance instead")
            mine = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if mine != theirs:
                raise ValueError("SAM: the base optimizer instance must hold exactly the parameters given to SAM")
            for group in base_optimizer.param_groups:
                for key in ("rho", "adaptive", "eta"):
                    group.setdefault(key, defaults[key])
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        else:
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                            f"got {base_optimizer!r}")
        self.param_groups = self.base_optimizer.param_groups
        self.distributed = make_sync(distributed, [p for g in self.param_groups for p in g["params"]])
        self.defaults.update(self.base_optimizer.defaults)
        self.backend = backend
        self.finite_check = finite_check
        self.policy = policy if policy is not None else Policy()
        self.modifiers: list[Modifier] = ([Renormalize()] if renormalize else []) + list(modifiers)
        self.step_count = 0
        self._decision: Optional[bool] = None
        self._perturbed: Optional[list[torch.Tensor]] = None
        self._backup_of: dict[int, torch.Tensor] = {}  # id(param) -> backup, for the perturbed params

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

    def _policy_norm(self) -> Optional[Callable[[], torch.Tensor]]:
        """‖g‖² of the current (first-pass) gradients as a device tensor, for policies that read it."""
        if not self.policy.needs_grad_norm:
            return None
        def sq_norm() -> torch.Tensor:
            grads = [p.grad for _, p in self._with_grads()]
            if not grads:
                raise RuntimeError(f"SAM: the {type(self.policy).__name__} reads the first-pass gradients: call "
                                   f"wants_sam() after the first backward")
            return self.distributed.policy_sq_norm(self, ops.grad_sq_norm(grads, backend=self.backend))
        return sq_norm

    def _restored(self, p: torch.Tensor) -> torch.Tensor:
        """The weight ``p`` will have after the restore: its backup while it is perturbed."""
        return self._backup_of.get(id(p), p)

    def _check_finite(self, sq: torch.Tensor, where: str) -> None:
        if self.finite_check and not bool(torch.isfinite(sq)):  # the documented host sync
            raise FloatingPointError(f"SAM.{where}: the gradients contain NaN or Inf (squared norm {float(sq)}); "
                                     f"the weights were left unperturbed. Skip this batch (zero_grad) or lower the "
                                     f"learning rate; finite_check=False disables this check")

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

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w ← w + e(w) for every param with a gradient; the backups are kept in ``self.state``."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.first_step() called twice: call second_step() (or restore()) first")
        entries = self._with_grads(self.ascent_params())
        if self._decision is None and entries:  # SAM forced without wants_sam(): stateful policies still learn
            self.policy.observe(self.step_count, self._policy_norm())
        sq = self._sq_norm(entries) if entries else None
        agreed = None if sq is None else self.distributed.ascent_sq_norm(self, sq)  # m-SAM: the rank mean
        if agreed is not None:
            self._check_finite(agreed, "first_step")
        params = [p for _, p in entries]
        grads = [p.grad for p in params]
        for m in self.modifiers:
            m.after_ascent(self, params, grads, agreed)
        extra = self.perturbation_options(params, grads) if entries else {}
        backups = self._backups(params)
        buckets: dict = {}
        last_group, bucket = None, []
        for i, (group, _) in enumerate(entries):
            if group is not last_group:  # one key per param group, not per param: this runs every step
                last_group = group
                bucket = buckets.setdefault((group["rho"], group["adaptive"], group["eta"]), [])
            bucket.append(i)
        done: list[int] = []
        try:
            for b, ((rho, adaptive, eta), idx) in enumerate(buckets.items()):
                whole = len(idx) == len(params)
                ps = params if whole else [params[i] for i in idx]
                gs = grads if whole else [grads[i] for i in idx]
                kw = {k: ([v[i] for i in idx] if k == "masks" and v is not None else v) for k, v in extra.items()}
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
                ops.restore_([params[i] for i in done], [backups[i] for i in done], backend=self.backend)
            raise
        self._set_perturbed(params, backups)
        self._decision = True
        if zero_grad:
            self.zero_grad()

    def _set_perturbed(self, params: Optional[list[torch.Tensor]],
                       backups: Optional[list[torch.Tensor]] = None) -> None:
        self._perturbed = params
        if params is None:
            self._backup_of = {}
        else:
            if backups is None:
                backups = [self.state[p]["backup"] for p in params]
            self._backup_of = dict(zip(map(id, params), backups))

    def _backups(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The backup buffer of each param, created on first use. Their layouts are not compared
        with the params' here (three attribute pairs per param, every step): perturb_ checks them
        and rejects a mismatch before writing, and first_step then renews the stale ones."""
        out = []
        for p in params:
            st = self.state[p]
            b = st.get("backup")
            if b is None:
                b = st["backup"] = torch.empty_like(p, memory_format=torch.contiguous_format)
            out.append(b)
        return out

    def _renew_stale_backups(self, params: list[torch.Tensor], backups: list[torch.Tensor], idx: list[int]) -> bool:
        """Replace (in ``backups`` and the state) the backups of ``params[idx]`` whose shape, dtype or
        device no longer match their param (it was resized, cast or moved); whether any did."""
        renewed = False
        for i in idx:
            p, b = params[i], backups[i]
            if b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                backups[i] = self.state[p]["backup"] = torch.empty_like(p, memory_format=torch.contiguous_format)
                renewed = True
        return renewed

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """w ← backup, then the base optimizer's step with the gradients taken at w + e."""
        if self._perturbed is None:
            raise RuntimeError("SAM.second_step() called before first_step(): call first_step() after the first "
                               "backward, then backward again at the perturbed weights")
        perturbed = self._perturbed
        entries = self._with_grads()
        params = [p for _, p in entries]
        grads = [p.grad for p in params]
        sq = None
        try:
            if self.finite_check and grads:  # before the modifiers, so no NaN reaches their state (LookSAM's g_v)
                sq = ops.grad_sq_norm(grads, backend=self.backend)
                self._check_finite(sq, "second_step")
            self.distributed.before_sam_descent(self)
            for m in self.modifiers:
                sq = m.before_descent(self, params, grads, True, sq)
        except BaseException:
            self.restore()
            raise
        restore_and_step(self, perturbed, self._backup_of, self.backend)
        self._finish(zero_grad)

    @torch.no_grad()
    def base_step(self, zero_grad: bool = False) -> None:
        """A step without the ascent: descent modifiers (e.g. LookSAM reuse), then the base step."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.base_step() called between first_step() and second_step()")
        entries = self._with_grads()
        params = [p for _, p in entries]
        grads = [p.grad for p in params]
        self.distributed.before_plain_descent(grads)  # m-SAM: the first backward left them unsynchronized
        if self.finite_check and grads:  # the same guarantee as SAM steps, one host sync
            self._check_finite(ops.grad_sq_norm(grads, backend=self.backend), "base_step")
        for m in self.modifiers:
            m.before_descent(self, params, grads, False, None)
        self.base_optimizer.step()
        self._finish(zero_grad)

    def _finish(self, zero_grad: bool) -> None:
        self._set_perturbed(None)
        self._decision = None
        self.step_count += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a first_step without a base step (bitwise), e.g. to skip a bad batch."""
        if self._perturbed:
            ops.restore_(self._perturbed, list(self._backup_of.values()), backend=self.backend)
        self._set_perturbed(None)
        self._decision = None

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One full step, after the first backward: SAM (first_step, closure, second_step) or plain.

        The closure re-evaluates the loss and calls ``backward``; it runs with gradients enabled.
        Returns the closure's loss on SAM steps, None on plain steps.
        """
        if closure is None:
            raise ValueError("SAM.step() needs a closure that re-evaluates the loss and calls backward "
                             "(or call first_step/second_step yourself)")
        if not self.wants_sam():
            self.base_step()
            return None
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Base optimizer state + SAM state (policy, modifiers, step count; backups only mid-step)."""
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        if self._perturbed is None:  # backups and first-pass copies are scratch between steps: small checkpoints
            scratch = {"backup", *(k for m in self.modifiers for k in m.transient_keys)}
            sd["state"] = {k: {n: v for n, v in st.items() if n not in scratch} for k, st in sd["state"].items()}
        sd["sam"] = {
            "step_count": self.step_count,
            "decision": self._decision,
            "perturbed": None if self._perturbed is None else [index[id(p)] for p in self._perturbed],
            "policy_kind": type(self.policy).__name__,
            "policy": self.policy.state_dict(),
            "modifier_kinds": [type(m).__name__ for m in self.modifiers],
            "modifiers": [m.state_dict() for m in self.modifiers],
        }
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a run saved by :meth:`state_dict` (mid-step saves included)."""
        state_dict = dict(state_dict)
        sam_state = pop_saved(state_dict, "sam", "SAM")
        base_state = pop_saved(state_dict, "base_optimizer", "SAM")
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
        self.base_optimizer.load_state_dict(base_state)
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups  # share the groups again (LR schedulers)
        params = [p for g in self.param_groups for p in g["params"]]
        self._set_perturbed(None if perturbed is None else [params[i] for i in perturbed])
        self.step_count = sam_state["step_count"]
        self._decision = sam_state["decision"]
        self.policy.load_state_dict(sam_state["policy"])
        for m, st in zip(self.modifiers, sam_state["modifiers"]):
            m.load_state_dict(st)
