"""The fp32/fp64 loops of the matrix against the hand reference: manual, step(closure) with and
without a first pass already taken, zeroed-not-None gradients, accumulation, clipping, bf16."""
from __future__ import annotations

import pytest
import torch

from tests.loops.harness import Run
from tests.loops.matrix import cases


@pytest.mark.parametrize("info,backend", cases("manual"))
def test_manual(info, backend):
    Run(info, backend).train("manual")


@pytest.mark.parametrize("info,backend", cases("closure"))
def test_closure(info, backend):
    Run(info, backend).train("closure")


@pytest.mark.parametrize("info,backend", cases("closure_first_pass"))
def test_closure_first_pass(info, backend):
    """step(closure) with no gradient yet: the closure gives the first pass too."""
    Run(info, backend).train("closure", first_pass=True)


@pytest.mark.parametrize("info,backend", cases("zeroed_closure"))
def test_zeroed_closure(info, backend):
    """zero_grad(set_to_none=False) then step(closure): all-zero gradients are no first pass."""
    Run(info, backend).train("closure", zeroed=True)


@pytest.mark.parametrize("info,backend", cases("accumulation"))
def test_accumulation(info, backend):
    """Two micro-batches per pass, each loss divided by 2: the reference sees the whole batch's gradient."""
    run = Run(info, backend, steps=6)
    for t in range(0, 6, 2):
        micro = run.data[t:t + 2]
        rec = run.manual(micro)
        run.reference_step(rec, micro)
        run.check(f"accumulation step {t // 2}")


@pytest.mark.parametrize("info,backend", cases("clipping"))
@pytest.mark.parametrize("where", ["first", "second", "both"])
def test_clipping(info, backend, where):
    """clip_grad_norm_ (max_norm below the gradients' norm, so it bites) on either pass."""
    clip1 = 0.05 if where in ("first", "both") else None
    clip2 = 0.05 if where in ("second", "both") else None
    Run(info, backend).train("manual", clip1=clip1, clip2=clip2)


@pytest.mark.parametrize("info,backend", cases("bf16"))
def test_bf16_autocast(info, backend):
    """fp32 weights, bf16 autocast forward; the reference takes its gradients through the same forward."""
    run = Run(info, backend, dtype=torch.float32, autocast=torch.bfloat16)
    run.train("manual", check_each=False)
    run.check("bf16", tol=(1e-5, 1e-4))
