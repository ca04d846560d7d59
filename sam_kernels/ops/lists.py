"""Checks of the aligned tensor lists every op takes, with a precise error for the first bad entry."""
from __future__ import annotations

from itertools import repeat
from operator import is_not
from typing import Optional, Sequence

import torch

from .._extension import host_helpers
from .contract import FLOATS

_host = host_helpers()

Tensors = Sequence[torch.Tensor]


def require_list(op: str, lst: Tensors) -> None:
    if not isinstance(lst, (list, tuple)):
        raise TypeError(f"{op}: expected a list of tensors, got {type(lst).__name__}")


def check_lists(op: str, primary: Tensors, **others: Optional[Tensors]) -> None:
    """Validate aligned lists: same length, same shapes, same device; float/bool dtypes; dense.

    The common valid case is checked with whole-list attribute comparisons (this runs on every
    optimizer step, hundreds of tensors per list); any failure reruns the per-entry checks to
    produce a precise message.
    """
    require_list(op, primary)
    lists = {name: lst for name, lst in others.items() if lst is not None}
    for name, lst in lists.items():
        if not isinstance(lst, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list of tensors, got {type(lst).__name__}")
        if len(lst) != len(primary):
            raise ValueError(f"{op}: {name} has {len(lst)} tensors but the first list has {len(primary)}")
    try:
        dtypes = [t.dtype for t in primary]
        ok = all(t.layout == torch.strided for t in primary) and all(d in FLOATS for d in dtypes)
        if ok and lists:
            shapes, devices = [t.shape for t in primary], [t.device for t in primary]
            for name, lst in lists.items():
                want = [torch.bool] * len(lst) if name == "masks" else dtypes
                ok = ok and ([t.dtype for t in lst] == want and [t.shape for t in lst] == shapes
                             and [t.device for t in lst] == devices
                             and all(t.layout == torch.strided for t in lst))
    except AttributeError:  # a non-tensor entry: the slow path names it
        ok = False
    if not ok:
        _explain_bad_lists(op, primary, lists)


def _explain_bad_lists(op: str, primary: Tensors, lists: dict) -> None:
    """Per-entry checks that raise a precise error for the first bad entry."""
    for i, t in enumerate(primary):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: entry {i} is {type(t).__name__}, not a tensor (drop parameters without grads)")
        if t.layout != torch.strided:
            raise TypeError(f"{op}: entry {i} is a {t.layout} tensor; sparse gradients are not supported "
                            f"(use dense gradients, e.g. nn.Embedding(sparse=False))")
        if t.dtype not in FLOATS:
            raise TypeError(f"{op}: entry {i} has dtype {t.dtype}; supported: float32, float64, float16, bfloat16 and their complex types")
        for name, lst in lists.items():
            o = lst[i]
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is {type(o).__name__}, not a tensor")
            if o.layout != torch.strided:
                raise TypeError(f"{op}: {name}[{i}] is a {o.layout} tensor; sparse tensors are not supported")
            if o.shape != t.shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(o.shape)}, expected {tuple(t.shape)}")
            if o.device != t.device:
                raise ValueError(f"{op}: {name}[{i}] is on {o.device} but entry {i} is on {t.device}")
            if name == "masks":
                if o.dtype != torch.bool:
                    raise TypeError(f"{op}: masks[{i}] has dtype {o.dtype}; masks must be torch.bool")
            elif o.dtype != t.dtype:
                raise TypeError(f"{op}: {name}[{i}] has dtype {o.dtype} but entry {i} has {t.dtype}; "
                                f"keep optimizer buffers in the parameter's dtype")
    raise AssertionError(f"{op}: list check failed without a reason")  # unreachable: fast and slow checks agree


def pick(lst: Optional[Tensors], idx: list[int]) -> Optional[list[torch.Tensor]]:
    return None if lst is None else [lst[i] for i in idx]


def none_at(items: Sequence) -> list[int]:
    """The indices of the None entries of ``items``. Runs every step over every param (first-step
    buffers, backups), where there are usually none: that case is one pass without Python code per
    entry."""
    if all(map(is_not, items, repeat(None))):
        return []
    return [i for i, x in enumerate(items) if x is None]


def numel_sum(tensors: Tensors) -> int:
    """The elements of ``tensors`` together. Every op call counts them for its record: one C pass
    (``_C.numel_sum``) for a list of plain tensors, a Python one otherwise."""
    total = None if _host is None else _host.numel_sum(tensors)
    return sum(map(torch.Tensor.numel, tensors)) if total is None else total
