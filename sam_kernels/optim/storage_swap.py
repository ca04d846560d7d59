"""The ascent that writes one list of weights instead of two (ours).

A SAM ascent keeps w and makes the params w + e. Written in place it stores both lists
(backup ← w, w ← w + e: 16 bytes per fp32 param with the two reads). Here the kernel writes
w + e into the backups and leaves the params alone (12 bytes), and then each param and its
backup trade storages: the param holds w + e in the memory its backup had, the backup holds w in
the param's. The values are the same, bitwise, as those of the in-place ascent; the descent
(which reads the backups and writes the params) and every restore run unchanged; the backups hold
the same values between steps. What changes is which memory a param uses: it alternates between
two buffers from one step to the next. That is seen only by whoever holds that memory some other
way, so a trade is made only when nothing else does (:func:`tradeable`): a view,
``.detach()`` or ``state_dict()`` tensor of the param, a buffer shared between params (a
flattened RNN, FSDP1), a tensor subclass (DTensor), all keep the in-place ascent.

What no count can show is memory read through a raw address kept from earlier: a CUDA graph
captured over the forward, or the step itself captured, replays with the old addresses. Those
exist on accelerators, so by default (``swap_storages=None``) the trade is made for CPU params
only; ``swap_storages=True`` makes it on any device, ``False`` never. See
docs/design/finite-check.md, "Bytes per parameter".
"""
from __future__ import annotations

from typing import Optional

import torch

from .._extension import host_helpers

_host = host_helpers()
_C_TRADEABLE = getattr(_host, "tradeable", None)
_C_SWAP = getattr(_host, "swap_storages", None)

# Below this mean size per tensor the trade's host work (about 0.3 µs a tensor) is near the bytes
# it saves; the same rule as the descent's in-pass check (base_step.IN_PASS_MIN_MEAN_NUMEL).
MIN_MEAN_NUMEL = 16384


def wanted(option: Optional[bool], device: Optional[torch.device], numel: int, count: int) -> bool:
    """Whether an ascent of ``count`` params of ``numel`` elements, all on ``device`` (None: on
    several), should write into the backups and trade storages; :func:`tradeable` then says whether
    it may."""
    if option is False or device is None or count == 0 or numel < MIN_MEAN_NUMEL * count:
        return False
    return option is True or device.type == "cpu"


def tradeable(params: list[torch.Tensor], backups: list[torch.Tensor]) -> bool:
    """Whether every param may trade storages with its backup (see the module docstring): plain
    strided tensors, not views, each the only tensor over its storage, with equal shape, strides,
    dtype and device, and a backup outside autograd."""
    if _C_TRADEABLE is not None:
        return bool(_C_TRADEABLE(params, backups))
    plain = (torch.Tensor, torch.nn.Parameter)
    return len(params) == len(backups) and all(
        type(p) in plain and type(b) in plain and p is not b and p.layout == torch.strided
        and b.layout == torch.strided and not p._is_view() and not b._is_view() and not b.requires_grad
        and p.dtype == b.dtype and p.device == b.device and p.shape == b.shape and p.stride() == b.stride()
        and _sole(p) and _sole(b)
        for p, b in zip(params, backups))


def swap(params: list[torch.Tensor], backups: list[torch.Tensor]) -> None:
    """After ``perturb_(params, grads, backups, ..., into_backups=True)``: params[i] and backups[i]
    trade storages, so the params hold w + e and the backups w. Each param's version counter is
    bumped (an autograd graph that saved the param sees the trade as an in-place write). Should the
    trade have become impossible since :func:`tradeable` said yes, the values are traded instead."""
    if _C_SWAP is not None and _C_SWAP(params, backups):
        return
    if _C_SWAP is None and tradeable(params, backups):
        for p, b in zip(params, backups):
            w = p.data
            p.data = b
            b.data = w
            torch.autograd.graph.increment_version(p)
        return
    with torch.no_grad():
        for p, b in zip(params, backups):
            w = p.clone()
            p.copy_(b)
            b.copy_(w)


def _sole(t: torch.Tensor) -> bool:
    """``t`` is the only tensor over its storage (the count includes the storage object made here)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2
