"""Targets and verdicts: a verdict only where a ratio's interval excludes its target.

Ratios are ``time of the row / time of the reference`` (ours at default settings, measured in
the same rounds), so a ratio above 1 means ours is that many times faster. Targets (ours,
fixed by the project for the SAM optimizer step, SGD momentum, fp32):

- ``compile`` (``torch.compile`` of the hand-written foreach step): ratio >= 1/0.9 on the large
  lists (ours at most 0.9x its time), >= 2 on the small-tensor list;
- ``loop`` (the popular SAM class's per-parameter loop): ratio >= 1.6 on every list.

Verdict: ``met`` when the whole interval is at or above the target, ``missed`` when it is wholly
below, ``unresolved`` when it contains the target or has too few blocks of rounds to reach its
level (then more rounds, or a quieter machine, would decide). Rows without a target get no verdict.
"""
from __future__ import annotations

from typing import Optional

from .measure import STOP_LEVEL, Interval, Samples, ratio_interval

VS_COMPILE_LARGE = 1 / 0.9
VS_COMPILE_SMALL = 2.0
VS_LOOP = 1.6


def target(provider: str, case_kind: str) -> Optional[float]:
    """The ratio ``provider``'s time / ours must reach on a list of ``case_kind`` ("large" or "small")."""
    if provider == "compile":
        return VS_COMPILE_SMALL if case_kind == "small" else VS_COMPILE_LARGE
    if provider == "loop":
        return VS_LOOP
    return None


def judge(interval: Optional[Interval], goal: Optional[float]) -> Optional[str]:
    """"met" / "missed" / "unresolved", or None without a target or an interval."""
    if goal is None or interval is None:
        return None
    if interval.coverage < interval.level:
        return "unresolved"
    if interval.low >= goal:
        return "met"
    if interval.high < goal:
        return "missed"
    return "unresolved"


def all_judged(samples: Samples, ours: str, goals: dict[str, float]) -> bool:
    """Whether every row in ``goals`` (provider -> target) already has a verdict: the stopping rule
    of a session. It looks after every round, so it asks for the wider ``STOP_LEVEL`` interval
    (8 blocks at least): a verdict reached by chance at one of many looks must not end the session."""
    return all(ratio_interval(samples[p], samples[ours], level=STOP_LEVEL).excludes(g) for p, g in goals.items())
