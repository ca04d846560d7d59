"""Parameters that share memory (ours).

Exact aliases, two Parameters over the same elements (weight tying by hand,
``b.weight.data = a.weight.data``), behave as ``torch.optim`` treats them: each Parameter's own
update is applied to the shared memory in turn. For a SAM step that means e = e_a + e_b at the
perturbed weights, the backups restore w, and the base optimizer's updates add up. The fused ops
read and write each list entry in one pass, so two entries over the same memory in one launch would
read one another's writes: the step loop splits aliases into *layers* (layer k holds the k-th
occurrence of each memory in a list) and launches one layer after the other; a layer has no
aliases inside it. The backups of layer k hold w plus the perturbations of layers < k, so
restoring the layers in reverse order gives w back bitwise.

Partial overlaps (views that share some elements but not all) have no such meaning and are refused.
Detection reads host metadata only (storage pointer, offset, shape, strides, dtype), once per
param set: at construction, ``add_param_group`` and ``load_state_dict``. Storage changed later
(``p.data = q.data`` after the optimizer was built) is not seen: tie parameters before building
the optimizer.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..ops.dtensor import is_dtensor

Key = tuple
"""(device, storage pointer, offset, shape, strides, dtype): the elements a tensor views."""


def _span(p: torch.Tensor) -> tuple[int, int]:
    """The byte range [lo, hi) of the storage ``p`` can touch (dims of size 0 excluded by the caller)."""
    size = p.element_size()
    lo = p.storage_offset() * size
    last = sum((n - 1) * abs(s) for n, s in zip(p.shape, p.stride()))
    return lo, lo + (last + 1) * size


def find(params: Iterable[torch.Tensor], owner: str = "SAM") -> dict[int, Key]:
    """``id(p) -> key`` for every param that exactly aliases another one (empty in the usual case).

    Raises ``ValueError`` when two params overlap in memory without viewing the same elements the
    same way (a partial overlap, or the same bytes as another shape or dtype)."""
    by_storage: dict = {}
    for i, p in enumerate(params):
        if p.numel() == 0 or is_dtensor(p) or p.device.type == "meta":  # no memory of its own to compare
            continue
        try:
            ptr = p.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):  # another wrapper subclass without a storage
            continue
        if ptr == 0:
            continue
        by_storage.setdefault((p.device, ptr), []).append((i, p))
    out: dict[int, Key] = {}
    for (device, ptr), members in by_storage.items():
        if len(members) < 2:
            continue
        spans: dict[Key, tuple] = {}
        count: dict[Key, int] = {}
        for i, p in members:
            key = (device, ptr, p.storage_offset(), tuple(p.shape), p.stride(), p.dtype)
            spans.setdefault(key, (*_span(p), i, p))
            count[key] = count.get(key, 0) + 1
        ordered = sorted(spans.values(), key=lambda s: s[0])
        for (lo0, hi0, i0, p0), (lo1, hi1, i1, p1) in zip(ordered, ordered[1:]):
            if lo1 < hi0:
                raise ValueError(f"{owner}: parameters {i0} (shape {tuple(p0.shape)}, {p0.dtype}) and {i1} (shape "
                                 f"{tuple(p1.shape)}, {p1.dtype}) overlap in memory without being the same view; "
                                 f"give each its own memory, or tie them exactly (same storage, offset, shape, "
                                 f"strides and dtype: b.weight = a.weight)")
        for i, p in members:
            key = (device, ptr, p.storage_offset(), tuple(p.shape), p.stride(), p.dtype)
            if count[key] > 1:
                out[id(p)] = key
    return out


def layers(params: list[torch.Tensor], keys: dict[int, Key]) -> Optional[list[int]]:
    """The layer of each of ``params`` (its occurrence rank among the entries over the same memory),
    or None when no two of them alias (always so without aliased params: no per-param work)."""
    if not keys:
        return None
    seen: dict[Key, int] = {}
    out = []
    for p in params:
        k = keys.get(id(p))
        n = 0 if k is None else seen.get(k, 0)
        if k is not None:
            seen[k] = n + 1
        out.append(n)
    return out if any(out) else None


def split(idx: list[int], layer: Optional[list[int]]) -> list[list[int]]:
    """``idx`` (indices into the list ``layer`` describes) by layer, layer 0 first; empty layers dropped."""
    if layer is None:
        return [idx]
    by: dict[int, list[int]] = {}
    for i in idx:
        by.setdefault(layer[i], []).append(i)
    return [by[k] for k in sorted(by)]
