"""The project's performance targets (issue #7), checked against one run's rows.

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


def _target(name: str, value: Optional[float], target: float, note: str = "") -> dict:
    if value is None:
        return {"name": name, "value": None, "target": target, "met": None, "note": note}
    met = value >= target
    if not note:
        note = f"met with {value / target - 1:.0%} to spare" if met else f"missed by {1 - value / target:.0%}"
    return {"name": name, "value": value, "target": target, "met": met, "note": note}


def _step_row(rows: list[dict], impl: str, case: str = TARGET_CASE) -> Optional[dict]:
    """The headline step row of ``impl`` on ``case``: through the optimizer if it ran, else the ops."""
    for op in HEADLINE:
        row = next((r for r in rows if r["op"] == op and r["case"] == case and r["impl"] == impl), None)
        if row is not None:
            return row
    return None


def check_targets(rows: list[dict], device_type: str, backends: list[str], unavailable: dict[str, str]) -> list[dict]:
    """One entry per target and compiled backend: value, target, met (None: not evaluated), note."""
    out: list[dict] = []
    compiled = ("cpp",) if device_type == "cpu" else ("cuda", "triton")
    wanted = {"eager": CPU_VS_EAGER} if device_type == "cpu" else GPU_VS
    for b in compiled:
        if b not in backends:
            why = unavailable.get(b, "not requested (--backends)")
            out.append(_target(f"{b}: fused SAM step targets", None, 0.0, f"not evaluated: {why}"))
            continue
        row = _step_row(rows, b)
        for base, target in wanted.items():
            name = f"{b}: {row['op'] if row else 'SAM step'} on {TARGET_CASE} >= {target}x {base}"
            if row is None:
                out.append(_target(name, None, target, f"not evaluated: no {b} step row on {TARGET_CASE}"))
            elif base not in row["speedup"]:
                out.append(_target(name, None, target, f"not evaluated: baseline {base} did not run"))
            elif not row["correct"]:
                out.append({**_target(name, row["speedup"][base], target), "met": False,
                            "note": "not met: result MISMATCH vs reference"})
            else:
                out.append(_target(name, row["speedup"][base], target))
        cl = _step_row(rows, b, CHANNELS_LAST_CASE)
        if cl is not None and row is not None and cl["op"] == row["op"]:
            out.append(_target(f"{b}: {cl['op']} on {CHANNELS_LAST_CASE} within {CHANNELS_LAST_SLOWDOWN}x of "
                               f"{TARGET_CASE} (value: contiguous ms / channels_last ms)",
                               row["median_ms"] / cl["median_ms"], 1 / CHANNELS_LAST_SLOWDOWN))
            out.append(_target(f"{b}: {cl['op']} on {CHANNELS_LAST_CASE}: share of elements fused",
                               cl.get("fused_share"), 1.0))
        if device_type != "cpu":
            big = [r for r in rows if r["impl"] == b and r["bandwidth_bound"] and r["numel"] >= GPU_FRAC_MIN_NUMEL]
            for r in big:
                out.append(_target(f"{b}: {r['op']} on {r['case']} >= {GPU_FRAC_COPY:.0%} of copy bandwidth",
                                   r["frac_copy_bw"], GPU_FRAC_COPY))
            if not big:
                out.append(_target(f"{b}: bandwidth-bound ops >= {GPU_FRAC_COPY:.0%} of copy bandwidth", None,
                                   GPU_FRAC_COPY, "not evaluated: no case with >= 16M elements ran"))
    return out
