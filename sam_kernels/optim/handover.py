"""Gradients handed over by ``second_step(zero_grad=True)`` (ours): the fused SGD descent with the finite
check in its pass (:class:`.base_step.InPassCheck`) writes the new momentum buffers over g(w + e)
instead of into spare buffers, and the gradient tensors become the ``momentum_buffer`` entries.

Why: a spare buffer is memory the step writes without having read it (on a CPU every line is read
first, write-allocate), 8-16 % of the descent's time on one thread, and it holds 4 B per parameter
more than torch.optim.SGD. A gradient the caller has given up is read in that pass anyway: writing
the new buffer over it reads nothing more, and the old buffers are freed (no spares at all).

A gradient is taken only when nothing else can see it:

- the caller asked ``zero_grad=True`` (it sets ``p.grad`` to None after the step anyway);
- no optimizer step post hook is registered (they run after the update and may read ``p.grad``);
- the tensor is ``p.grad``'s alone: no Python reference other than ``p.grad`` and the descent's list
  of the gradients (``sys.getrefcount``),
  not a view, a storage no other tensor uses (a custom autograd Function may return two gradients
  over one storage), a plain strided ``torch.Tensor`` outside any autograd graph (not the gradient
  of a ``create_graph=True`` backward); the kernel checks its layout against the parameter's
  before writing anything, as it does for the gradients;
- it has at least :data:`MIN_NUMEL` elements.

Anything else keeps its spare buffer and its gradient. The gradients taken are set to None after
the descent whether it succeeds or raises (:meth:`.base_step.InPassCheck.release`): their memory
then holds momentum, never a gradient.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from .contract import has_post_hooks

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; absent: nothing is taken


def _refcounts(grads: list[torch.Tensor]) -> list[int]:
    return list(map(sys.getrefcount, grads))


def _sole_refcount() -> Optional[int]:
    """What :func:`_refcounts` gives for a gradient that only ``p.grad`` and the descent's one list
    hold, measured on this interpreter (which may count the call's own references or not), or None
    when one more holder does not show."""
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    grads = [p.grad]
    sole = _refcounts(grads)[0]
    held = p.grad
    seen = _refcounts(grads)[0]
    del held
    return sole if seen == sole + 1 and _refcounts(grads)[0] == sole else None


_SOLE = _sole_refcount()

MIN_NUMEL = 16384
"""Smaller gradients keep their spare buffers: the look costs about 0.6 us of Python per tensor (2,000
tensors of 64 elements: 1.2 ms a step, more than their whole descent), while a spare of up to 64 KB
(fp32) stays in cache, where writing it costs next to nothing."""


def sole_grads(sam, params: list[torch.Tensor], grads: list[torch.Tensor]) -> Optional[set[int]]:
    """ids of the ``params`` whose gradient the descent may take, or None when it may take none.
    ``grads``: the params' gradients, in the one list that holds them besides ``p.grad`` (call it
    before anything else holds them: each reference counts)."""
    if not sam.step_state.zero_grad or _storage_use_count is None or _SOLE is None:
        return None
    if has_post_hooks(sam) or has_post_hooks(sam.base_optimizer):
        return None
    counts = _refcounts(grads)
    return {id(p) for p, g, n in zip(params, grads, counts) if n == _SOLE and p.numel() >= MIN_NUMEL and _alone(g)}


def _alone(g: torch.Tensor) -> bool:
    # 2: g's own tensor, and the storage object the call makes
    return (type(g) is torch.Tensor and g.layout == torch.strided and not g._is_view() and not g.requires_grad
            and _storage_use_count(g.untyped_storage()._cdata) == 2)
