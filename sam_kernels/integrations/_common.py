"""What every integration checks and does, framework-free (ours)."""
from __future__ import annotations

import torch

from ..optim.sam import SAM


def sam_of(optimizer: torch.optim.Optimizer, where: str) -> SAM:
    """The ``sam_kernels`` optimizer behind a framework's wrapper (``.optimizer``), checked.

    Raises ``TypeError`` for another optimizer, and ``ValueError`` for ESAM with ``gamma < 1``:
    its data selection needs ``ESAM.step``'s per-sample closure, which no framework calls, and the
    first_step/second_step protocol the integrations drive would silently skip it.
    """
    opt = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(opt, SAM):
        raise TypeError(f"{where}: the optimizer is a {type(opt).__name__}, not a sam_kernels.SAM")
    if getattr(opt, "gamma", 1.0) < 1.0:
        raise ValueError(f"{where}: ESAM with gamma={opt.gamma} (data selection) needs ESAM.step(closure) with "
                         f"per-sample losses, which this framework does not call; use gamma=1 (weight "
                         f"perturbation only) or a manual loop")
    return opt


def attach_scaler(opt: SAM, scaler, where: str) -> None:
    """Give ``opt`` the framework's GradScaler (fp16), so an overflow of either pass reaches ``scaler.update()``."""
    if scaler is None:
        return
    if opt.grad_scaler is None:
        opt.grad_scaler = scaler
    elif opt.grad_scaler is not scaler:
        raise ValueError(f"{where}: the optimizer holds another GradScaler than the framework's; build it without "
                         f"grad_scaler= (the integration attaches the framework's)")
