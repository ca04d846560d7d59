"""No memory growth over long runs: no retained graphs, state or compiled variants.

Counts the tensors alive (``gc``) halfway through the run (long after every state buffer exists) and at
its end; any tensor kept per step (a graph, a per-step state entry, a cache) makes the count grow. (It may
fall: earlier tests' leftovers, such as a kept traceback's frames, are released while a run goes on.) SAM runs 1,000 steps of each main
loop; every other variant (their own state: policies, masks, g_v, selections) runs 300 manual steps.
"""
from __future__ import annotations

import gc

import pytest
import torch

from sam_kernels.optim.telemetry import FOLD
from tests.loops.harness import Run
from tests.loops.matrix import cases
from tests.optim.variants import variant


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no lazy-module lookups


def settled_tensors(opt) -> int:
    """live_tensors() once telemetry's buffer is folded: it keeps the raw 0-dim values of at most FOLD
    SAM steps between folds (bounded by design, checked here), which stats() folds."""
    assert len(opt.telemetry.records) < FOLD
    opt.stats()
    assert not opt.telemetry.records
    return live_tensors()


def run_loop(run: Run, loop: str, steps: int, **kw) -> tuple[int, int]:
    data = run.data
    counts = []
    for t in range(steps):
        getattr(run, loop)([data[t % len(data)]], **kw)
        if t == steps // 2 - 1:
            counts.append(settled_tensors(run.opt))
    counts.append(settled_tensors(run.opt))
    return counts[0], counts[1]


@pytest.mark.parametrize("loop", ["manual", "closure", "amp_closure", "compile"])
def test_sam_1000_steps_hold_no_more_tensors(loop):
    info = variant("SAM")
    if loop == "amp_closure":
        run = Run(info, "cpp", dtype=torch.float32, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
        loop = "closure"
    elif loop == "compile":
        torch._dynamo.reset()
        run = Run(info, "cpp", dtype=torch.float32, finite_check=False)
        steps = {n: torch.compile(getattr(run.opt, n), fullgraph=True, backend="aot_eager")
                 for n in ("first_step", "second_step")}
        before, after = run_loop(run, "manual", 1000, step_with=steps)
        assert after <= before, f"{after - before} more tensors alive after compiled steps 500 to 1000"
        return
    else:
        run = Run(info, "cpp")
    before, after = run_loop(run, loop, 1000)
    assert after <= before, f"{after - before} more tensors alive after steps 500 to 1000 of {loop}"


@pytest.mark.parametrize("info,backend", [c for c in cases("manual", backends=("cpp",)) if c.values[0].name != "SAM"])
def test_variant_300_steps_hold_no_more_tensors(info, backend):
    run = Run(info, backend)
    before, after = run_loop(run, "manual", 300)
    assert after <= before, f"{info.name}: {after - before} more tensors alive after steps 150 to 300"
