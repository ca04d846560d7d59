"""Hugging Face ``transformers.Trainer`` taking SAM steps (ours).

One-line change: ``Trainer`` -> ``SAMTrainer`` (the ``TrainingArguments`` stay yours)::

    trainer = SAMTrainer(model=model, args=args, train_dataset=ds, sam_kwargs={"rho": 0.05})

The Trainer builds its usual optimizer from the arguments (``optim``, ``learning_rate``,
``weight_decay``, ...) and ``SAMTrainer`` wraps it in ``sam_class`` (default
:class:`sam_kernels.SAM`); or pass your own ``sam_kernels`` optimizer as ``optimizers=(opt, scheduler)``.

How a step runs. The Trainer fetches the ``gradient_accumulation_steps`` micro-batches of one
optimizer step up front and calls ``training_step`` on each (forward, ``accelerator.backward``;
DDP synchronizes only the last one); then it clips (``max_grad_norm``), calls
``optimizer.step()``, steps the scheduler and zeroes the gradients. ``SAMTrainer.training_step``
keeps the micro-batches of the window; after the last one's backward (the first pass of the whole
window, at w) it calls ``first_step`` and runs ``Trainer.training_step`` again on every micro-batch
of the window (the second pass, at w + e, same loss scaling; under DDP ``no_sync`` for all but the
last, so the second pass is all-reduced once). The Trainer's own clipping then clips the
second-pass gradient and its ``optimizer.step()`` ends the SAM step (``SAM.step()`` without a
closure = ``second_step``). Policy variants take a plain step when ``wants_sam()`` says so.

AMP: bf16 needs nothing; under fp16 the accelerator's ``GradScaler`` is attached to the optimizer
(``grad_scaler=``), the Trainer's clipping unscales the second pass (``scaler.unscale_``) and
``scaler.step`` ends the SAM step; an overflow in either pass skips it on the device.
Accelerate's ``optimizer_step_was_skipped`` then stays False (SAM skips without a host sync),
so the scheduler steps on a skipped step, as in the manual GradScaler loop.

Not supported: DeepSpeed (its engine runs ``backward`` and ``step`` itself): ``ValueError`` at the
first step, before any weight changes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

try:
    import transformers
    from accelerate.utils import DistributedType
except ImportError as exc:
    raise ImportError("sam_kernels.integrations.transformers needs transformers and accelerate: "
                      "pip install 'sam_kernels[transformers]'") from exc

from ..optim.batchnorm import frozen_running_stats
from ..optim.sam import SAM
from ._common import attach_scaler, sam_of

__all__ = ["SAMTrainer"]


class SAMTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose optimizer steps are SAM steps over the whole accumulation window.

    Takes the Trainer's own arguments, and these.

    Args:
        sam_class: the ``sam_kernels`` optimizer class that wraps the Trainer's optimizer
            (``SAM``, ``SSSAM``, ``StableSAM``, ...); used only when ``optimizers`` gives no optimizer.
        sam_kwargs: its keyword arguments (``rho``, ``adaptive``, variant options), e.g. ``{"rho": 0.05}``.

    Raises ``TypeError`` at the first step if the optimizer is not a ``sam_kernels.SAM``, and
    ``ValueError`` under DeepSpeed; both before any weight changes.
    """

    def __init__(self, *args: Any, sam_class: type = SAM, sam_kwargs: Optional[dict] = None, **kwargs: Any):
        self.sam_class = sam_class
        self.sam_kwargs = dict(sam_kwargs or {})
        self._sam_window: list = []
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (from ``TrainingArguments``) wrapped in ``sam_class(**sam_kwargs)``."""
        if self.optimizer is None:
            base = super().create_optimizer(model)
            params = [p for g in base.param_groups for p in g["params"]]
            self.optimizer = self.sam_class(params, base, **self.sam_kwargs)
        return self.optimizer

    def _sam(self) -> SAM:
        opt = sam_of(self.optimizer, "SAMTrainer")  # under the AcceleratedOptimizer wrapper
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("SAMTrainer: DeepSpeed runs backward and the optimizer step itself, so a SAM step "
                             "cannot be taken inside it; use DDP")
        attach_scaler(opt, getattr(self.accelerator, "scaler", None), "SAMTrainer")
        return opt

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The first pass of this micro-batch; after the window's last one, the SAM ascent and the
        window's second pass. Returns the first-pass loss (at w), what the Trainer logs."""
        opt = self._sam()
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self._sam_window = []  # a later train() must not replay this window's micro-batches
            raise
        self._sam_window.append(inputs)
        if not self.accelerator.gradient_state.sync_gradients:
            return loss
        window, self._sam_window = self._sam_window, []
        if opt.wants_sam():
            opt.first_step(zero_grad=True)
            try:
                for i, micro in enumerate(window):
                    last = i == len(window) - 1
                    with contextlib.nullcontext() if last else self.accelerator.no_sync(model), \
                            frozen_running_stats(model):  # BatchNorm statistics: once per step, from the pass at w
                        super().training_step(model, micro, num_items_in_batch)
            except BaseException:
                opt.restore()  # back to w before the error propagates
                raise
        return loss
