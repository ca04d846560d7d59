"""One benchmark suite on one case: check every implementation, time them interleaved, return rows.

Two suites share this code and the row format (``results``):

- ``step``: the whole SAM optimizer step of every provider in ``steps`` (the default run);
- ``op``: one op of ``op_specs`` per implementation (``loop``, ``eager`` and the compiled
  backends), each checked against the eager reference first (``--ops``, ``--full``).

A ``copy`` of a fixed buffer runs in every round too: its bandwidth, measured under the same load
as the rows, is what a row's share of the memory floor is taken of.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import steps, warm
from .cases import Case, kind
from .check import compare
from .measure import quantiles_ms, ratio_interval, run_rounds, time_call
from .op_specs import SPECS
from .state import make_state
from .verdict import all_judged, judge, target

COPY = "copy"


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    min_rounds: int
    max_rounds: int
    seed: int = 0
    copy_numel: int = 16 << 20


@dataclass
class Built:
    """What a suite times: name -> zero-argument call; reasons for what it does not."""
    calls: dict[str, Callable[[], object]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    mismatched: dict[str, str] = field(default_factory=dict)
    setup_s: dict[str, float] = field(default_factory=dict)


def _copy_call(plan: Plan) -> Callable[[], object]:
    src = torch.randn(plan.copy_numel, device=plan.device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_passes(device: torch.device) -> int:
    """Passes over memory of the timed copy: on a CPU the store to each line not in cache reads it
    first (write-allocate; torch's copy uses ordinary stores), so src is read, dst read and written;
    a GPU writes whole lines without reading them."""
    return 3 if device.type == "cpu" else 2


def build_steps(case: Case, providers: list[str], plan: Plan, compile_limit_s: float) -> Built:
    """Every provider's step on ``case``, checked; ``compile_limit_s``: the time torch.compile's
    first compile of this list may take (``warm``)."""
    out = Built()
    start = time.perf_counter()
    warming = None
    if "compile" in providers and steps.unavailable("compile", plan.device) is None:
        warming = warm.Warming(case, plan.dtype, plan.device)  # compiles while the others are checked
    inputs = steps.make_inputs(case, plan.dtype, plan.device, plan.seed)
    want = steps.expected(inputs)
    for p in sorted(providers, key=lambda p: p == "compile"):  # compile last: its child has had the most time
        t0 = time.perf_counter()
        why = steps.unavailable(p, plan.device)
        if why is None and p == "compile":
            why = warming.wait(start + compile_limit_s)
        if why is not None:
            out.skipped[p] = why
            out.setup_s[p] = time.perf_counter() - t0
            continue
        t_build = time.perf_counter()
        step = steps.build(p, inputs)
        bad = steps.check(step, want)  # the first step, untimed: compiles and warms up as well
        out.setup_s[p] = time.perf_counter() - t0
        if p == "compile":
            warming.record(time.perf_counter() - t_build)
        if bad is None:
            out.calls[p] = step
        else:
            out.mismatched[p] = bad
    del want
    return out


def build_op(case: Case, op: str, impls: list[str], plan: Plan) -> Built:
    spec = SPECS[op]
    out = Built()
    ref_state = make_state(case, spec, plan.dtype, plan.device, plan.seed)
    ref_result = spec.reference(ref_state)
    for impl in impls:
        why = _op_unavailable(impl, spec, plan.device)
        if why is not None:
            out.skipped[impl] = why
            continue
        state = make_state(case, spec, plan.dtype, plan.device, plan.seed)
        call = (lambda s=state: spec.loop(s)) if impl == "loop" else (lambda s=state, b=impl: spec.api(s, b))
        t0 = time.perf_counter()
        err, where = compare(spec, plan.dtype, state, call(), ref_state, ref_result)
        out.setup_s[impl] = time.perf_counter() - t0
        if where is None:
            out.calls[impl] = call
        else:
            out.mismatched[impl] = f"{where} off by {err:.3g}x the tolerance"
    return out


def _op_unavailable(impl: str, spec, device: torch.device) -> Optional[str]:
    if impl == "loop":
        return spec.no_loop if spec.loop is None else None
    return None if impl == "eager" else steps.unavailable(impl, device)


def measure(suite: str, op: str, case: Case, built: Built, ours: Optional[str], floor: Optional[int], plan: Plan,
            deadline: float, meta: dict) -> list[dict]:
    """Times ``built`` interleaved until every target row has a verdict or ``deadline``; one row per
    implementation (timed, skipped or mismatched)."""
    ours = ours if ours in built.calls else None  # ours mismatched or missing: times without ratios
    calls = {**built.calls, COPY: _copy_call(plan)}
    goals = {p: target(p, kind(case.name)) for p in built.calls} if suite == "step" else {}
    goals = {p: g for p, g in goals.items() if g is not None and ours is not None and p != ours}

    samples = run_rounds(list(calls), lambda name: time_call(calls[name]),
                         resolved=lambda s: all_judged(s, ours, goals),
                         min_rounds=plan.min_rounds, max_rounds=plan.max_rounds, deadline=deadline)
    copy_s = quantiles_ms(samples[COPY])["median_ms"] * 1e-3
    copy_gbps = copy_passes(plan.device) * plan.copy_numel * 4 / copy_s / 1e9
    base = {"suite": suite, "op": op, "case": case.name, "tensors": case.tensors, "numel": case.numel,
            "dtype": str(plan.dtype).replace("torch.", ""), "vs": ours, "floor_bytes": floor,
            "copy_gbps": copy_gbps, **meta}
    rows = []
    for p, call in built.calls.items():
        q = quantiles_ms(samples[p])
        iv = ratio_interval(samples[p], samples[ours]) if ours is not None else None
        goal = goals.get(p)
        rows.append({**base, "provider": p, **q, "rounds": len(samples[p]), "setup_s": built.setup_s[p],
                     "ratio": iv.ratio if iv else None, "ratio_low": iv.low if iv else None,
                     "ratio_high": iv.high if iv else None, "level": iv.level if iv else None,
                     "blocks": iv.blocks if iv else None,
                     "target": goal, "verdict": judge(iv, goal),
                     "floor_fraction": floor / (copy_gbps * 1e9) / (q["median_ms"] * 1e-3) if floor else None,
                     "skipped": None, "mismatch": None})
    for p, why in built.skipped.items():
        rows.append({**base, "provider": p, "skipped": why, "mismatch": None, "setup_s": built.setup_s.get(p)})
    for p, why in built.mismatched.items():
        rows.append({**base, "provider": p, "skipped": None, "mismatch": why})
    built.calls.clear()
    gc.collect()
    return rows
