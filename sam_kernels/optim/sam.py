"""The SAM optimizer: the step loop of every variant. It decides *what* happens; the maths is in
``sam_kernels.ops`` (fused kernels or the eager reference, whichever the dispatcher picks).

Extension points (how the variants plug in without forking this class):

- ``policy`` (:mod:`.policy`): whether a step is a SAM step (SS-SAM, AE-SAM, LookSAM).
- ``modifiers`` (:mod:`.descent`): change gradients before the base step (Stable SAM, LookSAM).
- ``perturbation_options(params, grads)``: override in a subclass to return extra keyword
  arguments of ``ops.perturb_`` (``masks``, ``keep_prob``, ``seed``, ``sq_norm``) — Sparse SAM's
  masks, ESAM's stochastic weight perturbation.
- ``ascent_params()``: override to restrict which parameters are perturbed (ESAM per-tensor SWP).
- ``ascent_direction(params, grads, scale)``: override to perturb along another direction than g(w)
  (Friendly-SAM, VaSSO: from EMAs of the gradients).
- ``ascent_steps``: a multi-step ascent (k normalized steps of rho/k each).

The loop calls ``self.amp`` (:mod:`.amp`), ``self.distributed`` (:mod:`.distributed`) and the observer
``self.telemetry`` (:mod:`.telemetry`) at fixed points; its mutable state is ``self.step_state``
(:mod:`.step_state`). Each phase is a module: the first ascent (:mod:`.ascent`), later ascents
(:mod:`.multi_step`), the descent (:mod:`.base_step`), ``step(closure)`` (:mod:`.closure`); around
them the shells' host work (:mod:`.shells`), the params' upkeep (:mod:`.upkeep`), what a user reads
(:mod:`.readouts`), backups (:mod:`.backups`), checkpoints (:mod:`.checkpoint`) and the ``torch.optim`` contract (:mod:`.contract`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .. import ops
from . import backups, multi_step
from .ascent import first_ascent
from .base_step import descend
from .checkpoint import Checkpointing
from .closure import run as run_closure
from .contract import bind_base_optimizer, check_closure, check_group, mark_stepped, run_step_hooks
from .centralize import CentralizeAscent
from .descent import Modifier, Renormalize
from .dispatch_summary import had_layout_fallback, records_step
from .distributed import GlobalSync, make_sync
from .finite import check_mode
from .policy import Policy, grad_norm_for
from .readouts import Readouts
from .shells import StepShells
from .step_state import StepState
from .telemetry import Telemetry
from .upkeep import ParamUpkeep


class SAM(StepShells, ParamUpkeep, Checkpointing, Readouts, torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer (drop-in for the popular
    ``SAM(params, base_optimizer, rho, adaptive, **kwargs)`` class).

    Args:
        params: parameters or parameter groups (groups may set ``rho``, ``adaptive``, ``eta``, and
            ``perturb=False``: SAM-ON's rule, the group is neither perturbed nor counted in the ascent
            norm, its params still take the base step; see :func:`~sam_kernels.optim.sam_on.sam_on_param_groups`).
            Each tensor once (a duplicate raises ``ValueError``). Parameters over the same memory
            (weight tied by hand) step as ``torch.optim`` steps them, partial overlaps raise
            ``ValueError`` (:mod:`.aliases`). Sparse gradients: :mod:`.sparse_grads`.
        base_optimizer: an optimizer class (built on this object's param groups with ``kwargs``)
            or an existing instance (its param groups become this object's).
        rho: perturbation radius (default 0.05; ASAM uses 0.5–2.0); finite, >= 0.
        adaptive: ASAM, e = rho·T²·g/‖T⊙g‖ with T = |w| + eta.
        eta: ASAM's offset (0.01; the popular class uses 0); finite, >= 0.
        backend: kernel backend for every op ("auto", "eager", "cpp", "cuda", "triton"; None = global choice).
        finite_check: raise ``FloatingPointError`` on NaN/Inf gradients, with the weights at w and the
            optimizer state unchanged. On CPU parameters it is raised in the call that finds them
            (``first_step``, ``second_step``, ``base_step``); on a GPU the step is skipped on the device
            and the error raised at the start of the next step, or by :meth:`stats` or
            :meth:`check_finite` (no host sync in the step; :mod:`sam_kernels.optim.finite`). With
            False there is no check: a non-finite first-pass norm still leaves the weights unperturbed,
            and non-finite gradients reach the base optimizer as they would in plain torch. Under AMP
            (``grad_scaler``) an overflow is expected and skips the step on the device instead: no error.
            How the second pass's gradients are checked: ``"pass"`` reads them once more before the
            descent (4 bytes per fp32 parameter, no extra memory); ``"fused"`` checks them in the
            fused SGD descent's own pass, which then writes the new momentum elsewhere so that a fault
            can be undone: 40 instead of 44 bytes per fp32 parameter with momentum. Elsewhere is
            g(w + e) itself when ``second_step(zero_grad=True)`` gives the gradients up and nothing
            else holds them (:mod:`sam_kernels.optim.handover`; gradients of 16K elements or more):
            no extra memory. Otherwise a spare buffer (one more parameter-sized buffer per momentum
            buffer, kept between steps, never saved; where memory is short, ``"pass"`` saves it).
            ``"fused"`` applies to ``torch.optim.SGD`` with its parameters on one device (CPU or GPU;
            on a GPU a fault is undone on the device and raised at the next step, as above) without
            AMP, descent modifiers, sparse gradients, ``torch.compile``, tied parameters or a process
            group; elsewhere it runs as ``"pass"``. True (the default) is ``"fused"`` where it applies
            and the step's gradients average 16K elements or more (below, ``"pass"`` costs less).
            Other values raise ``ValueError``.
        policy: when to take SAM steps (default: always).
        renormalize: add Stable SAM's renormalization (:class:`~sam_kernels.optim.descent.Renormalize`).
        modifiers: more descent modifiers, applied in order after ``renormalize``.
        use_gc: GCSAM (Hassan et al. 2025): gradient centralization of the ascent gradient, see
            :class:`~sam_kernels.optim.centralize.CentralizeAscent` (applied before ``modifiers``).
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 loop (see :mod:`sam_kernels.optim.amp`:
            where ``scaler.unscale_`` may go; attaching it creates its scale if it has none yet).
        distributed: ``"global"`` (both backwards synchronized: DDP's default, FSDP2) or ``"m-sam"``
            (first backward under DDP's ``no_sync()``); see :mod:`sam_kernels.optim.distributed`.
        telemetry: which values of each SAM step :meth:`stats` shows, kept on the device (taken inside
            the step's kernels where they read the data; see :mod:`sam_kernels.optim.telemetry`).
            ``"norms"`` (the default): ‖g(w)‖, ‖g(w+e)‖, ‖e‖ and L(w+e) − L(w), at no extra memory
            traffic for plain SAM; ``True``: these and the cosine of g(w) and g(w+e), which costs one
            more read of g(w); ``False``: none. The step and pass counters of :meth:`stats` are kept
            in every mode.
        telemetry_decay: the factor of their exponential moving averages (0.9).
        ascent_steps: k >= 1 normalized ascent steps per SAM step, each of rho/k from the point the last
            one reached, then the base step at w with g(w_k) (:mod:`.multi_step`). The manual loop calls
            ``first_step`` k times, a backward after each; ``step(closure)`` evaluates the closure once per
            gradient (k + 1 times with the first pass). Not with variants that choose their own
            perturbation (ESAM, SparseSAM, FriendlySAM, VaSSO: ``ValueError``).
        swap_storages: how ``first_step`` keeps w (:mod:`sam_kernels.optim.storage_swap`). The ascent
            writes w + e into the backup buffers and each param then trades storages with its backup:
            the values are bitwise those of the in-place ascent, the pass writes 4 bytes per fp32
            parameter less (36 instead of 40 per SAM step with SGD momentum), and each param's memory
            alternates between two buffers from step to step. Made only for params that no other tensor
            shares memory with (views, ``.detach()``, ``state_dict()`` tensors, flattened buffers keep
            the in-place ascent), not tied, with dense gradients, averaging 16K elements or more.
            None (the default): on CPU params only, since a CUDA graph captured over the forward or the
            step would replay with the old addresses; True: on any device (no CUDA graphs); False:
            never. Other values raise ``TypeError``.

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
    if no backward wrote the gradients since the last step or ``zero_grad`` (none yet, or zeroed
    in place), it evaluates the closure for the first pass too (see :meth:`step`). Calling
    ``first_step`` directly always takes a SAM step (a stateful policy such as AE-SAM's still folds
    that step's gradient norm into its statistics, without a sync).

    One optimizer step (``first_step`` + ``second_step``, or ``base_step``, or ``step``) runs the
    step pre and post hooks once and counts as a step for LR schedulers, on this object and on the
    base optimizer (whose ``step()`` the fused descent replaces).
    """

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale / found_inf (see .amp)

    def __init__(self, params: Iterable, base_optimizer: Union[type, torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, *, eta: float = 0.01, backend: Optional[str] = None,
                 finite_check: Union[bool, str] = True, policy: Optional[Policy] = None, renormalize: bool = False,
                 modifiers: Sequence[Modifier] = (), grad_scaler: Optional[torch.amp.GradScaler] = None,
                 distributed: Union[str, GlobalSync] = "global", telemetry: Union[bool, str] = "norms",
                 telemetry_decay: float = 0.9, use_gc: bool = False, ascent_steps: int = 1,
                 swap_storages: Optional[bool] = None, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, perturb=True, **kwargs)
        check_group(defaults, 0, f"{type(self).__name__} (keyword arguments)")
        own = [name for name in multi_step.OWN_PERTURBATION if getattr(type(self), name) is not getattr(SAM, name)]
        multi_step.check(type(self).__name__, ascent_steps, own)
        self.ascent_steps = ascent_steps
        self.step_state = StepState(Telemetry(telemetry, telemetry_decay, ascent_steps))
        super().__init__(params, defaults)
        self.base_optimizer = bind_base_optimizer(self.param_groups, base_optimizer, defaults, kwargs,
                                                  type(self).__name__)
        self.param_groups = self.base_optimizer.param_groups
        self.step_state.groups_checked = len(self.param_groups)
        self.find_aliases()
        self.distributed = make_sync(distributed, [p for g in self.param_groups for p in g["params"]])
        self.defaults.update(self.base_optimizer.defaults)
        self.backend = backend
        ops.dispatch.preload({p.device.type for p in self._params()}, backend)
        self.finite_check = check_mode(finite_check)
        if swap_storages not in (None, True, False):
            raise TypeError(f"{type(self).__name__}: swap_storages must be None, True or False, got {swap_storages!r}")
        self.swap_storages = swap_storages
        self.grad_scaler = grad_scaler
        self.policy = policy if policy is not None else Policy()
        self.modifiers: list[Modifier] = (([CentralizeAscent()] if use_gc else []) + ([Renormalize()] if renormalize else [])
                                          + list(modifiers))
        self.step_state.backward.clear(self._params())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``; it also marks the gradients as no first pass (see :meth:`step`)."""
        super().zero_grad(set_to_none)
        self.step_state.backward.clear(self._params())

    def ascent_params(self) -> Optional[list[torch.Tensor]]:
        """Params to perturb this step (None: every param with a gradient). Override for ESAM."""
        return None

    def perturbation_options(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> dict:
        """Extra ``ops.perturb_`` keyword arguments (masks, keep_prob, seed, sq_norm). Override for variants."""
        return {}

    def ascent_direction(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                         scale: Optional[torch.Tensor]) -> Optional[tuple[list[torch.Tensor], Optional[torch.Tensor]]]:
        """The direction d to perturb along instead of g(w) (e = rho·d/‖d‖, ASAM: T²·d/‖T⊙d‖), and the
        loss scale d carries (None: unscaled), or None for g(w) itself. ``grads`` carry ``scale`` (the
        loss scale, None when unscaled); under AMP ``self.step_state.found`` is this pass's overflow
        flag (a device tensor): state updated here must not take an overflowed gradient. Called once per
        SAM step, in the first ``first_step``, after the finite check. Override for variants."""
        return None

    # ------------------------------------------------------------------ the step

    def wants_sam(self) -> bool:
        """Whether this step is a SAM step (asks the policy once per step, after the first backward)."""
        now = self.step_state
        if now.decision is None:
            now.decision = bool(self.policy.decide(now.step_count, grad_norm_for(self.policy, self)))
        return now.decision

    def _begin(self) -> None:
        """Start of an optimizer step: groups added behind SAM's back get their keys; pre hooks."""
        now = self.step_state
        self._complete_new_groups()
        self._follow_casts()
        if had_layout_fallback(now.dispatch_log):  # e.g. the model went channels_last after its state was made
            backups.relayout((self, self.base_optimizer))
        if not now.begun:
            now.begun = True
            if not now.stepping:
                run_step_hooks(self, "pre")

    # The public step methods are eager shells that torch.compile skips; each runs a body (its own
    # code object: its own compiled graphs and recompile budget) through .shells.StepShells._run_body.

    @torch.compiler.disable(recursive=False)  # an eager shell: torch.compile compiles the body (see .shells)
    def first_step(self, zero_grad: bool = False, *, loss: Optional[torch.Tensor] = None) -> None:
        """w ← w + e(w) for every param with a gradient; the backups are kept in ``self.state``.
        With ``ascent_steps`` = k > 1, the 2nd to k-th calls of a step each take a later ascent.

        ``loss``: the first-pass loss L(w) (telemetry's sharpness; not read in the step).
        On any error the weights are w. Under ``torch.compile``: :mod:`sam_kernels.optim.compiled`."""
        if self.step_state.perturbed is None:  # decided on the host: each kind of ascent is one graph
            self._run_body("first_step", self._first_step, zero_grad, descent=False, loss=loss)
        else:
            self._run_body("first_step", self._later_ascent, zero_grad, descent=False, count=multi_step.count)

    @torch.compiler.disable(recursive=False)  # an eager shell: torch.compile compiles the body (see .shells)
    def second_step(self, zero_grad: bool = False, *, loss: Optional[torch.Tensor] = None) -> None:
        """w ← backup, then the base optimizer's step with the gradients taken at w + e.

        ``zero_grad=True`` gives the gradients up: the fused SGD descent may write the new momentum
        buffers over them (:mod:`sam_kernels.optim.handover`: only gradients nothing else holds, and
        no step post hook registered); those are None after the call, also when it raises.
        ``loss``: the second-pass loss L(w + e) (telemetry's sharpness; not read in the step).
        Any error restores w (bitwise) before it propagates, and the optimizer is ready for the next
        step; under ``torch.compile`` too (a body that fails to compile runs nothing, then w is restored).
        """
        self._run_body("second_step", self._second_step, zero_grad, descent=True, loss=loss)

    @torch.compiler.disable(recursive=False)  # an eager shell: torch.compile compiles the body (see .shells)
    def base_step(self, zero_grad: bool = False) -> None:
        """A step without the ascent: descent modifiers (e.g. LookSAM reuse), then the base step."""
        self._run_body("base_step", self._base_step, zero_grad, descent=False)

    @records_step(starts_step=True)
    @torch.no_grad()
    def _first_step(self, *, loss: Optional[torch.Tensor] = None) -> None:
        now = self.step_state
        now.finite.surface()
        self.amp.check_attached(self)
        self._begin()
        now.found = None
        self.telemetry.on_loss("before", loss)
        try:
            self._ascend()
        except BaseException:  # the weights are at w (the ascent undoes what it wrote): the step did not begin
            now.begun = False
            now.found = None
            self.telemetry.on_discard()
            raise
        now.decision = True
        now.ascents = 1
        self.amp.next_pass(self)

    def _ascend(self) -> None:
        """The first ascent (:func:`.ascent.first_ascent`); variants with their own ascent override it."""
        ascent = first_ascent(self)
        self.step_state.set_perturbed(ascent.params, ascent.kept)
        if self.ascent_steps > 1:
            multi_step.keep_scratch(self, ascent.params)
        self.telemetry.on_ascent(self, ascent)

    @records_step(starts_step=False)
    @torch.no_grad()
    def _later_ascent(self) -> None:
        """A later ascent of a multi-step one (:mod:`.multi_step`, counted by the shell); any error
        restores w and ends the step."""
        self.step_state.finite.surface()
        try:
            self._follow_casts()
            multi_step.ascend_again(self)
        except BaseException:
            self.restore()
            raise
        self.amp.next_pass(self)

    @records_step(starts_step=False)
    @torch.no_grad()
    def _second_step(self, *, loss: Optional[torch.Tensor] = None) -> None:
        now = self.step_state
        if now.perturbed is None:
            raise RuntimeError("SAM.second_step() called before first_step(): call first_step() after the first "
                               "backward, then backward again at the perturbed weights")
        self.telemetry.on_loss("after", loss)
        try:
            if self.ascent_steps > 1 and now.ascents < self.ascent_steps:
                raise RuntimeError(f"SAM.second_step() after {now.ascents} of ascent_steps={self.ascent_steps} "
                                   f"ascents: call first_step() (a backward before each) {self.ascent_steps} times; "
                                   "the weights were restored to w")
            self._follow_casts()
            self._descend(now.perturbed)
        except BaseException:
            self.restore()
            raise
        self._finish()

    @records_step(starts_step=True)
    @torch.no_grad()
    def _base_step(self) -> None:
        now = self.step_state
        now.finite.surface()
        if now.perturbed is not None:
            raise RuntimeError("SAM.base_step() called between first_step() and second_step()")
        self.amp.check_attached(self)
        self._begin()
        now.found = None
        try:
            self._descend(None)
        except BaseException:
            now.begun = False
            now.decision = None
            raise
        self._finish()

    def _descend(self, perturbed: Optional[list[torch.Tensor]]) -> None:
        descend(self, perturbed)  # :func:`.base_step.descend`

    def _finish(self) -> None:
        now = self.step_state
        self.telemetry.on_finish(self, sam_step=now.perturbed is not None)
        now.end()
        now.step_count += 1
        now.backward.clear(self._params())
        if not now.stepping:  # inside step() torch's wrapper does both
            mark_stepped(self)
            run_step_hooks(self, "post")

    @records_step(starts_step=False)
    @torch.no_grad()
    def restore(self) -> None:
        """Undo a first_step without a base step (bitwise), e.g. to skip a bad batch."""
        now = self.step_state
        if now.perturbed:
            backups.copy_back(now.perturbed, now.backups, self.backend, now.aliases)
        self.telemetry.on_discard()
        now.end()

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, *, loss: Optional[torch.Tensor] = None):
        """One full optimizer step.

        With a closure (it re-evaluates the loss and calls ``backward``; it runs with gradients
        enabled): the first pass is the gradients a backward wrote since the last optimizer step or
        this optimizer's ``zero_grad``; when no backward did (no gradient yet, or gradients zeroed by
        ``zero_grad(set_to_none=False)``, or left from the last step), the gradients are zeroed in
        place and the closure gives the first pass. Then a SAM step (first_step, closure,
        second_step) or a plain one, as the policy decides. Returns the closure's loss of the
        second pass on SAM steps; on plain steps the first pass's loss when this call evaluated it,
        else None.

        Where to zero: through this optimizer's ``zero_grad`` or inside the closure; gradients zeroed
        in place by other code after a backward still count as a first pass (:mod:`.closure`).

        ``loss``: the loss L(w) of a first pass run before this call (telemetry's sharpness, with the
        closure's L(w + e); not read in the step).

        Without a closure (how ``GradScaler.step(opt)`` ends the manual loop): the second step
        after ``first_step``, or the plain step after ``wants_sam()`` said no; otherwise ``ValueError``.
        """
        self.amp.check_attached(self)
        check_closure(closure, type(self).__name__)
        self.step_state.finite.surface()
        self.step_state.stepping = True
        try:
            return self._step(closure, loss)
        finally:
            self.step_state.stepping = False

    def _step(self, closure, first_loss=None):
        """The closure protocol (:mod:`.closure`); variants with their own protocol override it."""
        return run_closure(self, closure, first_loss)
