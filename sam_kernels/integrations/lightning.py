"""PyTorch Lightning: SAM steps under automatic optimization, for every precision (ours).

Return a ``sam_kernels`` optimizer from ``configure_optimizers`` and give the Trainer one plugin::

    trainer = L.Trainer(plugins=[sam_precision("bf16-mixed")], gradient_clip_val=1.0, ...)

Why a precision plugin. Lightning's automatic optimization hands the optimizer a closure that
runs ``training_step``, ``zero_grad`` and ``backward``; each precision plugin decides how the
optimizer is stepped with it, and neither stock path gives a SAM step:

- ``"32-true"``/``"bf16-mixed"`` call ``optimizer.step(closure)``. The gradients of the previous
  step are still there at that moment (Lightning zeroes inside the closure), so ``SAM.step`` would
  take them as the first pass: a stale ascent direction on every step but the first.
- ``"16-mixed"`` runs the closure once, then ``scaler.step(optimizer)`` without a closure, which
  ``SAM.step`` refuses (it only ends a step begun by ``first_step``); and Lightning refuses
  Trainer-level clipping for optimizers that unscale inside ``step`` (``_step_supports_amp_scaling``).

The plugin drives the manual protocol instead: closure (first pass at w), ``first_step``,
closure (second pass at w + e), the ``on_before_optimizer_step`` hooks and the Trainer's clipping
on the second-pass gradient (the one the base optimizer applies; under fp16 after
``scaler.unscale_``), then ``optimizer.step()`` / ``scaler.step(optimizer)`` + ``scaler.update()``
(which end the SAM step: ``second_step``). Policy variants (SS-SAM, LookSAM, AE-SAM) take a plain
step when ``wants_sam()`` says so, with one closure. The plugin attaches its GradScaler to the
optimizer (``grad_scaler=``), so an overflow in either pass skips the step and backs the scale off.
Other optimizers and manual optimization go through Lightning's own path unchanged.

Not supported (raises before any weight changes): ``accumulate_grad_batches > 1`` (Lightning's
closure replays only the last micro-batch, so the second pass would miss the others; use the
Hugging Face or Accelerate integration, or a manual loop).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType
except ImportError as exc:
    raise ImportError("sam_kernels.integrations.lightning needs Lightning (the `lightning` package): "
                      "pip install 'sam_kernels[lightning]'") from exc

from ..optim.batchnorm import frozen_running_stats
from ..optim.sam import SAM
from ._common import attach_scaler, sam_of

__all__ = ["sam_precision", "SAMPrecision", "SAMMixedPrecision"]


def _check_trainer(trainer: "pl.Trainer") -> None:
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(f"sam_kernels.integrations.lightning: accumulate_grad_batches="
                         f"{trainer.accumulate_grad_batches} is not supported: Lightning's closure replays only the "
                         f"last micro-batch, so SAM's second pass would miss the others. Use a larger batch, or "
                         f"the manual accumulation loop of the training-loops guide")


def _sam_step(plugin: Precision, optimizer: SAM, model: "pl.LightningModule", closure: Callable[[], Any],
              scaler: Optional[torch.amp.GradScaler], **kwargs: Any) -> Any:
    """One SAM (or policy-plain) step driven from the Lightning closure; returns the first pass's loss."""
    _check_trainer(model.trainer)
    sam_of(optimizer, type(plugin).__name__)
    attach_scaler(optimizer, scaler, type(plugin).__name__)
    loss = closure()  # first pass at w (the closure zeroes the previous step's gradients before backward)
    if loss is None:  # training_step returned None: Lightning skips this step, so do we
        return None
    try:
        if optimizer.wants_sam():
            optimizer.first_step(zero_grad=True)
            with frozen_running_stats(model):  # BatchNorm statistics: once per step, from the pass at w
                closure()  # second pass at w + e
        plugin._after_closure(model, optimizer)  # on_before_optimizer_step hooks, Trainer clipping
    except BaseException:
        optimizer.restore()  # the weights go back to w before the error propagates
        raise
    if scaler is None:
        optimizer.step(**kwargs)  # ends the step: second_step (or base_step on a plain step)
    else:
        scaler.step(optimizer, **kwargs)
        scaler.update()
    return loss


def sam_precision(precision: str = "32-true", device: Optional[str] = None) -> Precision:
    """The plugin for a Lightning ``precision`` string: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"``
    (``device``: where autocast runs; default ``"cuda"`` when available, else ``"cpu"``).

    Raises ``ValueError`` for any other precision (``"64-true"``: build the model in float64 under ``"32-true"``).
    """
    if precision == "32-true":
        return SAMPrecision()
    if precision in ("bf16-mixed", "16-mixed"):
        return SAMMixedPrecision(precision, device=device)
    raise ValueError(f"sam_precision: precision must be '32-true', 'bf16-mixed' or '16-mixed', got {precision!r}")


class SAMPrecision(Precision):
    """Lightning's ``precision="32-true"`` plugin, taking SAM steps with ``sam_kernels`` optimizers."""

    def optimizer_step(self, optimizer, model: "pl.LightningModule", closure: Callable[[], Any], **kwargs: Any) -> Any:
        if not isinstance(optimizer, SAM) or not model.automatic_optimization:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        return _sam_step(self, optimizer, model, closure, None, **kwargs)


class SAMMixedPrecision(MixedPrecision):
    """Lightning's ``"bf16-mixed"`` / ``"16-mixed"`` (``torch.autocast`` on ``device``; fp16 with a
    ``torch.amp.GradScaler``), taking SAM steps with ``sam_kernels`` optimizers.

    Under fp16 the plugin's scaler is attached to the optimizer (``optimizer.grad_scaler``) at the
    first step; Trainer-level clipping (``gradient_clip_val``) unscales the second pass with
    ``scaler.unscale_`` and clips it (Lightning's own AMP plugin refuses clipping for optimizers
    that unscale inside ``step``).
    """

    def __init__(self, precision: str, device: Optional[str] = None, scaler: Optional[torch.amp.GradScaler] = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(precision, device, scaler)

    def optimizer_step(self, optimizer, model: "pl.LightningModule", closure: Callable[[], Any], **kwargs: Any) -> Any:
        if not isinstance(optimizer, SAM) or not model.automatic_optimization:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        return _sam_step(self, optimizer, model, closure, self.scaler, **kwargs)

    def clip_gradients(self, optimizer, clip_val: float = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        if not isinstance(optimizer, SAM):
            return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        if clip_val > 0 and self.scaler is not None:
            # SAM then takes unscaled gradients: scaler.step hands it grad_scale=None (sam_kernels.optim.amp)
            self.scaler.unscale_(optimizer)
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
