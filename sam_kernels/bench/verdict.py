"""Targets and verdicts: a verdict only where a ratio's interval clears its target by a margin.

Ratios are ``time of the row / time of the reference`` (ours at default settings, measured in
the same rounds), so a ratio above 1 means ours is that many times faster. Targets (ours,
fixed by the project for the SAM optimizer step, SGD momentum, fp32):

- ``compile`` (``torch.compile`` of the hand-written foreach step): ratio >= 1/0.9 on the large
  lists (ours at most 0.9x its time), >= 2 on the small-tensor list;
- ``loop`` (the popular SAM class's per-parameter loop): ratio >= 1.6 on every list.

Verdict: ``met`` when the whole interval is at or above the target by the between-runs margin
(``low >= target·(1 + BETWEEN_RUNS)``), ``missed`` when it is below by it (``high <
target/(1 + BETWEEN_RUNS)``), ``unresolved`` otherwise, or when the interval has too few blocks of
rounds to reach its level. Rows without a target get no verdict.

Why the margin: the interval covers the variation within one process, and a ratio also moves
between processes (memory placement, what the neighbouring jobs do). Measured on a 2-core CPU VM
within an hour, five runs of the default benchmark at load averages of 1.5-3.3 gave the compile
row of the ResNet-50 list 1.02, 0.99, 1.14, 1.00 and 0.98 (one run's interval [1.13, 1.16], the
next one's [0.98, 1.02]) and the loop row of the GPT-2 blocks 2.14, 2.19, 2.06, 2.15 and 2.44: a run's
median lay up to 14 % from the others'. Without the margin two of those runs gave opposite verdicts
on one row; with it, every verdict a run gives holds in the others.
"""
from __future__ import annotations

from typing import Optional

from .measure import STOP_LEVEL, Interval, Samples, ratio_interval

VS_COMPILE_LARGE = 1 / 0.9
VS_COMPILE_SMALL = 2.0
VS_LOOP = 1.6
BETWEEN_RUNS = 0.12  # relative, see the module docstring


def target(provider: str, case_kind: str) -> Optional[float]:
    """The ratio ``provider``'s time / ours must reach on a list of ``case_kind`` ("large" or "small")."""
    if provider == "compile":
        return VS_COMPILE_SMALL if case_kind == "small" else VS_COMPILE_LARGE
    if provider == "loop":
        return VS_LOOP
    return None


def judge(interval: Optional[Interval], goal: Optional[float], margin: float = BETWEEN_RUNS) -> Optional[str]:
    """"met" / "missed" / "unresolved", or None without a target or an interval; ``margin``: the
    relative between-runs margin the interval must clear the target by (0: the interval alone)."""
    if goal is None or interval is None:
        return None
    if interval.coverage < interval.level:
        return "unresolved"
    if interval.low >= goal * (1 + margin):
        return "met"
    if interval.high < goal / (1 + margin):
        return "missed"
    return "unresolved"


def all_judged(samples: Samples, ours: str, goals: dict[str, float], margin: float = BETWEEN_RUNS) -> bool:
    """Whether every row in ``goals`` (provider -> target) already has a verdict: the stopping rule
    of a session. It looks after every round, so it asks for the wider ``STOP_LEVEL`` interval
    (8 blocks at least): a verdict reached by chance at one of many looks must not end the session."""
    return all(judge(ratio_interval(samples[p], samples[ours], level=STOP_LEVEL), g, margin) != "unresolved"
               for p, g in goals.items())
