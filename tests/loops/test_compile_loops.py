"""torch.compile of the step functions, as the README shows, over 50 steps with the learning rate
changed every step by a scheduler: the reference in lockstep, and compiles counted.

``finite_check=False`` (its checks are host syncs). Backend ``aot_eager`` (traces the same graphs as
inductor, compiles fast); one case runs inductor. After the warm-up steps (state created, first SAM
and plain steps seen), no function may compile again: a hyperparameter changed by a scheduler and
the optimizer's own counters must not be guards.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from tests.loops.harness import Run
from tests.loops.matrix import cases
from tests.optim.hand_reference import exp_lr

STEPS, WARMUP, GAMMA = 50, 4, 0.97
RECOMPILE_LIMIT = 4  # above the 2 compiles per function allowed: a run that recompiles every step fails fast


def compiled_run(info, backend, compiler, steps=STEPS):
    torch._dynamo.reset()
    run = Run(info, backend, dtype=torch.float32, steps=steps, finite_check=False)
    lr0 = run.opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.ExponentialLR(run.opt, gamma=GAMMA)
    counter = CompileCounterWithBackend(compiler)
    names = ("step",) if info.one_pass else ("first_step", "second_step", "base_step")
    step_with = {name: torch.compile(getattr(run.opt, name), fullgraph=True, backend=counter) for name in names}
    after_warmup = None
    for t, (x, y) in enumerate(run.data):
        micro = [(x, y)]
        rec = run.manual(micro, step_with=step_with)
        run.ref.lr = exp_lr(lr0, GAMMA, t)
        run.reference_step(rec, micro)
        sched.step()
        if t == WARMUP - 1:
            after_warmup = counter.frame_count
    run.check(f"after {steps} compiled steps", tol=(1e-5, 1e-4))
    assert counter.frame_count == after_warmup, \
        f"{counter.frame_count - after_warmup} compiles after the warm-up (of {counter.frame_count})"
    assert counter.frame_count <= 2 * len(step_with)
    return run


# Every row on cpp (the fused ops with their fake kernels); the eager backend's ops trace the same way:
# SAM alone there, to keep the matrix in CI time.
COMPILE_CASES = cases("compile", backends=("cpp",)) + [c for c in cases("compile", backends=("eager",))
                                                       if c.values[0].name == "SAM"]


@pytest.fixture(autouse=True)
def _recompile_limit(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", RECOMPILE_LIMIT)


@pytest.mark.parametrize("info,backend", COMPILE_CASES)
def test_compiled_steps_with_lr_schedule(info, backend):
    compiled_run(info, backend, "aot_eager")


@pytest.mark.parametrize("info,backend", [c for c in cases("compile/inductor") if c.id == "SAM-cpp"])
def test_compiled_steps_inductor(info, backend):
    compiled_run(info, backend, "inductor", steps=12)
