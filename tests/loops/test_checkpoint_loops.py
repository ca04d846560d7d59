"""Checkpoints in the middle of a run: at a step boundary, and between first_step and second_step
(also under AMP with an overflow pending from the first pass). The run resumed in fresh objects
must continue exactly as the hand reference, which is never interrupted."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from tests.loops.harness import Run
from tests.loops.matrix import cases


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def reload(run: Run) -> None:
    """Save model, optimizer (and scaler), then continue in fresh objects built the same way."""
    saved = roundtrip({"model": run.model.state_dict(), "opt": run.opt.state_dict(),
                       "scaler": run.scaler.state_dict() if run.scaler is not None else None})
    model = copy.deepcopy(run.model)  # a fresh module of the same architecture
    model.load_state_dict(saved["model"])
    run.model = model
    scaler = None
    if run.scaler is not None:
        scaler = torch.amp.GradScaler("cpu")
        scaler.load_state_dict(saved["scaler"])
        run.scaler = scaler
    run.opt = run.info.build(model, run.backend, **({"grad_scaler": scaler} if scaler is not None else {}),
                             **run.extra)
    run.opt.load_state_dict(saved["opt"])


@pytest.mark.parametrize("info,backend", cases("checkpoint"))
def test_checkpoint_at_step_boundary(info, backend):
    run = Run(info, backend)
    for t, (x, y) in enumerate(run.data):
        if t == 2:
            reload(run)
        rec = run.manual([(x, y)])
        run.reference_step(rec, [(x, y)])
        run.check(f"step {t}")


@pytest.mark.parametrize("info,backend", cases("checkpoint/midstep"))
def test_checkpoint_between_first_and_second_step(info, backend):
    run = Run(info, backend)
    for t, (x, y) in enumerate(run.data):
        rec = run.manual([(x, y)], midstep=reload if t in (1, 2) else None)
        run.reference_step(rec, [(x, y)])
        run.check(f"step {t}")


@pytest.mark.parametrize("info,backend", cases("checkpoint/midstep_overflow"))
def test_checkpoint_midstep_keeps_a_pending_overflow(info, backend):
    """fp16 manual loop: step 1's first pass overflows; saved and resumed before its second pass, the
    step is still skipped and the scale still halves."""
    run = Run(info, backend, dtype=torch.float32, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    for t, (x, y) in enumerate(run.data):
        rec = run.manual([(x, y)], overflow=1 if t == 1 else None, midstep=reload if t == 1 else None)
        if t == 1:
            run.ref.skip()
            assert run.scaler.get_scale() == 512.0, "the resumed step lost the first pass's overflow"
        else:
            run.reference_step(rec, [(x, y)])
        run.check(f"step {t}")
