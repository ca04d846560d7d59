"""``model.double()`` mid-run: between steps, and between first_step and second_step. Every
variant's state (base state, backups, modifier buffers, masks, policy state) must follow its
parameter's dtype, and the run must go on as the hand reference (float64 throughout; the first
steps in fp32 leave fp32 rounding differences)."""
from __future__ import annotations

import pytest
import torch

from tests.loops.harness import Run
from tests.loops.matrix import cases

FP32_TOL = (2e-6, 2e-5)


def cast(run: Run) -> None:
    run.model.double()
    run.oracle.double()
    run.dtype = torch.float64


@pytest.mark.parametrize("info,backend", cases("cast"))
def test_cast_between_steps(info, backend):
    run = Run(info, backend, dtype=torch.float32)
    for t, (x, y) in enumerate(run.data):
        if t == 2:
            cast(run)
        rec = run.manual([(x, y)])
        run.reference_step(rec, [(x, y)])
        run.check(f"step {t}", tol=FP32_TOL)
    assert all(p.dtype == torch.float64 for p in run.model.parameters())


@pytest.mark.parametrize("info,backend", cases("cast/midstep"))
def test_cast_between_first_and_second_step(info, backend):
    run = Run(info, backend, dtype=torch.float32)
    for t, (x, y) in enumerate(run.data):
        rec = run.manual([(x, y)], midstep=cast if t == 2 else None)
        if t == 2 and not rec.sam:  # a plain step has no middle: cast after it
            cast(run)
        run.reference_step(rec, [(x, y)])
        run.check(f"step {t}", tol=FP32_TOL)
