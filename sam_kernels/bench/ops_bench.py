"""Per-op microbenchmarks: every implementation of every op on every case, side by side in one run.

Implementations ("impls"):
- ``loop``: a per-parameter Python loop the way davda54/sam is written (baselines.py);
- ``eager``: ``sam_kernels.ops`` with backend="eager" (torch._foreach reference through dispatch);
- ``compile``: ``torch.compile`` of the eager reference function (optional: slow to compile);
- ``cpp`` / ``cuda`` / ``triton``: the compiled backends, where available on this device.

For each (case, op) the eager reference runs once on fresh inputs; then each impl runs once on
identical fresh inputs and is compared to it (mismatches are reported loudly, and still timed),
then timed. Inputs are mutated by the repeats; the values drift but stay finite, and the work
per call does not depend on the values.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import sam_kernels
from .. import ops
from .cases import Case
from .check import compare
from .op_specs import SPECS, OpSpec
from .state import make_state
from .timing import Timer

BASELINES = ("loop", "eager", "compile")
BACKENDS = ("cpp", "cuda", "triton")
IMPLS = BASELINES + BACKENDS


@dataclass
class OpsConfig:
    device: torch.device
    dtype: torch.dtype
    cases: list[Case]
    ops: list[str]
    impls: list[str]
    compile_ops: set[str]
    compile_skip_reason: str
    timer: Timer
    seed: int = 0


@dataclass
class OpsResult:
    rows: list[dict] = field(default_factory=list)
    skips: list[dict] = field(default_factory=list)


def backend_skip_reason(impl: str, device: torch.device) -> Optional[str]:
    """Why a compiled backend cannot be benchmarked on ``device`` (None: it can)."""
    if impl == "triton" and device.type == "cpu":
        return "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): far too slow to benchmark"
    info = sam_kernels.backends()[impl]
    if not info["available"]:
        return info["reason"]
    if device.type not in info["devices"]:
        return f"runs on {info['devices']}, not {device.type}"
    return None


def impl_skip_reason(impl: str, spec: OpSpec, cfg: OpsConfig) -> Optional[str]:
    if spec.optimizer and not hasattr(sam_kernels, "SAM"):
        return "sam_kernels.SAM does not exist yet (optimizer layer not written)"
    if impl == "loop" and spec.loop is None:
        return spec.no_loop
    if impl == "compile":
        if spec.optimizer:
            return "torch.compile is measured on sam_step (the same work without the optimizer object)"
        if spec.name not in cfg.compile_ops:
            return cfg.compile_skip_reason
    if impl in BACKENDS:
        return backend_skip_reason(impl, cfg.device)
    return None


def build(impl: str, spec: OpSpec, state: dict) -> Callable[[], object]:
    """A zero-argument callable running one call of ``impl`` on ``state``."""
    if impl == "loop":
        return lambda: spec.loop(state)
    if impl == "compile":
        torch._dynamo.reset()  # one function compiled per (op, case): stay clear of the recompile limit
        phases = [torch.compile(fn, dynamic=False) for fn in (spec.compile_phases or (spec.reference,))]

        def run_phases():
            for phase in phases:
                result = phase(state)
            return result

        return run_phases
    return lambda: spec.api(state, impl)


def measure_copy_bandwidth(device: torch.device, timer: Timer, numel: int) -> dict:
    """GB/s of ``dst.copy_(src)`` on fp32 tensors of ``numel`` elements (bytes = read + write)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = timer.time(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    return {"numel": numel, "bytes": nbytes, **t.as_dict(), "gbps": nbytes / (t.median_ms * 1e-3) / 1e9}


def _bench_one(impl: str, spec: OpSpec, case: Case, cfg: OpsConfig, ref_state: dict, ref_result) -> dict:
    state = make_state(case, spec, cfg.dtype, cfg.device, cfg.seed)
    fn = build(impl, spec, state)
    t0 = time.perf_counter()
    with ops.recording() as calls:
        result = fn()
    cfg.timer.sync()
    first_call_s = time.perf_counter() - t0
    ran = sorted({p.backend for r in calls for p in r.parts}) if impl not in ("loop", "compile") else []
    total = sum(r.elements() for r in calls)
    # Share of the elements the op calls ran on a compiled backend (None: no sam_kernels op ran).
    fused_share = sum(r.fused_elements for r in calls) / total if total and impl not in ("loop", "compile") else None
    err, where = compare(spec, cfg.dtype, state, result, ref_state, ref_result)
    timing = cfg.timer.time(fn)
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    floor = spec.floor_bytes(case.numel, elem)
    return {
        "op": spec.name, "case": case.name, "numel": case.numel, "tensors": case.tensors,
        "dtype": str(cfg.dtype).replace("torch.", ""), "impl": impl, "backends_ran": ran, "fused_share": fused_share,
        **timing.as_dict(),
        "floor_bytes": floor, "gbps": floor / (timing.median_ms * 1e-3) / 1e9,
        "bandwidth_bound": spec.bandwidth_bound,
        "correct": where is None, "err_ratio": err if math.isfinite(err) else None,  # None: NaN/shape/bitwise
        "mismatch_at": where,
        "first_call_s": first_call_s,
    }


def set_copy_fractions(rows: list[dict], copy_gbps: float, peak_gbps: Optional[float]) -> None:
    """Fractions of the measured copy bandwidth (and of the spec peak when known)."""
    for r in rows:
        r["frac_copy_bw"] = r["gbps"] / copy_gbps
        r["frac_spec_peak"] = r["gbps"] / peak_gbps if peak_gbps else None


def _add_ratios(rows: list[dict], copy_gbps: float, peak_gbps: Optional[float]) -> None:
    """Fractions of the copy bandwidth and speedup over each baseline of the same (op, case)."""
    set_copy_fractions(rows, copy_gbps, peak_gbps)
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["case"]), {})[r["impl"]] = r["median_ms"]
    for r in rows:
        base = by_key[(r["op"], r["case"])]
        r["speedup"] = {b: base[b] / r["median_ms"] for b in BASELINES if b in base}


def run_ops(cfg: OpsConfig, copy_gbps: float, peak_gbps: Optional[float], log: Callable[[str], None],
            progress) -> OpsResult:
    out = OpsResult()
    with torch.no_grad():
        for case in cfg.cases:
            for name in cfg.ops:
                spec = SPECS[name]
                reasons = {impl: impl_skip_reason(impl, spec, cfg) for impl in cfg.impls}
                todo = [impl for impl in cfg.impls if reasons[impl] is None]
                for impl in cfg.impls:
                    if reasons[impl] is not None:
                        out.skips.append({"op": name, "case": case.name, "impl": impl, "reason": reasons[impl]})
                if not todo:
                    progress.update(len(cfg.impls))
                    continue
                ref_state = make_state(case, spec, cfg.dtype, cfg.device, cfg.seed)
                ref_result = spec.reference(ref_state)
                progress.update(len(cfg.impls) - len(todo))
                for impl in todo:
                    progress.set_postfix_str(f"{case.name} {name} {impl}")
                    try:
                        row = _bench_one(impl, spec, case, cfg, ref_state, ref_result)
                    except Exception as exc:  # one broken impl must not hide the others' numbers
                        reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        out.skips.append({"op": name, "case": case.name, "impl": impl, "reason": reason})
                        log(f"!! {name} / {case.name} / {impl}: {reason}")
                    else:
                        if not row["correct"]:
                            off = "NaN/shape/bitwise" if row["err_ratio"] is None else f"{row['err_ratio']:.3g}x"
                            log(f"!! MISMATCH {name} / {case.name} / {impl}: {row['mismatch_at']} off by {off} "
                                f"the tolerance (timed anyway; do not trust its speed)")
                        if impl not in ("loop", "compile", "eager") and row["fused_share"] is not None \
                                and row["fused_share"] < 1.0:
                            log(f"!! {name} / {case.name} / {impl}: only {row['fused_share']:.1%} of the elements ran "
                                f"fused (the rest on the eager fallback)")
                        out.rows.append(row)
                    progress.update(1)
                del ref_state, ref_result
    _add_ratios(out.rows, copy_gbps, peak_gbps)
    return out
