"""Hugging Face ``accelerate``: the two helpers of the documented SAM loop (ours).

The loop (documented in the frameworks guide; ``tests/integrations/test_accelerate.py`` runs it)::

    accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision="bf16")
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    sam = sam_optimizer(accelerator, opt)
    window = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))          # first pass, at w
            window.append((x, y))
            if accelerator.sync_gradients:                       # the window's last micro-batch
                if sam.wants_sam():                              # False: a plain step (SS-SAM, LookSAM, ...)
                    sam.first_step(zero_grad=True)
                    for x2, y2 in second_pass(accelerator, model, window):
                        accelerator.backward(loss_fn(model(x2), y2))  # second pass, at w + e
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()                                       # second_step (or base_step)
                opt.zero_grad()
                window.clear()

Why this shape: ``accelerator.accumulate`` counts one call per micro-batch and lets the optimizer
step only on the window's last one, so the second pass runs inside that last call, over every
micro-batch of the window (both passes accumulate over the same data, as in the manual
accumulation loop). ``accelerator.backward`` divides each loss by ``gradient_accumulation_steps`` in both
passes. Under fp16 ``opt.step()`` is ``scaler.step(sam)`` + ``scaler.update()`` and
``clip_grad_norm_`` unscales the second pass first (``scaler.unscale_``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence, TypeVar

import torch

try:
    import accelerate
except ImportError as exc:
    raise ImportError("sam_kernels.integrations.accelerate needs accelerate: pip install 'sam_kernels[accelerate]'") from exc

from ..optim.batchnorm import frozen_running_stats
from ..optim.sam import SAM
from ._common import attach_scaler, sam_of

__all__ = ["sam_optimizer", "second_pass"]

T = TypeVar("T")


def sam_optimizer(accelerator: accelerate.Accelerator, optimizer: torch.optim.Optimizer) -> SAM:
    """The ``sam_kernels`` optimizer inside ``accelerator.prepare``'s wrapper, with the accelerator's
    ``GradScaler`` (fp16) attached as ``grad_scaler``, so that an overflow in either pass reaches
    ``scaler.update()``. Call ``first_step`` on it; ``step``/``zero_grad`` on the wrapper.

    Raises ``TypeError`` if the optimizer is not a ``sam_kernels.SAM``; ``ValueError`` if it holds
    another GradScaler than the accelerator's.
    """
    opt = sam_of(optimizer, "sam_optimizer")
    attach_scaler(opt, getattr(accelerator, "scaler", None), "sam_optimizer")
    return opt


def second_pass(accelerator: accelerate.Accelerator, model: torch.nn.Module, window: Sequence[T]) -> Iterator[T]:
    """Yield the window's micro-batches again for the second backward; each but the last under
    ``accelerator.no_sync(model)``, so that DDP all-reduces the accumulated second pass once, and all
    under :func:`~sam_kernels.frozen_running_stats` (BatchNorm statistics updated once per step, by
    the first pass at w)."""
    for i, micro in enumerate(window):
        with contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(model), \
                frozen_running_stats(model):
            yield micro
