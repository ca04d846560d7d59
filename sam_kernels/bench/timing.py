"""Timers: CUDA events on GPU, perf_counter on CPU; median and p20/p80 over repeats, and the CPU
time other processes used meanwhile (noise.py judges both).

On GPU the host never waits inside the timed interval: each repeat records a start and an end
event around the call, and the single ``torch.cuda.synchronize()`` comes after the last repeat.
A launch-bound implementation (a Python loop over parameters) therefore shows its real cost,
since the GPU idles between the events while the host is still launching.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .noise import CpuMonitor

L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MB, H200: 60 MB)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    cpu: Optional[dict] = None  # noise.CpuMonitor.others() over the timing (None: not measurable)

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without needing numpy."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    return Timing(statistics.median(samples_ms), quantile(samples_ms, 0.2), quantile(samples_ms, 0.8),
                  len(samples_ms))


class Timer:
    """Times a zero-argument callable on one device.

    ``flush_l2``: on GPU, overwrite a 256 MB buffer before each repeat (outside the timed
    interval) so every repeat starts with a cold L2, as llm.c and triton.testing.do_bench do.
    ``budget_s``: when the warmup calls show that ``repeats`` calls would take longer than this,
    time fewer (at least ``MIN_REPEATS``), so that a slow baseline on a big case cannot take a
    whole run hostage; the count used is reported with the timing.
    """

    MIN_REPEATS = 3

    def __init__(self, device: torch.device, *, warmup: int, repeats: int, flush_l2: bool = False,
                 budget_s: Optional[float] = None, cpu: Optional[CpuMonitor] = None):
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        self.device = device
        self.warmup = warmup
        self.repeats = repeats
        self.budget_s = budget_s
        self.is_cuda = device.type == "cuda"
        self.cpu = cpu or CpuMonitor()
        self._flush: Optional[torch.Tensor] = None
        if flush_l2 and self.is_cuda:
            self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)

    @property
    def flushes_l2(self) -> bool:
        return self._flush is not None

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> Timing:
        start = self.cpu.snap()
        timing = self._time(fn)
        timing.cpu = self.cpu.others(start)
        return timing

    def _time(self, fn: Callable[[], object]) -> Timing:
        t0 = time.perf_counter()
        for _ in range(self.warmup):
            fn()
        self.sync()
        repeats = self.repeats
        if self.budget_s is not None and self.warmup > 0:
            per_call = (time.perf_counter() - t0) / self.warmup
            repeats = max(min(self.MIN_REPEATS, repeats), min(repeats, int(self.budget_s / max(per_call, 1e-9))))
        if self.is_cuda:
            return summarize(self._time_cuda(fn, repeats))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return summarize(samples)

    def _time_cuda(self, fn: Callable[[], object], repeats: int) -> list[float]:
        events = []
        for _ in range(repeats):
            if self._flush is not None:
                self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in events]


class PhaseClock:
    """Marks phase boundaries inside one training step without host syncs (events on GPU).

    ``mark(name)`` closes the running interval and attributes it to ``name``;
    ``read()`` (after the step) returns milliseconds per phase name, summed.
    """

    def __init__(self, device: torch.device):
        self.is_cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self._start: object = None

    def _now(self):
        if self.is_cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self._marks = []
        self._start = self._now()

    def mark(self, name: str) -> None:
        self._marks.append((name, self._now()))

    def read(self) -> dict[str, float]:
        if self.is_cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        prev = self._start
        for name, t in self._marks:
            ms = prev.elapsed_time(t) if self.is_cuda else (t - prev) * 1e3
            out[name] = out.get(name, 0.0) + ms
            prev = t
        return out
