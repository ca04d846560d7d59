"""Whether the gradients ``step(closure)`` finds are a first pass (ours).

Gradients that exist are not always a first pass: after ``zero_grad(set_to_none=False)`` they are
zeros, and after a step without ``zero_grad`` they are the last step's g(w + e). Their values
cannot be read without a host sync, so the optimizer watches the backward instead: a post-accumulate
gradient hook on each parameter notes that a backward wrote some gradient. The note is cleared at
the end of every optimizer step and by the optimizer's ``zero_grad``. FSDP2 writes the sharded
parameters' gradients outside autograd (its hooks never fire there): for DTensor parameters the
identity and version counter of each gradient (host metadata) taken at the clear are compared
instead.
"""
from __future__ import annotations

import functools
import itertools
import operator
import weakref
from typing import Iterable, Optional

import torch

from ..ops import dtensor


def _note(watch_ref: "weakref.ref[BackwardWatch]", param: torch.Tensor) -> None:
    watch = watch_ref()
    if watch is not None:
        watch.seen = True


_requires_grad = operator.attrgetter("requires_grad")


def _grad_mark(p: torch.Tensor) -> Optional[tuple[int, int]]:
    g = p.grad
    return None if g is None else (id(g), g.to_local()._version)


class BackwardWatch:
    """Knows, without reading any tensor data, whether a backward wrote a gradient of the watched
    parameters since :meth:`clear` (``SAM.step_state.backward``)."""

    def __init__(self):
        self.seen = False
        self._hooked: dict[int, weakref.ref] = {}  # id(param) -> the param (tensors compare by value)
        self._handles: list = []
        self._marks: dict[int, Optional[tuple[int, int]]] = {}  # id(DTensor param) -> its grad's mark
        self._params: list[torch.Tensor] = []  # the params of the last clear (unchanged: nothing to hook)
        self._dtensors: list[torch.Tensor] = []
        self._unhooked: list[torch.Tensor] = []  # the params that did not require grad at the last scan (frozen)
        weakref.finalize(self, _remove, self._handles)  # a dropped optimizer leaves no live hooks

    def clear(self, params: Iterable[torch.Tensor]) -> None:
        """From now on, count only later backwards (end of a step, ``zero_grad``); watch new params."""
        self.seen = False
        if torch.compiler.is_compiling():  # a compiled step: hooks and metadata are the eager caller's
            return
        params = list(params)
        if (len(params) != len(self._params) or not all(map(operator.is_, params, self._params))
                or any(map(_requires_grad, self._unhooked))):  # unfrozen since: hook them
            self._watch(params)
        self._marks = {id(p): _grad_mark(p) for p in self._dtensors}

    def _watch(self, params: list[torch.Tensor]) -> None:
        """Hook the params not hooked yet; note the DTensor ones (their hooks would never fire)."""
        self._params = params
        self._dtensors = [p for p in params if dtensor.is_dtensor(p)]
        self._unhooked = list(itertools.filterfalse(_requires_grad, params))
        for p in params:
            if (p.requires_grad and not dtensor.is_dtensor(p)
                    and (id(p) not in self._hooked or self._hooked[id(p)]() is not p)):
                self._handles.append(p.register_post_accumulate_grad_hook(
                    functools.partial(_note, weakref.ref(self))))
                self._hooked[id(p)] = weakref.ref(p)

    def ran(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether a backward wrote any of ``params``' gradients since the last :meth:`clear`."""
        if self.seen or not self._dtensors:
            return self.seen
        return any(id(p) in self._marks and _grad_mark(p) != self._marks[id(p)]
                   for p in params if dtensor.is_dtensor(p))

    def __getstate__(self) -> dict:
        # a copy watches its own parameters (hooked at its next clear); until then nothing is known
        return {"seen": False}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.seen = state["seen"]


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()
