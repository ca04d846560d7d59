"""Shared body of every pytest-benchmark entry: skip what cannot run, check once, then time.

It reuses the runner's pieces (sam_kernels.bench): the same inputs, the same implementations
and the same correctness check, so both report the same thing.
"""
from __future__ import annotations

import pytest
import torch

import sam_kernels
from sam_kernels.bench.check import compare
from sam_kernels.bench.op_specs import SPECS
from sam_kernels.bench.ops_bench import BACKENDS, IMPLS, backend_skip_reason, build
from sam_kernels.bench.state import make_state


def run_op_benchmark(benchmark, op: str, impl: str, case, device: torch.device, dtype: torch.dtype,
                     with_compile: bool) -> None:
    spec = SPECS[op]
    if spec.optimizer and not hasattr(sam_kernels, "SAM"):
        pytest.skip("sam_kernels.SAM does not exist yet")
    if impl == "loop" and spec.loop is None:
        pytest.skip("no per-parameter formulation")
    if impl == "compile" and (spec.optimizer or not with_compile):
        pytest.skip("torch.compile baseline: pass --bench-compile (measured on sam_step, not the optimizer)")
    if impl in BACKENDS and (why := backend_skip_reason(impl, device)):
        pytest.skip(why)
    benchmark.group = f"{op} {case.name} {str(dtype).replace('torch.', '')}"
    with torch.no_grad():
        ref = make_state(case, spec, dtype, device)
        ref_result = spec.reference(ref)
        state = make_state(case, spec, dtype, device)
        fn = build(impl, spec, state)
        result = fn()
        err, where = compare(spec, dtype, state, result, ref, ref_result)
        assert where is None, f"{impl} does not match the eager reference at {where} ({err:.3g}x the tolerance)"
        del ref, ref_result

        def timed():
            fn()
            if device.type == "cuda":  # wall-clock timer: wait for the kernels (the timer's own sync)
                torch.cuda.synchronize(device)

        benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
    median_s = benchmark.stats.stats.median
    floor = spec.floor_bytes(case.numel, torch.empty((), dtype=dtype).element_size())
    benchmark.extra_info.update({"numel": case.numel, "tensors": case.tensors, "floor_bytes": floor,
                                 "gbps_at_median": floor / median_s / 1e9})
