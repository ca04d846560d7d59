"""Telemetry outputs that the kernels add into, in the pass that reads the data (ours)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .dtensor import all_reduce_partial, reduce_groups
from .lists import require_list

Tensors = Sequence[torch.Tensor]


class AddInto:
    """A telemetry output that kernels add into (the descents' ``sums``, perturb_'s
    ``perturbation_sq``), checked before any launch: a contiguous float32/float64 tensor of
    ``numel`` elements. Each group's kernel adds into it directly when it is on the group's device,
    else into a zero temporary added to it at :meth:`finish`; inside a DTensor call every group
    uses a temporary, summed over the mesh first (the local shards' partial sums)."""

    def __init__(self, op: str, name: str, out: Optional[torch.Tensor], numel: int):
        if out is not None and not (isinstance(out, torch.Tensor) and out.numel() == numel and out.dim() <= 1
                                    and out.is_contiguous() and out.dtype in (torch.float32, torch.float64)):
            raise TypeError(f"{op}: {name} must be a contiguous float32/float64 tensor of {numel} element(s), got "
                            f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__} "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        self.out = out
        self.per_device = out is not None and bool(reduce_groups())
        self.temps: dict = {}

    def on(self, device: torch.device) -> Optional[torch.Tensor]:
        """Where a group on ``device`` adds (None without an output)."""
        if self.out is None or (not self.per_device and device == self.out.device):
            return self.out
        t = self.temps.get(device)
        if t is None:
            t = self.temps[device] = torch.zeros_like(self.out, device=device)
        return t

    def finish(self) -> None:
        for t in self.temps.values():
            self.out.add_(all_reduce_partial(t).to(self.out.device))


class DescentSums(AddInto):
    """The descents' telemetry arguments (``ascent_grads``, ``sums`` of shape (2,))."""

    def __init__(self, op: str, sums: Optional[torch.Tensor], ascent_grads: Optional[Tensors], n: int):
        if sums is None:
            if ascent_grads is not None:
                raise ValueError(f"{op}: ascent_grads given without sums (where the dot would go)")
        elif isinstance(sums, torch.Tensor) and sums.shape != (2,):
            raise TypeError(f"{op}: sums must have shape (2,), got {tuple(sums.shape)}")
        super().__init__(op, "sums", sums, 2)
        if ascent_grads is not None:
            require_list(op, ascent_grads)
            if len(ascent_grads) != n:
                raise ValueError(f"{op}: {len(ascent_grads)} ascent_grads for {n} params")

    def kwargs(self, pick: Callable, device: torch.device, ascent_grads: Optional[Tensors]) -> dict:
        """The group's ``ascent_grads`` / ``sums`` keyword arguments (none when telemetry is off);
        ``ascent_grads``: the list aligned with the launch's params."""
        if self.out is None:
            return {}
        kw = {"sums": self.on(device)}
        if ascent_grads is not None:
            kw["ascent_grads"] = pick(ascent_grads)
        return kw
