"""Mixed precision (fp16 + ``torch.amp.GradScaler``) for SAM steps, with no host sync.

A SAM step backpropagates twice, and either pass can overflow. GradScaler's own protocol for
optimizers that unscale by themselves (``_step_supports_amp_scaling = True``, as torch's fused
Adam/AdamW/SGD): ``scaler.step(opt)`` checks the gradients it sees, then hands the optimizer
``opt.grad_scale`` and ``opt.found_inf`` (device tensors) instead of unscaling and reading
``found_inf`` on the host. SAM keeps that protocol, all on the device, with the scale of each
pass taken from the scaler itself (below):

- the scale is divided out inside the fused kernels (``ops.perturb_`` folds it into its scale
  scalar; ``ops.sgd_restore_step_`` / ``adamw_restore_step_`` divide per element);
- an overflow is a non-finite squared gradient norm (SAM computes the norm of each pass anyway)
  or a non-zero ``found_inf`` from the scaler; one in either pass skips the whole step: the
  perturbation is not applied, the descent restores w bitwise and leaves the base state alone;
- the overflow of the pass the scaler did not see is added to the scaler's record for this
  optimizer, so ``scaler.update()`` backs off. That needs the scaler object, which GradScaler
  does not hand over: build the optimizer with ``grad_scaler=scaler``;
- a state dict saved mid-step carries the step's flag (:mod:`.checkpoint`): a resumed step whose
  first pass overflowed is skipped too, and reported to the new scaler.

The optimizer holds one :func:`make` object (``SAM.amp``, rebuilt when ``grad_scaler`` is set) and calls
it at fixed points of the step: ``check_attached`` on entry, ``loss_scale``, ``screen`` after each
squared gradient norm, ``perturb_args`` for the ascent, ``next_pass`` between the passes,
``report`` after the descent.

Which scale each pass carries (ours; GradScaler's bookkeeping is per optimizer, not per pass):
the scaler's per-optimizer stage turns UNSCALED when the user calls ``scaler.unscale_(opt)`` (to
clip, say), and torch allows that once per ``scaler.update()``. A SAM step has two passes, and the
user may unscale either, or both, or neither: after the first pass (before ``first_step``), after
the second (before ``scaler.step(opt)`` / ``second_step``, or inside the closure of
``scaler.step(opt, closure)``). So the stage is read once per pass, where SAM consumes that pass's
gradients: UNSCALED means this pass was unscaled (scale None), anything else that it carries the
scaler's current scale. Between the passes (end of ``first_step``) an UNSCALED stage is set back
to READY, so the stage then describes the second pass alone and ``scaler.unscale_(opt)`` may be
called again for it. The flags ``unscale_`` recorded for a pass (``found_inf_per_device``: an Inf
that clipping or ``nan_to_num_`` may since have hidden) join the step's overflow flag before that.
``opt.grad_scale``, which ``scaler.step`` hands over from the stage at ITS call, is not used: inside
``scaler.step(opt, closure)`` it describes the first pass only.

Before ``scaler.step(opt, closure)`` can call the optimizer, GradScaler needs a scale, which it
creates lazily in ``scaler.scale``; a loop whose passes all run inside the step (``ESAM.step``'s
per-sample closure, or a closure giving the first pass too) never calls ``scale`` before it.
Attaching a scaler therefore creates its scale (at ``init_scale``) when it has none yet, on the
parameters' device (the scaler's own device type otherwise), as its first ``scale(loss)`` would.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.amp.grad_scaler import OptState

LOOP = """\
    scaler = torch.amp.GradScaler(device_type)  # "cuda" or "cpu": a bare GradScaler() is CUDA's, disabled on a CPU
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, grad_scaler=scaler, lr=0.1)
    for x, y in loader:
        with torch.autocast(device_type, dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        def closure():
            with torch.autocast(device_type, dtype=torch.float16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            return loss
        scaler.step(opt, closure)
        scaler.update()
        opt.zero_grad()"""


def active(scaler) -> bool:
    return scaler is not None and scaler.is_enabled()


def stepping(opt) -> bool:
    """Whether ``opt`` is being stepped by ``GradScaler.step`` (which sets these two attributes)."""
    return hasattr(opt, "found_inf") and hasattr(opt, "grad_scale")


def check_attached(opt) -> None:
    """A GradScaler is stepping ``opt`` but none was attached: the second pass's overflow could not
    reach ``scaler.update()``. Raised before anything changes."""
    if stepping(opt) and not active(opt.grad_scaler):
        raise RuntimeError(f"{type(opt).__name__} is stepped by a GradScaler that it does not know: build it with "
                           f"grad_scaler=scaler, so that an overflow in either SAM pass reaches scaler.update(). "
                           f"The loop:\n{LOOP}")


def stage(opt) -> OptState:
    """The attached scaler's stage for ``opt`` (GradScaler's per-optimizer state, private; unchanged
    from torch 1.6 to 2.14): UNSCALED after ``scaler.unscale_(opt)``."""
    return opt.grad_scaler._per_optimizer_states[id(opt)]["stage"]


def current_scale(opt) -> Optional[torch.Tensor]:
    """The loss scale the gradients of ``opt`` carry now, or None if they are unscaled: no AMP, or
    ``scaler.unscale_(opt)`` was called for this pass. The scaler's own 0-dim fp32 device tensor, which
    ``scaler.update()`` changes in place: copy it to keep it beyond the step."""
    scaler = opt.grad_scaler
    if not active(scaler) or stage(opt) is OptState.UNSCALED:
        return None
    if scaler._scale is None:
        raise RuntimeError("GradScaler has not scaled a loss yet: call scaler.scale(loss).backward() first")
    return scaler._scale


def recorded_overflow(opt) -> Optional[torch.Tensor]:
    """The overflow flags ``scaler.unscale_(opt)`` recorded for this pass, summed (device maths), or None."""
    flags = list(opt.grad_scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
    if not flags:
        return None
    total = flags[0].float()
    for f in flags[1:]:
        total = total + f.to(total.device).float()
    return total


def give_scale(scaler, device: Optional[torch.device]) -> None:
    """Create the scaler's scale tensor (at ``init_scale``) if it has none yet, as its first ``scale()``
    would: on ``device`` when that is the scaler's device type, else on the scaler's device."""
    if scaler._scale is not None:
        return
    own = torch.device(scaler._device)
    scaler._lazy_init_scale_growth_tracker(device if device is not None and device.type == own.type else own)


def overflow(sq_norm: torch.Tensor, opt) -> torch.Tensor:
    """0-dim fp32 flag on the norm's device: the squared norm is not finite, or the scaler found an Inf
    (the ``found_inf`` ``scaler.step`` hands over, or what ``scaler.unscale_`` recorded for this pass)."""
    found = (~torch.isfinite(sq_norm)).float()
    theirs = getattr(opt, "found_inf", None) if stepping(opt) else None
    if isinstance(theirs, torch.Tensor):
        found = torch.maximum(found, theirs.to(found.device).float())
    if stage(opt) is OptState.UNSCALED:
        recorded = recorded_overflow(opt)
        if recorded is not None:
            found = torch.maximum(found, recorded.to(found.device))
    return found


def report(opt, found: torch.Tensor) -> None:
    """Add ``found`` to the attached scaler's record for ``opt``: ``scaler.update()`` then backs off.

    Uses GradScaler's per-optimizer state (private; unchanged from torch 1.6 to 2.14): the scaler
    reads exactly these tensors in ``update()``.
    """
    per_device = opt.grad_scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    if per_device:
        mine = next(iter(per_device.values()))
        mine.add_(found.to(mine.device))
    else:
        per_device[found.device] = found.clone()


def unscaled(sq_norm: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """A squared norm of scaled gradients in unscaled units (device maths)."""
    if scale is None:
        return sq_norm
    return sq_norm / scale.to(sq_norm.device, sq_norm.dtype).square()


class Unscaled:
    """No AMP (no scaler, or a disabled one): gradients are unscaled, non-finite ones fail the finite check."""

    active = False

    def __init__(self, scaler=None):
        self.scaler = scaler

    def check_attached(self, opt) -> None:
        check_attached(opt)

    def loss_scale(self, opt) -> Optional[torch.Tensor]:
        return None

    def screen(self, opt, sq_norm: torch.Tensor, where: str) -> None:
        """``finite_check``: ``FloatingPointError`` now, or the device-side skip and a deferred error (:mod:`.finite`)."""
        if opt.finite_check:
            opt.step_state.finite.screen(opt.step_state, sq_norm, where)

    def perturb_args(self, opt, scale: Optional[torch.Tensor]) -> dict:
        return {}

    def next_pass(self, opt) -> None:
        pass

    def report(self, opt) -> None:
        opt.step_state.finite.finish(opt.step_state)  # a deferred finite check's flag on its way to the host


class Scaled(Unscaled):
    """fp16 with an enabled ``GradScaler``: the scale is divided out in the kernels, an overflow in
    either pass skips the step on the device and reaches the scaler (see the module docstring)."""

    active = True

    def __init__(self, scaler, device: Optional[torch.device] = None):
        super().__init__(scaler)
        give_scale(scaler, device)

    def check_attached(self, opt) -> None:
        pass

    def loss_scale(self, opt) -> Optional[torch.Tensor]:
        return current_scale(opt)

    def screen(self, opt, sq_norm: torch.Tensor, where: str) -> None:
        """Fold a non-finite ``sq_norm`` (or the scaler's own ``found_inf``) into the step's overflow flag."""
        now = opt.step_state
        found = overflow(sq_norm, opt)
        now.found = found if now.found is None else torch.maximum(now.found, found.to(now.found.device))

    def perturb_args(self, opt, scale: Optional[torch.Tensor]) -> dict:
        return {"grad_scale": scale, "found_inf": opt.step_state.found}

    def next_pass(self, opt) -> None:
        """The next pass begins: ``scaler.unscale_(opt)`` of the previous one (its overflow flags
        already screened) no longer describes the gradients, so the stage goes back to READY."""
        state = opt.grad_scaler._per_optimizer_states[id(opt)]
        if state["stage"] is OptState.UNSCALED:
            state["stage"] = OptState.READY

    def report(self, opt) -> None:
        if opt.step_state.found is not None:
            report(opt, opt.step_state.found)


def make(scaler, device: Optional[torch.device] = None) -> Unscaled:
    """The AMP object of an optimizer built with ``grad_scaler=scaler`` (None: no AMP) whose
    parameters are on ``device`` (where the scaler's scale is created if it has none)."""
    return Scaled(scaler, device) if active(scaler) else Unscaled(scaler)
