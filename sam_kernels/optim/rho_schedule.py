"""A rho schedule that follows the learning rate (GSAM's ``ProportionScheduler``).

Source: Zhuang et al., ICLR 2022, and their official code (juntang-zhuang/GSAM, ``gsam/scheduler.py``,
``ProportionScheduler``): rho_t − min_rho is proportional to lr_t − min_lr,

    rho_t = min_rho + (max_rho − min_rho)·(lr_t − min_lr)/(max_lr − min_lr),

with lr_t the learning rate of the first param group (the code reads the scheduler's ``_last_lr[0]``).
"""
from __future__ import annotations

import torch


class ProportionalRho:
    """Sets ``rho`` of every param group of ``optimizer`` from the first group's ``lr``.

    Call :meth:`step` after the LR scheduler's ``step()`` (the official training loop calls
    ``update_rho_t()`` there); it also runs once at construction, as the official class does. Works
    for any SAM-family optimizer of this package (``rho`` is a param-group key). Its state is the
    optimizer's: the rho it wrote is saved with the param groups.

    Args:
        optimizer: the SAM optimizer (its param groups, shared with the base optimizer, hold lr and rho).
        max_lr, min_lr: the lr range of the schedule (max_lr > min_lr; equal only with max_rho == min_rho).
        max_rho, min_rho: the rho range (max_rho >= min_rho >= 0).

    Raises ``ValueError`` for ranges the official class rejects.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_lr: float, min_lr: float, max_rho: float,
                 min_rho: float):
        if not (max_lr > min_lr or (max_lr == min_lr and max_rho == min_rho)):
            raise ValueError(f"ProportionalRho: need max_lr > min_lr (or max_lr == min_lr with max_rho == min_rho), "
                             f"got max_lr={max_lr}, min_lr={min_lr}, max_rho={max_rho}, min_rho={min_rho}")
        if not max_rho >= min_rho >= 0:
            raise ValueError(f"ProportionalRho: need max_rho >= min_rho >= 0, got max_rho={max_rho}, min_rho={min_rho}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.max_rho, self.min_rho = max_lr, min_lr, max_rho, min_rho
        self.step()

    def value(self, lr: float) -> float:
        """rho for learning rate ``lr``."""
        if self.max_lr == self.min_lr:
            return self.max_rho
        return self.min_rho + (self.max_rho - self.min_rho) * (lr - self.min_lr) / (self.max_lr - self.min_lr)

    def step(self) -> float:
        """Write rho_t into every param group; returns it."""
        lr = self.optimizer.param_groups[0]["lr"]
        rho = self.value(float(lr))  # a tensor lr is read on the host (one sync per call, outside the step)
        for group in self.optimizer.param_groups:
            group["rho"] = rho
        return rho
