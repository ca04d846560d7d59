"""One look per step call at every param: its gradient, dtype, device and size (ours).

A step call reads, for every param, whether it has a gradient, the gradient, whether it is sparse,
the param's dtype and device (to follow a cast, :mod:`.follow`) and its element count. As Python
passes each costs 0.1-0.15 ms on 2,000 tensors (2-core CPU), and a step took a dozen of them; the
compiled extension's ``_C.scan`` reads them all in one C pass (0.04 ms; csrc/host.cpp). Without the
extension, or for tensor subclasses (DTensor), the same answers come from Python.

The scan is taken where the call looks for casts (:meth:`.upkeep.ParamUpkeep._follow_casts`, at the
start of each step call) and handed to the first reader of the gradients in that call
(:func:`take`); nothing keeps it past the call (``StepShells._run_body`` drops it).

The (group, param) entries are kept between steps: they change only when the param groups do, which
one comparison of the groups' identities and lengths and one of the params' identities finds.
"""
from __future__ import annotations

import operator
from itertools import chain
from typing import Optional

import torch

from .._extension import host_helpers
from . import follow

_host = host_helpers()


class ParamScan:
    """What one look at every param of the optimizer found (aligned lists, in group order)."""

    __slots__ = ("entries", "grads", "signature", "numel", "missing", "sparse", "device")

    def __init__(self, entries: list, grads: list, signature, numel: int, missing: bool, sparse: bool,
                 device: Optional[torch.device]):
        self.entries = entries  # (param group, param) of every param
        self.grads = grads  # p.grad of each, None where it has none
        self.signature = signature  # equal between two scans exactly when no param changed dtype or device
        self.numel = numel  # elements of all params
        self.missing = missing  # some param has no gradient
        self.sparse = sparse  # some gradient is sparse (COO)
        self.device = device  # the device of every param, None when they are on several


class EntryCache:
    """The (group, param) entries of the last scan, reused while the groups hold the same params."""

    def __init__(self):
        self._key: tuple = ()
        self._params: list[torch.Tensor] = []
        self._entries: list = []

    def entries(self, param_groups: list[dict], params: list[torch.Tensor]) -> list:
        key = tuple((id(g), len(g["params"])) for g in param_groups)
        if key != self._key or len(params) != len(self._params) or not all(map(operator.is_, params, self._params)):
            self._key, self._params = key, params
            self._entries = [(g, p) for g in param_groups for p in g["params"]]
        return self._entries

    def __getstate__(self) -> dict:  # a copy of the optimizer builds its own at its first step
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def scan(param_groups: list[dict], cache: EntryCache) -> ParamScan:
    """Look at every param of ``param_groups`` once (see the module docstring)."""
    params = list(chain.from_iterable(g["params"] for g in param_groups))
    entries = cache.entries(param_groups, params)
    found = None if _host is None or not params else _host.scan(params)
    if found is not None:
        grads, signature, numel, flags = found
        device = None if flags & 4 else params[0].device
        return ParamScan(entries, grads, signature, numel, bool(flags & 1), bool(flags & 2), device)
    grads = [p.grad for p in params]
    return ParamScan(entries, grads, follow.signature(params), sum(map(torch.Tensor.numel, params)),
                     any(g is None for g in grads), any(g is not None and g.is_sparse for g in grads),
                     follow.one_device(params) if params else None)


def take(sam) -> tuple[list, list[torch.Tensor], bool, Optional[ParamScan]]:
    """The (group, param) entries and gradients of the params with a gradient (in group order),
    whether some gradient is sparse, and the scan they come from without its ``grads`` (None in a
    compiled step): the returned list is the only one holding the gradients (:mod:`.handover` counts
    the references). Uses this call's scan when there is one (it is then used up), else scans now."""
    now = sam.step_state
    if torch.compiler.is_compiling():  # a graph holds no scan (its object) and calls no host helper
        entries = [(g, p) for g in sam.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for _, p in entries]
        return entries, grads, any(g.is_sparse for g in grads), None
    found, now.scan = now.scan, None
    if found is None:
        found = scan(sam.param_groups, now.entry_cache)
    grads, found.grads = found.grads, None
    if not found.missing:
        return list(found.entries), grads, found.sparse, found
    keep = [i for i, g in enumerate(grads) if g is not None]
    entries = found.entries
    return [entries[i] for i in keep], [grads[i] for i in keep], found.sparse, found
