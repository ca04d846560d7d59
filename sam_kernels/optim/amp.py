"""Mixed precision (fp16 + ``torch.amp.GradScaler``) for SAM steps, with no host sync.

A SAM step backpropagates twice, and either pass can overflow. GradScaler's own protocol for
optimizers that unscale by themselves (``_step_supports_amp_scaling = True``, as torch's fused
Adam/AdamW/SGD): ``scaler.step(opt)`` checks the gradients it sees, then hands the optimizer
``opt.grad_scale`` and ``opt.found_inf`` (device tensors) instead of unscaling and reading
``found_inf`` on the host. SAM uses them as follows (all on the device):

- the scale is divided out inside the fused kernels (``ops.perturb_`` folds it into its scale
  scalar; ``ops.sgd_restore_step_`` / ``adamw_restore_step_`` divide per element);
- an overflow is a non-finite squared gradient norm (SAM computes the norm of each pass anyway)
  or a non-zero ``found_inf`` from the scaler; one in either pass skips the whole step: the
  perturbation is not applied, the descent restores w bitwise and leaves the base state alone;
- the overflow of the pass the scaler did not see is added to the scaler's record for this
  optimizer, so ``scaler.update()`` backs off. That needs the scaler object, which GradScaler
  does not hand over: build the optimizer with ``grad_scaler=scaler``.

The optimizer holds one :func:`make` object (``SAM.amp``, rebuilt when ``grad_scaler`` is set) and calls
it at fixed points of the step: ``check_attached`` on entry, ``loss_scale``, ``screen`` after each
squared gradient norm, ``perturb_args`` for the ascent, ``descent_args`` and ``report`` around the descent.

The loss scale of the gradients at hand (:func:`current_scale`): inside ``scaler.step`` the
scaler's ``grad_scale`` (None after ``scaler.unscale_(opt)``); outside it, in the manual loop,
the attached scaler's scale (None after ``scaler.unscale_(opt)``); None without AMP.
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


def current_scale(opt, fresh: bool = False) -> Optional[torch.Tensor]:
    """The loss scale the gradients of ``opt`` carry now (0-dim fp32 device tensor), or None if unscaled.

    ``fresh``: the gradients were just made by a closure inside this step (scaled by the scaler's
    current scale, whatever ``scaler.unscale_`` did to the previous pass).
    """
    scaler = opt.grad_scaler
    if not active(scaler):
        return None
    if stepping(opt) and not fresh:
        return opt.grad_scale
    if not fresh and scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED:
        return None
    scale = scaler._scale
    if scale is None:
        raise RuntimeError("GradScaler has not scaled a loss yet: call scaler.scale(loss).backward() first")
    return scale


def overflow(sq_norm: torch.Tensor, opt) -> torch.Tensor:
    """0-dim fp32 flag on the norm's device: the squared norm is not finite, or the scaler found an Inf."""
    found = (~torch.isfinite(sq_norm)).float()
    theirs = getattr(opt, "found_inf", None) if stepping(opt) else None
    if isinstance(theirs, torch.Tensor):
        found = torch.maximum(found, theirs.to(found.device).float())
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
        """``finite_check``: ``FloatingPointError`` (one host sync) if ``sq_norm`` is not finite."""
        if opt.finite_check and not bool(torch.isfinite(sq_norm)):  # the documented host sync
            raise FloatingPointError(f"SAM.{where}: the gradients contain NaN or Inf (squared norm {float(sq_norm)}); "
                                     f"the weights were left unperturbed. Skip this batch (zero_grad) or lower the "
                                     f"learning rate; finite_check=False disables this check")

    def perturb_args(self, opt, scale: Optional[torch.Tensor]) -> dict:
        return {}

    def report(self, opt) -> None:
        pass


class Scaled(Unscaled):
    """fp16 with an enabled ``GradScaler``: the scale is divided out in the kernels, an overflow in
    either pass skips the step on the device and reaches the scaler (see the module docstring)."""

    active = True

    def check_attached(self, opt) -> None:
        pass

    def loss_scale(self, opt) -> Optional[torch.Tensor]:
        return current_scale(opt, fresh=opt.step_state.fresh)

    def screen(self, opt, sq_norm: torch.Tensor, where: str) -> None:
        """Fold a non-finite ``sq_norm`` (or the scaler's own ``found_inf``) into the step's overflow flag."""
        now = opt.step_state
        found = overflow(sq_norm, opt)
        now.found = found if now.found is None else torch.maximum(now.found, found.to(now.found.device))

    def perturb_args(self, opt, scale: Optional[torch.Tensor]) -> dict:
        return {"grad_scale": scale, "found_inf": opt.step_state.found}

    def report(self, opt) -> None:
        if opt.step_state.found is not None:
            report(opt, opt.step_state.found)


def make(scaler) -> Unscaled:
    """The AMP object of an optimizer built with ``grad_scaler=scaler`` (None: no AMP)."""
    return Scaled(scaler) if active(scaler) else Unscaled(scaler)
