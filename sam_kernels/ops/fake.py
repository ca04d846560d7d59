"""Fake (meta) implementations of torch.ops.sam_kernels, so torch.compile can trace the ops.

One per op of the table (:mod:`.contract`), by kind: a reduction returns a 0-dim tensor in the
contract's dtype, a mask op new bool tensors shaped like its scores, an update nothing.
"""
from __future__ import annotations

import torch

from .contract import OPS


def _reduction_result(tensors, *args) -> torch.Tensor:
    dtype = torch.float64 if tensors and all(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tensors[0].new_empty((), dtype=dtype)


def _masks_like(scores, *args) -> list[torch.Tensor]:
    return [torch.empty_like(s, dtype=torch.bool, memory_format=torch.contiguous_format) for s in scores]


def _nothing(*args, **kwargs) -> None:
    return None


_BY_KIND = {"reduction": _reduction_result, "mask": _masks_like, "update": _nothing}


def register(namespace: str = "sam_kernels") -> None:
    """Attach the fake kernels to the ops of ``namespace`` (another build of the same sources
    registers the op table's schemas under its own). Once per process and namespace: called when
    _C is imported."""
    for op in OPS.values():
        torch.library.register_fake(f"{namespace}::{op.name}")(_BY_KIND[op.kind])
