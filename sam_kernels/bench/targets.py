"""The project's performance targets (set in its issue #7), checked against one run's rows.

- CPU: the fused SAM optimizer step (first_step + second_step, SGD-momentum) at least 1.5x
  faster than foreach eager on ResNet-50's 25.6M parameters.
- GPU, per compiled backend: the fused step on ResNet-50 at least 5x the per-parameter loop,
  1.5x foreach eager and 1.2x torch.compile of the eager reference; and every bandwidth-bound op
  at >= 16M elements at >= 85% of the copy bandwidth measured in the same run.

The step figure is ``sam_optimizer_step`` (through sam_kernels.SAM) when it ran, else
``sam_step`` (the same ops called directly).

Issue #13, every device and compiled backend: the fused step on ResNet-50 in channels_last
(``resnet50_cl``) within 1.1x of the contiguous layout's time in the same run, with 100 % of its
elements on the compiled kernels.

A target is judged only from clean rows (noise.py) and only where the p20–p80 ranges agree
(ours): "met" when even the least favourable pairing clears it (speedup: baseline p20 / this p80;
fraction of copy: at this row's p80 time), "missed" when even the most favourable one falls
short, otherwise "undecided". ``met`` is True / False / None (not judged).
"""
from __future__ import annotations

from typing import Optional

from .op_specs import HEADLINE

TARGET_CASE = "resnet50"
CHANNELS_LAST_CASE = "resnet50_cl"
CHANNELS_LAST_SLOWDOWN = 1.1
CPU_VS_EAGER = 1.5
GPU_VS = {"loop": 5.0, "eager": 1.5, "compile": 1.2}
GPU_FRAC_COPY = 0.85
GPU_FRAC_MIN_NUMEL = 16 << 20


def _unjudged(name: str, value: Optional[float], target: float, note: str) -> dict:
    return {"name": name, "value": value, "target": target, "low": None, "high": None, "met": None, "note": note}


def judge(name: str, value: float, low: float, high: float, target: float, noise: list[str]) -> dict:
    """One target from a median value and its least / most favourable values (same units)."""
    if noise:
        return _unjudged(name, value, target, "not judged: noisy data (" + "; ".join(dict.fromkeys(noise)) + ")")
    if low >= target:
        met, note = True, f"met: {value / target - 1:.0%} above the target (at least {low / target - 1:.0%})"
    elif high < target:
        met, note = False, f"missed by {1 - value / target:.0%}"
    else:
        met, note = None, f"undecided: the p20–p80 range {low:.2f}–{high:.2f} straddles the target"
    return {"name": name, "value": value, "target": target, "low": low, "high": high, "met": met, "note": note}


def _row(rows: list[dict], op: str, impl: str, case: str = TARGET_CASE) -> Optional[dict]:
    return next((r for r in rows if r["op"] == op and r["case"] == case and r["impl"] == impl), None)


def _step_row(rows: list[dict], impl: str, case: str = TARGET_CASE) -> Optional[dict]:
    """The headline step row of ``impl`` on ``case``: through the optimizer if it ran, else the ops."""
    for op in HEADLINE:
        row = _row(rows, op, impl, case)
        if row is not None:
            return row
    return None


def check_targets(rows: list[dict], device_type: str, backends: list[str], unavailable: dict[str, str],
                  copy_gbps: Optional[float] = None) -> list[dict]:
    """One entry per target and compiled backend: value, target, met (None: not judged), note.

    Rows carry ``noise`` (noise.mark_ops) before this is called; ``copy_gbps`` is the copy
    bandwidth the fractions of copy are taken of."""
    out: list[dict] = []
    compiled = ("cpp",) if device_type == "cpu" else ("cuda", "triton")
    wanted = {"eager": CPU_VS_EAGER} if device_type == "cpu" else GPU_VS
    for b in compiled:
        if b not in backends:
            why = unavailable.get(b, "not requested (--backends)")
            out.append(_unjudged(f"{b}: fused SAM step targets", None, 0.0, f"not evaluated: {why}"))
            continue
        row = _step_row(rows, b)
        for base, target in wanted.items():
            name = f"{b}: {row['op'] if row else 'SAM step'} on {TARGET_CASE} >= {target}x {base}"
            base_row = _row(rows, row["op"], base) if row else None
            if row is None:
                out.append(_unjudged(name, None, target, f"not evaluated: no {b} step row on {TARGET_CASE}"))
            elif base_row is None:
                out.append(_unjudged(name, None, target, f"not evaluated: baseline {base} did not run"))
            elif not row["correct"]:
                out.append({**_unjudged(name, row["speedup"][base], target, ""), "met": False,
                            "note": "not met: result MISMATCH vs reference"})
            else:
                out.append(judge(name, row["speedup"][base], base_row["p20_ms"] / row["p80_ms"],
                                 base_row["p80_ms"] / row["p20_ms"], target,
                                 row.get("noise", []) + [f"{base}: {n}" for n in base_row.get("noise", [])
                                                          if n not in row.get("noise", [])]))
        cl = _step_row(rows, b, CHANNELS_LAST_CASE)
        if cl is not None and row is not None and cl["op"] == row["op"]:
            out.append(judge(f"{b}: {cl['op']} on {CHANNELS_LAST_CASE} within {CHANNELS_LAST_SLOWDOWN}x of "
                             f"{TARGET_CASE} (value: contiguous ms / channels_last ms, so at least "
                             f"{1 / CHANNELS_LAST_SLOWDOWN:.2f}; above 1 = channels_last faster)",
                             row["median_ms"] / cl["median_ms"], row["p20_ms"] / cl["p80_ms"],
                             row["p80_ms"] / cl["p20_ms"], 1 / CHANNELS_LAST_SLOWDOWN,
                             cl.get("noise", []) + row.get("noise", [])))
            share = cl.get("fused_share")
            if share is not None:  # a count, not a timing: no noise to judge
                out.append({**_unjudged(f"{b}: {cl['op']} on {CHANNELS_LAST_CASE}: share of elements fused", share,
                                        1.0, ""), "met": share >= 1.0,
                            "note": "met: every element ran fused" if share >= 1.0 else
                            f"missed: {1 - share:.1%} of the elements ran on the eager fallback"})
        if device_type != "cpu":
            big = [r for r in rows if r["impl"] == b and r["bandwidth_bound"] and r["numel"] >= GPU_FRAC_MIN_NUMEL]
            for r in big:
                copy = copy_gbps or r["gbps"] / r["frac_copy_bw"]
                frac = lambda ms: r["floor_bytes"] / (ms * 1e-3) / 1e9 / copy  # noqa: E731
                out.append(judge(f"{b}: {r['op']} on {r['case']} >= {GPU_FRAC_COPY:.0%} of copy bandwidth",
                                 r["frac_copy_bw"], frac(r["p80_ms"]), frac(r["p20_ms"]), GPU_FRAC_COPY,
                                 r.get("noise", [])))
            if not big:
                out.append(_unjudged(f"{b}: bandwidth-bound ops >= {GPU_FRAC_COPY:.0%} of copy bandwidth", None,
                                     GPU_FRAC_COPY, "not evaluated: no case with >= 16M elements ran"))
    return out
