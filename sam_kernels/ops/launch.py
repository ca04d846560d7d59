"""One op call: its groups, the backend of each, and the record of what ran.

Fast path: a backend that checks its lists itself (the compiled ops, which reject a call before
writing anything) takes them whole, with no per-tensor Python work; that is the common case of an
optimizer step, run hundreds of times a second. Whatever it rejects comes to the checked path:
precise errors, grouping by (device, dtype, layout agreement), eager for the entries whose layouts
differ (:mod:`.layouts`). Every call leaves a :class:`dispatch.Record`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from . import dispatch, overlap
from .complex_views import as_real
from .contract import OPS
from .layouts import groups
from .lists import check_lists, numel_sum, pick

Tensors = Sequence[torch.Tensor]


def _whole(lst: Optional[Tensors]) -> Optional[Tensors]:
    return lst


_DEVICE_ERRORS = tuple(e for e in (getattr(torch, "AcceleratorError", None), getattr(torch, "OutOfMemoryError", None))
                       if e is not None)


def _unchecked_fn(op: str, primary: Tensors, backend: Optional[str]) -> Optional[tuple[str, Callable]]:
    """(name, function) of the backend when one that checks its own lists would serve the whole call."""
    if not isinstance(primary, list) or not primary or torch.compiler.is_compiling():
        return None
    first = primary[0]
    if not isinstance(first, torch.Tensor):
        return None
    name, fn, _ = dispatch.resolve(op, first.device.type, backend)
    if not dispatch.checks_lists(name):
        return None
    return name, fn


def launch(op: str, backend: Optional[str], call: Callable[[Callable, Callable, torch.device], Any],
           primary: Tensors, extra_lists: int = 0, **lists: Optional[Tensors]) -> list:
    """``call(fn, pick, device)`` once per group of the aligned lists; the results.

    ``pick(lst)`` selects the group's entries of any list aligned with ``primary`` (None stays None;
    complex entries of the tensor lists given here come as real views); ``device`` is the group's,
    where the op's device scalars (norms, dots) must be.
    The fast path and the checked path: see the module docstring. Memory shared between entries
    (:mod:`.overlap`) is refused by the compiled ops themselves; the checked path looks for it before
    any backend writes, and names the entries.
    """
    fast = _unchecked_fn(op, primary, backend)
    if fast is not None:
        name, fn = fast
        try:
            out = [call(fn, _whole, primary[0].device)]
        except _DEVICE_ERRORS:  # raised by a launch, after work may have run: never retried
            raise
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            pass
        else:
            dispatch.record(op, [dispatch.Part(name, primary[0].device.type, str(primary[0].dtype)[6:], len(primary),
                                               numel_sum(primary))], extra_lists)
            return out
    overlap.check(op, primary, lists)  # before any backend writes
    primary, lists, converted = as_real(primary, lists)
    check_lists(op, primary, **lists)
    results, parts = [], []
    per_row = OPS[op].per_row
    for device, dtype, fusable, idx in groups(primary, [lst for lst in lists.values() if lst is not None], per_row):
        if fusable:
            name, fn, fallback = dispatch.resolve(op, device.type, backend)
        else:
            name, fn, fallback = dispatch.eager(op, backend)
        results.append(call(fn, _picker(idx, converted), device))
        parts.append(dispatch.Part(name, device.type, str(dtype)[6:], len(idx), sum(primary[i].numel() for i in idx),
                                   fallback))
    dispatch.record(op, parts, extra_lists)
    return results


def _picker(idx: list[int], converted: dict) -> Callable:
    if not converted:
        return lambda lst: pick(lst, idx)
    return lambda lst: None if lst is None else pick(converted.get(id(lst), lst), idx)


def run_masks(op: str, scores: Tensors, backend: Optional[str], *args) -> list[torch.Tensor]:
    """A mask op on one device's scores. Masks rank in logical (row-major) order, so every backend
    gets contiguous scores (a copy of the others, once per mask refresh); the masks come back in each
    score's memory layout (``torch.preserve_format``), so masks of channels_last weights stay fused
    in ``perturb_``."""
    device = scores[0].device
    name, fn, fallback = dispatch.resolve(op, device.type, backend)
    contiguous = [s.is_contiguous() for s in scores]
    masks = fn([s if c else s.contiguous() for s, c in zip(scores, contiguous)], *args)
    masks = [m if c else torch.empty_like(s, dtype=torch.bool).copy_(m) for m, s, c in zip(masks, scores, contiguous)]
    dispatch.record(op, [dispatch.Part(name, device.type, str(scores[0].dtype)[6:], len(scores),
                                       sum(s.numel() for s in scores), fallback)])
    return masks
