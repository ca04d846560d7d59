"""Layout keys: which entries the compiled kernels can walk as flat storage.

The compiled kernels walk every tensor as flat storage, so they take any non-overlapping and dense
tensors (contiguous, channels_last, channels_last_3d, permuted) as long as entry i of every list
has the same memory order (strides equal on every dim of size > 1). An entry whose lists disagree
(a gradient in another memory format than its parameter, an overlapping or gapped view) runs
eagerly on its own: that tensor only, not its group.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

Tensors = Sequence[torch.Tensor]


def memory_order(t: torch.Tensor) -> Optional[tuple]:
    """The strides of ``t``'s dims of size > 1 when ``t`` is non-overlapping and dense (its elements
    fill ``numel`` consecutive storage slots), else None. Two same-shape tensors with equal keys put
    every element at the same offset from their data pointers (the check of csrc/common.h)."""
    kept = [(st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1]
    expected = 1
    for st, sz in sorted(kept):
        if st != expected:
            return None
        expected *= sz
    return tuple(st for st, _ in kept)


def rows_contiguous(t: torch.Tensor) -> bool:
    """Whether each row of dim 0 of the dense tensor ``t`` is one contiguous run of ``numel/size(0)``
    storage slots (dim 0 outermost: contiguous, channels_last; not a transposed matrix). Tensors of
    fewer than two dimensions have no rows to walk and qualify."""
    return t.dim() < 2 or t.shape[0] <= 1 or t.numel() == 0 or t.stride(0) * t.shape[0] == t.numel()


def groups(primary: Tensors, lists: list[Tensors], per_row: bool = False):
    """Yield (device, dtype, fusable, index list) per (device, dtype, layout agreement); skip empty tensors.

    ``fusable``: every list's entry has the primary entry's dense memory order (:func:`memory_order`)
    and, for an op on rows (``per_row``), its rows are contiguous runs (:func:`rows_contiguous`).
    """
    present = [primary, *lists]
    contig = [all(c) for c in zip(*([t.is_contiguous() for t in lst] for lst in present))]
    sizes = [t.numel() for t in primary]
    if all(contig):
        fusable = contig
    else:  # per entry, only where some list is not contiguous
        fusable = [c or (_agree([lst[i] for lst in present]) and (not per_row or rows_contiguous(primary[i])))
                   for i, c in enumerate(contig)]
    keys = list(zip([t.device for t in primary], [t.dtype for t in primary], fusable))
    if len(set(keys)) == 1 and all(sizes):  # the usual case: one group, nothing to skip
        yield (*keys[0], list(range(len(primary))))
        return
    buckets: dict = defaultdict(list)
    for i, key in enumerate(keys):
        if sizes[i]:
            buckets[key].append(i)
    for key, idx in buckets.items():
        yield (*key, idx)


def _agree(entries: list[torch.Tensor]) -> bool:
    order = memory_order(entries[0])
    return order is not None and all(memory_order(t) == order for t in entries[1:])


