"""Paired interleaved timing, ratio intervals and verdicts (sam_kernels/bench/measure.py, verdict.py),
on synthetic timings: no clock is read, nothing here depends on the machine's speed."""
import math
import random

import pytest

from sam_kernels.bench.measure import Interval, ratio_interval, run_rounds
from sam_kernels.bench.verdict import VS_COMPILE_LARGE, VS_COMPILE_SMALL, VS_LOOP, all_judged, judge, target


def test_ratio_is_the_median_of_per_round_ratios():
    iv = ratio_interval([2.0, 4.0, 6.0, 100.0, 8.0], [1.0, 2.0, 2.0, 1.0, 4.0])  # ratios 2, 2, 3, 100, 2
    assert iv.ratio == 2.0 and iv.rounds == 5
    assert iv.low == 2.0 and 2.0 <= iv.high <= 100.0


def test_constant_ratio_gives_a_point_interval():
    iv = ratio_interval([3.0] * 6, [1.5] * 6)
    assert (iv.ratio, iv.low, iv.high) == (2.0, 2.0, 2.0)


def test_interval_is_the_sign_test_order_statistics():
    """P(Binomial(9, 1/2) <= 1) = 10/512 <= 2.5 % < P(<= 2) = 46/512: the 2nd and 8th of 9 ratios;
    for 99 % (0.5 % a side) only the range; below 6 rounds no k reaches 95 %: the range."""
    ratios = [5.0, 1.0, 9.0, 3.0, 2.0, 8.0, 4.0, 7.0, 6.0]
    iv = ratio_interval(ratios, [1.0] * 9)
    assert (iv.ratio, iv.low, iv.high, iv.rounds) == (5.0, 2.0, 8.0, 9)
    iv99 = ratio_interval(ratios, [1.0] * 9, level=0.99)
    assert (iv99.low, iv99.high) == (1.0, 9.0)
    small = ratio_interval([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)
    assert (small.low, small.high) == (1.0, 5.0)
    # 30 rounds: P(B <= 9) = 2.14 % <= 2.5 % < P(B <= 10) = 4.94 %: the 10th and 21st
    big = ratio_interval([float(i) for i in range(1, 31)], [1.0] * 30)
    assert (big.low, big.high) == (10.0, 21.0)


@pytest.mark.parametrize("num, den", [([1.0], [1.0, 2.0]), ([], []), ([1.0, 0.0], [1.0, 1.0]),
                                      ([1.0, 1.0], [1.0, -1.0])])
def test_bad_samples_raise(num, den):
    with pytest.raises(ValueError):
        ratio_interval(num, den)


def test_judge():
    assert judge(Interval(1.3, 1.2, 1.4, 9), 1.2) == "met"  # the low end on the target counts
    assert judge(Interval(1.0, 0.9, 1.19, 9), 1.2) == "missed"
    assert judge(Interval(1.2, 1.1, 1.3, 9), 1.2) == "unresolved"
    assert judge(Interval(1.2, 1.1, 1.3, 9), None) is None and judge(None, 1.2) is None


def test_targets():
    assert target("compile", "large") == pytest.approx(1 / 0.9) == VS_COMPILE_LARGE
    assert target("compile", "small") == VS_COMPILE_SMALL == 2.0
    assert target("loop", "large") == target("loop", "small") == VS_LOOP == 1.6
    assert target("foreach", "large") is None and target("cpp-nocheck", "small") is None


def test_rounds_rotate_the_order():
    calls = []
    run_rounds(["a", "b", "c"], lambda n: calls.append(n) or 1.0, min_rounds=3, max_rounds=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_rounds_stop_at_min_rounds_when_resolved_and_at_the_deadline():
    clock = [0.0]

    def sample(name):
        clock[0] += 1.0
        return 1.0

    s = run_rounds(["a", "b"], sample, resolved=lambda s: True, min_rounds=4, max_rounds=50, now=lambda: clock[0])
    assert len(s["a"]) == len(s["b"]) == 4
    clock[0] = 0.0
    s = run_rounds(["a", "b"], sample, min_rounds=2, max_rounds=50, deadline=10.5, now=lambda: clock[0])
    assert len(s["a"]) == 6  # 2 s per round: past 10.5 s after the 6th
    s = run_rounds(["a", "b"], sample, min_rounds=2, max_rounds=7)
    assert len(s["a"]) == 7
    with pytest.raises(ValueError):
        run_rounds(["a"], sample, min_rounds=0)


class BusyMachine:
    """Synthetic timings on a loaded machine: each call takes its true time times a load factor
    that drifts slowly (a random walk between 1x and 4x, bursts included) and times its own 5 %
    jitter; the fake clock advances by each call's time."""

    def __init__(self, true_s: dict[str, float], seed: int):
        self.true_s, self.rng, self.load, self.clock = true_s, random.Random(seed), 1.5, 0.0

    def sample(self, name: str) -> float:
        self.load = min(4.0, max(1.0, self.load * math.exp(self.rng.gauss(0.0, 0.08))))
        if self.rng.random() < 0.02:  # a burst: another job starts or stops
            self.load = self.rng.uniform(1.0, 4.0)
        t = self.true_s[name] * self.load * math.exp(self.rng.gauss(0.0, 0.05))
        self.clock += t
        return t

    def now(self) -> float:
        return self.clock


# ours = 10 ms; true ratios of the others: clearly above, clearly below, and on their target
TRUE = {"ours": 0.010, "compile": 0.0125, "loop": 0.014, "foreach": 0.0115, "pyopt": 0.020}
GOALS = {"compile": VS_COMPILE_LARGE, "loop": VS_LOOP, "foreach": 1.15, "pyopt": VS_LOOP}
EXPECTED = {"compile": "met", "loop": "missed", "pyopt": "met"}  # foreach sits on its target: either way


def _verdicts(seed: int, budget_s: float) -> dict[str, str]:
    m = BusyMachine(TRUE, seed)
    samples = run_rounds(list(TRUE), m.sample, resolved=lambda s: all_judged(s, "ours", GOALS), min_rounds=5,
                         max_rounds=400, deadline=budget_s, now=m.now)
    return {p: judge(ratio_interval(samples[p], samples["ours"]), g) for p, g in GOALS.items()}


def test_three_runs_on_a_busy_machine_agree_on_every_verdict_they_give():
    """Load swings up to 4x between rounds (unpaired times would overlap completely); paired
    ratios still give the right verdicts, and no two runs contradict each other."""
    for first_seed in (0, 10, 20):
        runs = [_verdicts(first_seed + k, budget_s=30.0) for k in range(3)]
        for p in GOALS:
            given = {run[p] for run in runs} - {"unresolved"}
            assert len(given) <= 1, (first_seed, p, runs)
        for p, want in EXPECTED.items():
            assert all(run[p] == want for run in runs), (first_seed, p, runs)


def test_a_row_on_its_target_is_not_judged_both_ways():
    """A true ratio exactly on the target: whatever individual runs say, never "met" in one and
    "missed" in another of three in a row, over many triples."""
    for first_seed in range(0, 60, 3):
        runs = [_verdicts(first_seed + k, budget_s=5.0) for k in range(3)]
        assert {run["foreach"] for run in runs} != {"met", "missed"} \
            and not {"met", "missed"} <= {run["foreach"] for run in runs}, runs
