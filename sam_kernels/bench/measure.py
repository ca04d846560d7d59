"""Paired, interleaved timing and the ratio intervals every verdict is taken from (ours).

A session times several implementations of the same work in one process, one call of each per
round (A, B, C, A, B, C, ...; the order rotates every round so no implementation always follows
the same one). Load hits the calls of one round alike, so the per-round ratio ``t_X / t_ref``
cancels most of it; the ratio of a row is the median of its per-round ratios.

Its interval is taken over BLOCKS of consecutive rounds, not over single rounds. On a busy machine
the ratio itself moves with the load (the per-parameter loop allocates a temporary per tensor and
suffers more from memory pressure than a fused step): measured on a 2-core machine at a load
average of 7, per-round log-ratios of the loop to ours had a lag-1 autocorrelation of 0.28 and
medians of 15 consecutive rounds ranged 1.51-2.33. Rounds are then not independent, and an
interval that treats them as independent (the sign test over rounds, or a bootstrap of rounds) is
too narrow: a session that stops after a few rounds inside a dip can give a "missed" that the
next run contradicts (tests/bench/test_measure.py shows it on synthetic timings drifting this
way). Here the rounds are split into ``n_blocks(n)`` consecutive blocks (6 to ``BLOCKS``, at
least ``MIN_BLOCK_ROUNDS`` rounds each once there are enough rounds; blocks grow with the rounds,
so the blocks' medians become nearly independent as a session goes on: the batch-means idea),
and the interval is the distribution-free interval of the median from the order statistics of
the block medians (the sign test's: [m_(k), m_(b+1-k)] of the sorted block
medians, k the largest with P(Binomial(b, 1/2) < k) <= (1 - level)/2). It assumes nothing about
the shape of the noise (bursts, skew) and is exact, so the same samples give the same interval.
``Interval.coverage`` is the level the order statistics reach; an interval whose coverage is
below the level asked for gives no verdict (``verdict.judge``).

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
BLOCKS = 10  # blocks of consecutive rounds at most (more rounds: longer blocks)
MIN_BLOCKS = 6  # the fewest blocks that reach 95 % (the range of 6 medians covers 96.9 %)
MIN_BLOCK_ROUNDS = 3
MIN_ROUNDS = MIN_BLOCKS * MIN_BLOCK_ROUNDS

Samples = dict[str, list[float]]  # implementation name -> seconds per call, one entry per round


@dataclass(frozen=True)
class Interval:
    """The median of per-round ratios and its interval (``level``, two-sided) from ``blocks`` block
    medians; ``coverage``: the level its order statistics reach (below ``level``: too few blocks)."""
    ratio: float
    low: float
    high: float
    rounds: int
    level: float = LEVEL
    blocks: int = 0
    coverage: float = 1.0

    def excludes(self, target: float) -> bool:
        """Whether the interval reaches its level and lies wholly on one side of ``target``."""
        return self.coverage >= self.level and (self.low >= target or self.high < target)


def _order_index(n: int, level: float) -> tuple[int, float]:
    """The k (1-based) of the median's interval [r_(k), r_(n+1-k)] and its coverage; k = 1 (the
    range, coverage below ``level``) when n is too small for ``level``."""
    alpha, k, below = (1 - level) / 2, 0, 0.0
    while k < n // 2:
        nxt = below + math.comb(n, k) / 2 ** n  # P(Binomial(n, 1/2) <= k)
        if nxt > alpha:
            break
        below, k = nxt, k + 1
    if k == 0:
        return 1, 1 - 2 / 2 ** n  # the range of n
    return k, 1 - 2 * below


def n_blocks(rounds: int) -> int:
    """Blocks the rounds are split into: ``BLOCKS`` at most, ``MIN_BLOCK_ROUNDS`` rounds each
    while that leaves ``MIN_BLOCKS``; below ``MIN_BLOCKS`` rounds, one round a block."""
    return min(BLOCKS, max(rounds // MIN_BLOCK_ROUNDS, min(rounds, MIN_BLOCKS)))


def block_medians(ratios: Sequence[float]) -> list[float]:
    """Medians of ``n_blocks(len(ratios))`` consecutive blocks of near-equal length, in round order."""
    n, b = len(ratios), n_blocks(len(ratios))
    edges = [i * n // b for i in range(b + 1)]
    return [statistics.median(ratios[edges[i]:edges[i + 1]]) for i in range(b)]


def ratio_interval(num: Sequence[float], den: Sequence[float], *, level: float = LEVEL) -> Interval:
    """``median(num[i] / den[i])`` over paired rounds ``i`` (in round order) and its interval from
    block medians (see the module docstring).

    Raises ValueError when the lists differ in length, are empty, or hold a non-positive time.
    """
    if len(num) != len(den) or not num:
        raise ValueError(f"paired samples needed: got {len(num)} and {len(den)} rounds")
    if min(num) <= 0 or min(den) <= 0:
        raise ValueError("times must be positive")
    ratios = [a / b for a, b in zip(num, den)]
    medians = sorted(block_medians(ratios))
    b = len(medians)
    k, coverage = _order_index(b, level)
    return Interval(statistics.median(ratios), medians[k - 1], medians[b - k], len(ratios), level, b, coverage)


def quantiles_ms(seconds: Sequence[float]) -> dict:
    """median, p20 and p80 of one implementation's calls, in milliseconds."""
    t = torch.tensor(seconds, dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}


def time_call(fn: Callable[[], object]) -> float:
    """Seconds of one call, the accelerator synchronized before and after; ``fn.prepare()`` first,
    untimed, where ``fn`` has one (a step's fresh gradients)."""
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
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
