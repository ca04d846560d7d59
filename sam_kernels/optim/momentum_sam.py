"""Momentum-SAM (MSAM; Becker, Altrock and Risse, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", arXiv 2401.12033, 2024; official code github.com/MarlonBecker/MSAM,
``optimizer/msam.py`` (SGD) and ``optimizer/adamW_msam.py`` (AdamW)).

The perturbation of step t + 1 follows the base optimizer's momentum v after step t, known before
the next batch is seen, so the one backward of each step already runs at the perturbed point:

    w̃ = w − rho·v/(‖v‖ + 1e-12)          (held by the model between steps)
    g = ∇L(w̃)                            (the step's one forward/backward)
    w ← base step from w with g           (v updated)
    w̃ ← w − rho·v/(‖v‖ + 1e-12)          (the new v; one global norm over all parameters)

Here w lives in the SAM backups (restored bitwise) and the two halves are SAM's fused restore +
base step and ``perturb_`` with the momentum buffers as direction and −rho as radius.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from . import groups, sparse_grads
from .ascent import Ascent
from .compiled import call, call_eagerly, eval_frame_callback, hyper
from .shells import compiled_refusal
from .contract import check_closure, mark_stepped, run_step_hooks
from .dispatch_summary import records_step
from .sam import SAM

DIRECTION_KEYS = {torch.optim.SGD: "momentum_buffer", torch.optim.AdamW: "exp_avg", torch.optim.Adam: "exp_avg"}
_PROTOCOL = ("MomentumSAM takes one forward/backward per step: loss.backward(); opt.step() (or opt.step(closure)); "
             "first_step/second_step/base_step/wants_sam do not apply")


class MomentumSAM(SAM):
    """Momentum-SAM: SAM's perturbation along the negative momentum direction, one pass per step.

    Step protocol (and why): ``loss.backward(); opt.step(); opt.zero_grad()``, or
    ``opt.step(closure)``, or ``scaler.step(opt)`` under AMP. The perturbation needs only the
    momentum, which is known at the end of the previous step, so it is applied then: between steps
    the model holds w̃ = w − rho·v/‖v‖, the next forward/backward runs there, and ``step`` restores w
    (bitwise, from the backup), takes the base step with g(w̃) and perturbs again with the new v.
    One forward and one backward per step, as plain training (``stats()`` counts them as plain steps).

    Which weights the model holds: w̃ between steps (w before the first step, which has no momentum
    yet). To evaluate, save or export at w: ``with opt.unperturbed(): ...`` or the official code's
    helpers ``move_back_from_momentum_ascent()`` / ``move_up_to_momentum_ascent()``; call the former
    at the end of training to keep w. ``state_dict()`` between steps holds w in its backups (the
    model's own state dict holds w̃), so a resumed run continues exactly.

    Args:
        base_optimizer: ``torch.optim.SGD`` with momentum > 0 (official ``MSAM``), ``torch.optim.AdamW``
            or ``Adam`` (direction: ``exp_avg``), or any optimizer with ``direction_key`` naming its
            per-parameter momentum state entry.
        rho: the perturbation radius (default 0.3, the official class's; the authors' CIFAR and
            ImageNet runs use 3).
        decay_at: where SGD's (coupled) weight decay reads w: ``"perturbed"`` (default, the official
            ``MSAM``: d = g + wd·w̃) or ``"restored"`` (torch's SGD at w). AdamW's decoupled decay is
            torch's, applied at w before the update (the official ``AdamW_MSAM`` applies it after the
            update: a difference of lr²·wd times the update).
        direction_key: the base optimizer's per-parameter momentum state entry (default: by type).

    Other SAM options as :class:`~sam_kernels.optim.sam.SAM`; not ``adaptive``, ``policy``,
    ``renormalize``, ``modifiers`` or ``ascent_steps`` > 1 (``ValueError``).

    The official SGD version ignores ``nesterov`` and ``dampening``; here they are torch's. Raises
    ``ValueError`` for SGD without momentum or a base optimizer whose momentum entry is unknown,
    ``TypeError`` for sparse gradients and for the two-pass methods. After any error in ``step`` the
    model holds w.
    """

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.3, *,
                 decay_at: Optional[str] = None, direction_key: Optional[str] = None, **kwargs):
        for key in ("adaptive", "policy", "renormalize", "modifiers"):
            if kwargs.get(key):
                raise ValueError(f"MomentumSAM: {key}= is not supported (one pass per step along the momentum)")
        if kwargs.get("ascent_steps", 1) != 1:
            raise ValueError("MomentumSAM: ascent_steps must be 1")
        if decay_at not in (None, "perturbed", "restored"):
            raise ValueError(f"MomentumSAM: decay_at must be 'perturbed' or 'restored', got {decay_at!r}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        base = self.base_optimizer
        self.direction_key = direction_key or DIRECTION_KEYS.get(type(base))
        if self.direction_key is None:
            raise ValueError(f"MomentumSAM: no known momentum state entry for {type(base).__name__}; pass "
                             "direction_key= (the name of its per-parameter momentum buffer)")
        if type(base) is torch.optim.SGD and not all(g["momentum"] > 0 for g in self.param_groups):
            raise ValueError("MomentumSAM: torch.optim.SGD needs momentum > 0 in every group (the perturbation "
                             "follows its momentum buffer)")
        if decay_at is not None and type(base) is not torch.optim.SGD:
            raise ValueError("MomentumSAM: decay_at applies to torch.optim.SGD's coupled weight decay only")
        self.decay_at = decay_at or ("perturbed" if type(base) is torch.optim.SGD else "restored")

    # ------------------------------------------------------------------ the two-pass API does not apply

    def first_step(self, *args, **kwargs):
        raise TypeError(_PROTOCOL)

    def second_step(self, *args, **kwargs):
        raise TypeError(_PROTOCOL)

    def base_step(self, *args, **kwargs):
        raise TypeError(_PROTOCOL)

    def wants_sam(self) -> bool:
        raise TypeError(_PROTOCOL)

    # ------------------------------------------------------------------ the step

    @torch.compiler.disable(recursive=False)  # an eager shell: torch.compile compiles the body (see .compiled)
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, *, loss: Optional[torch.Tensor] = None):
        """One Momentum-SAM step (restore w, base step with g(w̃), perturb along the new momentum).

        ``closure`` (re-evaluates the loss and calls ``backward``) gives the step's one pass unless a
        backward already wrote the gradients since the last step or ``zero_grad`` (the rule of
        ``SAM.step``); returns its loss, or None. ``loss`` is unused (no second pass to compare with).

        Under ``torch.compile`` (``torch.compile(opt.step, fullgraph=True)``, also after an LR scheduler
        was built on this optimizer): this method is an eager shell that runs the closure, the step hooks
        and the scheduler's bookkeeping without tracing, and torch.compile compiles the body
        (:mod:`sam_kernels.optim.compiled`). A body that fails to compile leaves w in the model."""
        compiled = eval_frame_callback() not in (None, False)  # inline: a call here would be traced
        host = call_eagerly if compiled else call
        first = host(self._host_step_before, closure, compiled)
        try:
            self._step()
        except BaseException as e:
            host(self._host_step_failed, e)
            raise
        host(self._host_step_after, compiled)
        return first

    # The shell runs the step hooks itself (Optimizer would wrap ``step`` in its hook runner, a frame
    # torch.compile would trace) and marks the step for LR schedulers itself (a scheduler would wrap
    # ``step`` in a function torch.compile does not trace): both leave it as it is.
    step.hooked = True
    step._wrapped_by_lr_sched = True

    def _host_step_before(self, closure, compiled: bool):
        """Pre hooks (first, as torch.optim runs them), checks, the closure's pass (when it gives the
        step's one pass), the hyperparameter mirrors."""
        now = self.step_state
        now.stepping = True  # the hooks are the shell's
        try:
            run_step_hooks(self, "pre")
            self.amp.check_attached(self)
            check_closure(closure, type(self).__name__)
            now.finite.surface()
            loss = None
            params = self._params()
            if closure is not None and not now.backward.ran(params):
                if any(p.grad is not None for p in params):
                    self.zero_grad(set_to_none=False)
                self.amp.next_pass(self)
                with torch.enable_grad():
                    loss = closure()
            self._host_before("step", compiled)
        except BaseException:
            now.stepping = False
            raise
        return loss

    def _host_step_failed(self, error: BaseException) -> None:
        """A compiled body that failed to compile ran nothing: the model holds w̃ of the last step; w, as
        after an eager failure. A graph break of a base optimizer without a fused descent is explained."""
        self.step_state.stepping = False
        if self.step_state.perturbed is not None:
            self.restore()
        self.step_state.begun = False
        refusal = compiled_refusal(self, error, "step")
        if refusal is not None:
            raise refusal from error

    def _host_step_after(self, compiled: bool) -> None:
        self.step_state.stepping = False
        mark_stepped(self)
        if compiled:
            mark_stepped(self.base_optimizer)
        run_step_hooks(self, "post")

    @records_step(starts_step=True)
    @torch.no_grad()
    def _step(self) -> None:
        now = self.step_state
        self.amp.check_attached(self)
        self._begin()
        now.found = None
        held = now.perturbed
        try:
            if sparse_grads.any_sparse(self.param_groups):
                raise TypeError("MomentumSAM: sparse gradients are not supported; use dense gradients or SAM")
            with self._decay_at_perturbed():
                self._descend(held)
        except BaseException:
            if held is not None:
                self.restore()  # the model holds w
            now.begun = False
            raise
        now.set_perturbed(None)  # a one-pass step for the counters
        self._finish()
        self._momentum_ascent(with_grads=True)

    @contextlib.contextmanager
    def _decay_at_perturbed(self) -> Iterator[None]:
        """Official MSAM: SGD's weight decay term reads the perturbed w̃ (d = g + wd·w̃, the gradients
        carry the loss scale S under AMP), so the fused step runs with weight_decay 0."""
        swapped = [g for g in self.param_groups if self.decay_at == "perturbed" and g["weight_decay"]]
        for group in swapped:
            ps = [p for p in group["params"] if p.grad is not None]
            scale = self.loss_scale
            if ps and scale is None:
                torch._foreach_add_([p.grad for p in ps], ps, alpha=group["weight_decay"])
            elif ps:
                wd = scale.to(ps[0].device) * group["weight_decay"]
                torch._foreach_add_([p.grad for p in ps], torch._foreach_mul(ps, wd))
        saved = [g["weight_decay"] for g in swapped]
        for group in swapped:
            group["weight_decay"] = 0.0
        try:
            yield
        finally:
            for group, wd in zip(swapped, saved):
                group["weight_decay"] = wd

    def _momentum_ascent(self, with_grads: bool) -> None:
        """w̃ ← w − rho·v/(‖v‖ + 1e-12) over the params with a momentum buffer (and a gradient this
        step when ``with_grads``, as the official code) in the groups that take part in the ascent
        (SAM-ON's ``perturb=False`` groups do not, nor are they in ‖v‖), w kept in the backups."""
        now = self.step_state
        key, state = self.direction_key, self.base_optimizer.state
        entries = [(g, p) for g in self.param_groups if g["perturb"] for p in g["params"]  # SAM-ON: perturb=False
                   if isinstance(state.get(p, {}).get(key), torch.Tensor) and (p.grad is not None or not with_grads)]
        if not entries:
            return
        bufs = [state[p][key] for _, p in entries]
        ascent = Ascent(entries, groups.sq_norm(entries, self.backend, grads=bufs), None, subset=False,
                        alias_keys=now.aliases)
        ascent.grads = bufs
        ascent.buckets = groups.bucket(entries, lambda g: (-hyper(self, g, "rho"), False, g["eta"]))
        ascent.perturb(self.state, self.backend)
        now.set_perturbed(ascent.params, ascent.kept)

    # ------------------------------------------------------------------ evaluating at w

    @torch.no_grad()
    def move_back_from_momentum_ascent(self) -> None:
        """The model goes to w (bitwise); the next ``step`` then takes its gradient at w."""
        self.restore()

    @torch.no_grad()
    def move_up_to_momentum_ascent(self) -> None:
        """The model goes back to w̃ = w − rho·v/‖v‖ (after ``move_back_from_momentum_ascent``)."""
        if self.step_state.perturbed is None:
            self._momentum_ascent(with_grads=False)

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """``with opt.unperturbed(): evaluate(model)``: the model holds w inside, w̃ again after."""
        held = self.step_state.perturbed is not None
        self.move_back_from_momentum_ascent()
        try:
            yield
        finally:
            if held:
                self.move_up_to_momentum_ascent()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.step_state.begun = False  # the held perturbation is between steps, not a step begun
