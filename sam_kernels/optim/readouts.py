"""What a user reads from a SAM optimizer between steps (ours): its counters, its telemetry and
cost counters, the dispatch of its last step, its AMP scale, and the finite check's deferred error.
A mixin of :class:`~sam_kernels.optim.sam.SAM`; none of it changes the step."""
from __future__ import annotations

from typing import Optional

import torch

from . import amp
from .dispatch_summary import DispatchSummary
from .telemetry import Telemetry


class Readouts:
    """The reading side of :class:`~sam_kernels.optim.sam.SAM` (``self.step_state``, ``self.amp``)."""

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (SAM and plain)."""
        return self.step_state.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.step_state.step_count = value

    @property
    def telemetry(self) -> Telemetry:
        """The telemetry and cost counters (:class:`~sam_kernels.optim.telemetry.Telemetry`)."""
        return self.step_state.telemetry

    @property
    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """The attached ``GradScaler`` (None: no AMP); setting it rebuilds ``self.amp``."""
        return self.amp.scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        first = next(iter(self._params()), None)
        self.amp = amp.make(scaler, None if first is None else first.device)

    @property
    def loss_scale(self) -> Optional[torch.Tensor]:
        """The loss scale the gradients carry now (the scaler's own 0-dim fp32 device tensor, changed in
        place by ``scaler.update()``; None when ``scaler.unscale_(opt)`` unscaled this pass, or without AMP)."""
        return self.amp.loss_scale(self)

    def dispatch_summary(self) -> DispatchSummary:
        """Which backend ran how many elements of each op in the last step (``print`` it for a table);
        ``fused_share < 1`` means some tensors ran on the slow eager path (see ``ops.dispatch``)."""
        return DispatchSummary(tuple(self.step_state.dispatch_log or ()))

    def stats(self, ema: bool = False) -> dict[str, float]:
        """Telemetry and cost counters as Python floats, keys exactly ``sam_kernels.optim.telemetry.KEYS``:
        ``grad_norm``, ``sam_grad_norm``, ``grad_cosine``, ``perturbation_norm``, ``sharpness`` (of the
        last SAM step; their EMAs with ``ema=True``; ``grad_cosine`` needs ``telemetry=True``, the others
        the default ``"norms"``; NaN before the first SAM step, with ``telemetry=False`` or when not
        known), ``steps``, ``sam_steps``, ``sam_step_fraction``,
        ``forward_passes``, ``backward_passes`` (full-batch equivalents) and ``optimizer_bytes`` (at
        the ops' bytes floors). Units: the loss's and the gradients'; bytes. One host sync (none
        without device values). Definitions and costs: :mod:`sam_kernels.optim.telemetry`.
        Raises the finite check's deferred ``FloatingPointError`` first (see :meth:`check_finite`)."""
        self.step_state.finite.surface(wait=True)
        return self.telemetry.stats(ema)

    def check_finite(self) -> None:
        """Raise the ``FloatingPointError`` of the last step if the finite check skipped it on the
        device (gradients on a GPU; :mod:`sam_kernels.optim.finite`), waiting for that step (one host
        sync). Otherwise that error is raised at the start of the next step. Once per skipped step."""
        self.step_state.finite.surface(wait=True)
