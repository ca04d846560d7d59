"""fp16 GradScaler loops against the hand reference: manual and closure, ``scaler.unscale_`` at each
place torch allows it, an overflow (an Inf in a gradient) in either pass, and real fp16 autocast.

The weights are fp32 and the forward runs without autocast except in the last test: loss scales are
powers of 2, so a scaled gradient is exactly 1024 times the unscaled one and the AMP run must
follow the unscaled hand reference to fp32 rounding. What is checked is the scaler bookkeeping:
which scale each pass carries, and which steps an overflow skips.
"""
from __future__ import annotations

import pytest
import torch

from tests.loops.harness import Run
from tests.loops.matrix import BACKENDS, cases

SCALE = 1024.0


def scaler():
    return torch.amp.GradScaler("cpu", init_scale=SCALE)


def amp_run(info, backend, **kw):
    return Run(info, backend, dtype=torch.float32, scaler=scaler(), **kw)


def amp_cases(loop, places, backends=BACKENDS):
    """(info, backend, place): ESAM's closure has no user-visible pass to unscale, so only None there."""
    out = []
    for place in places:
        for c in cases(f"{loop}/unscale={place}" if place else loop, backends=backends):
            info = c.values[0]
            if loop in info.refuses:  # tested as a refusal (test_refusals)
                continue
            if loop == "amp_closure" and info.per_sample_closure and place is not None:
                continue
            out.append(pytest.param(*c.values, place, id=f"{c.id}-unscale={place}", marks=c.marks))
    return out


@pytest.mark.parametrize("info,backend,unscale", amp_cases("amp_manual", (None, "first", "second")))
def test_amp_manual(info, backend, unscale):
    run = amp_run(info, backend)
    run.train("manual", unscale=unscale)
    assert run.scaler.get_scale() == SCALE


@pytest.mark.parametrize("info,backend,unscale", amp_cases("amp_closure", (None, "first", "closure")))
def test_amp_closure(info, backend, unscale):
    run = amp_run(info, backend)
    run.train("closure", unscale=unscale)
    assert run.scaler.get_scale() == SCALE


def overflow_cases(backends=BACKENDS):
    out = []
    for loop in ("amp_manual", "amp_closure"):
        for pass_no in (1, 2):
            for c in cases(f"{loop}/overflow={pass_no}", backends=backends):
                if loop in c.values[0].refuses:  # tested as a refusal (test_refusals)
                    continue
                out.append(pytest.param(*c.values, loop, pass_no, id=f"{c.id}-{loop}-pass{pass_no}", marks=c.marks))
    return out


@pytest.mark.parametrize("info,backend,loop,pass_no", overflow_cases())
def test_amp_overflow_skips_the_step(info, backend, loop, pass_no):
    """An Inf in pass ``pass_no`` of step 1: that step changes nothing, the scale halves, the other steps
    are the reference's. (On a plain step there is no second pass: the overflow then never happens.)"""
    run = amp_run(info, backend)
    method = run.manual if loop == "amp_manual" else run.closure
    for t, (x, y) in enumerate(run.data):
        micro = [(x, y)]
        rec = method(micro, overflow=pass_no if t == 1 else None)
        skipped = t == 1 and (pass_no == 1 or rec.sam)
        if skipped:  # an EMA of g(w) (Friendly-SAM, VaSSO) still observes a finite first pass
            run.ref.skip(run.grads(run.ref.ws, micro) if pass_no == 2 else None)
            assert run.scaler.get_scale() == SCALE / 2, "the overflow did not reach scaler.update()"
        else:
            run.reference_step(rec, micro)
        run.check(f"step {t}")


@pytest.mark.parametrize("info,backend", cases("amp_manual/fp16"))
def test_amp_fp16_autocast(info, backend):
    """Real fp16 autocast: the reference takes its gradients through the same fp16 forward."""
    run = Run(info, backend, dtype=torch.float32, scaler=scaler(), autocast=torch.float16)
    run.train("manual", check_each=False)
    run.check("fp16 autocast", tol=(1e-5, 1e-4))
