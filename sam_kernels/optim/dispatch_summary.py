"""Which backend ran an optimizer step: the dispatch records of its op calls, summed per backend.

A step starts at ``first_step`` or ``base_step`` and runs until the next one starts
(``second_step`` and ``restore`` add to it). Steps run under ``torch.compile`` are not recorded
(the summary stays that of the last step run eagerly). ``SAM.dispatch_summary()`` returns the last step's
:class:`DispatchSummary`. Recording costs a list append per op call; element counts come from the
ops' own records (:mod:`sam_kernels.ops.dispatch`), computed on the host from tensor sizes.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ops import dispatch


@dataclass(frozen=True)
class DispatchSummary:
    """The op calls of one optimizer step (:class:`sam_kernels.ops.dispatch.Record`, in call order)."""
    records: tuple[dispatch.Record, ...]

    def elements(self) -> dict[str, int]:
        """backend -> elements it ran, summed over the step's op calls (an element counts once per op call)."""
        out: dict[str, int] = {}
        for r in self.records:
            for p in r.parts:
                out[p.backend] = out.get(p.backend, 0) + p.elements
        return out

    def by_op(self) -> dict[str, dict[str, int]]:
        """op -> backend -> elements, summed over that op's calls in the step."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            per = out.setdefault(r.op, {})
            for p in r.parts:
                per[p.backend] = per.get(p.backend, 0) + p.elements
        return out

    @property
    def fallback_elements(self) -> int:
        """Elements that ran eagerly although no one asked for eager (layouts that differ, no compiled backend)."""
        return sum(r.fallback_elements for r in self.records)

    @property
    def fused_share(self) -> float:
        """Fraction of the step's elements run by a compiled backend (1.0 for a step without elements)."""
        total = sum(r.elements() for r in self.records)
        return 1.0 if total == 0 else sum(r.fused_elements for r in self.records) / total

    def __str__(self) -> str:
        lines = [f"{'op':<22}" + "".join(f"{b:>14}" for b in self.elements()) + f"{'fallback':>14}"]
        for op, per in self.by_op().items():
            fallback = sum(r.fallback_elements for r in self.records if r.op == op)
            lines.append(f"{op:<22}" + "".join(f"{per.get(b, 0):>14,}" for b in self.elements()) + f"{fallback:>14,}")
        lines.append(f"fused share {100 * self.fused_share:.1f} %")
        return "\n".join(lines)


def records_step(starts_step: bool) -> Callable:
    """Decorator for an optimizer method: its op calls go to the current step's records
    (``starts_step``: they begin a new step)."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def recorded(self, *args, **kwargs):
            # Compiled steps record their op calls once, at trace time: their bytes are not counted, and
            # the step records stay the last eager step's (a trace that read and extended them would
            # be specialized on their length and recompiled at the next step).
            now = self.step_state
            compiling = torch.compiler.is_compiling()
            counters = None if compiling else now.telemetry
            outer = counters is not None and not counters.counting  # restore() inside second_step: count once
            if outer:
                counters.counting = True
            with dispatch.recording() as log:
                try:
                    return method(self, *args, **kwargs)
                finally:
                    if outer:
                        counters.counting = False
                        counters.add_bytes(log)  # the cost accounting of optim/telemetry.py (host arithmetic)
                    if compiling:
                        pass
                    elif starts_step or now.dispatch_log is None:
                        now.dispatch_log = list(log)
                    else:
                        now.dispatch_log.extend(log)
        return own_code(recorded)
    return wrap


def own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own, named after the method it wraps. torch.compile keeps its
    compiled variants and its recompile budget per code object: without this every decorated method
    (``first_step``, ``second_step``, ...) would share one budget, and a compiled ``first_step`` would
    count against ``second_step``'s."""
    names = {"co_name": fn.__name__}
    if hasattr(fn.__code__, "co_qualname"):  # Python >= 3.11
        names["co_qualname"] = fn.__qualname__
    code = fn.__code__.replace(**names)
    out = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return functools.update_wrapper(out, fn)


def had_layout_fallback(log: Optional[list]) -> bool:
    """Whether some tensors of a step's dispatch ``log`` ran eagerly because their layouts differ."""
    return any(p.fallback == "layout" for r in log or () for p in r.parts)
