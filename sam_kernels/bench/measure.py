"""Paired, interleaved timing and the ratio intervals every verdict is taken from (ours).

A session times several implementations of the same work in one process, one call of each per
round (A, B, C, A, B, C, ...; the order rotates every round so no implementation always follows
the same one). Load that drifts over seconds hits the calls of one round alike, so the per-round
ratio ``t_X / t_ref`` cancels it; the ratio of a row is the median of its per-round ratios, and
its interval the distribution-free interval of that median from order statistics (the sign
test's: [r_(k), r_(n+1-k)] of the sorted ratios, k the largest with P(Binomial(n, 1/2) < k) <=
(1 - level)/2). It assumes nothing about the shape of the noise (bursts, skew), its coverage is
at least ``level`` from 6 rounds on (95 %), and it is exact, so the same samples give the same
interval. (A percentile bootstrap of the median covers less than its level at these round
counts: on synthetic busy-machine timings it let three runs contradict each other.)

Each call is timed with ``torch.utils.benchmark.timer`` (``timeit.default_timer`` after
synchronizing the accelerator), so the queued kernels of one implementation never spill into the
next one's interval; on a GPU this is wall time including launch overhead, which is what a
Python loop over parameters costs.

A session stops when ``resolved(samples)`` says every verdict it waits for is given, after
``min_rounds``, or when its deadline passes, or at ``max_rounds``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.benchmark import timer as synchronized_timer

LEVEL = 0.95
STOP_LEVEL = 0.99
MIN_ROUNDS = 8

Samples = dict[str, list[float]]  # implementation name -> seconds per call, one entry per round


@dataclass(frozen=True)
class Interval:
    """The median of per-round ratios and its bootstrap interval (``level``, two-sided)."""
    ratio: float
    low: float
    high: float
    rounds: int
    level: float = LEVEL

    def excludes(self, target: float) -> bool:
        return self.low >= target or self.high < target


def _order_index(n: int, level: float) -> int:
    """The k (1-based) of the median's interval [r_(k), r_(n+1-k)]; 1 (the range) when n is too
    small for ``level``."""
    alpha, k, below = (1 - level) / 2, 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2 ** n  # P(Binomial(n, 1/2) <= k)
        if below > alpha:
            break
        k += 1
    return max(k, 1)


def ratio_interval(num: Sequence[float], den: Sequence[float], *, level: float = LEVEL) -> Interval:
    """``median(num[i] / den[i])`` over paired rounds ``i`` and its interval (see the module docstring).

    Raises ValueError when the lists differ in length, are empty, or hold a non-positive time.
    """
    if len(num) != len(den) or not num:
        raise ValueError(f"paired samples needed: got {len(num)} and {len(den)} rounds")
    if min(num) <= 0 or min(den) <= 0:
        raise ValueError("times must be positive")
    r = sorted(a / b for a, b in zip(num, den))
    n = len(r)
    k = _order_index(n, level)
    return Interval(statistics.median(r), r[k - 1], r[n - k], n, level)


def quantiles_ms(seconds: Sequence[float]) -> dict:
    """median, p20 and p80 of one implementation's calls, in milliseconds."""
    t = torch.tensor(seconds, dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}


def time_call(fn: Callable[[], object]) -> float:
    """Seconds of one call, the accelerator synchronized before and after."""
    t0 = synchronized_timer()
    fn()
    return synchronized_timer() - t0


def run_rounds(names: Sequence[str], sample: Callable[[str], float], *,
               resolved: Callable[[Samples], bool] = lambda s: False, min_rounds: int = MIN_ROUNDS,
               max_rounds: int = 1000, deadline: float = math.inf,
               now: Callable[[], float] = time.perf_counter,
               on_round: Optional[Callable[[int, Samples], None]] = None) -> Samples:
    """Interleaved rounds: ``sample(name)`` once per name per round (rotating order) until stopped.

    ``sample`` returns seconds (``time_call`` of the real thing, or a synthetic value in tests);
    ``now`` is the clock the deadline is read on.
    """
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    samples: Samples = {name: [] for name in names}
    for r in range(max_rounds):
        k = r % len(names)
        for name in list(names[k:]) + list(names[:k]):
            samples[name].append(sample(name))
        if on_round is not None:
            on_round(r + 1, samples)
        if r + 1 >= min_rounds and (now() >= deadline or resolved(samples)):
            break
    return samples
