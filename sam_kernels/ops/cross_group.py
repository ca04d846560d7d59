"""Reductions across the groups of one call (and, for DTensors, across the mesh)."""
from __future__ import annotations

from typing import Sequence

import torch

from .dtensor import all_reduce_partial

Tensors = Sequence[torch.Tensor]


def sum_on(parts: list[torch.Tensor], primary: Tensors) -> torch.Tensor:
    """Sum group partial results on the first tensor's device (fp32 unless everything is fp64)."""
    if not primary:
        raise ValueError("cannot reduce an empty list of tensors")
    if len(parts) == 1 and parts[0].device == primary[0].device and (
            parts[0].dtype == torch.float32 or all(t.dtype.to_real() == torch.float64 for t in primary)):
        return parts[0]  # one group (the usual case), already in the contract's dtype
    device = primary[0].device
    dtype = torch.float64 if all(t.dtype.to_real() == torch.float64 for t in primary) else torch.float32
    if not parts:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.stack([p.to(device=device, dtype=dtype) for p in parts]).sum()


def total(parts: list[torch.Tensor], primary: Tensors) -> torch.Tensor:
    """A reduction's result: the groups' partial results summed (:func:`sum_on`), then, for DTensor
    shards, over the mesh (:func:`dtensor.all_reduce_partial`)."""
    return all_reduce_partial(sum_on(parts, primary))
