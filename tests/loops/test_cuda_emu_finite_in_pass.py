"""The finite check in the SGD descent's pass through the CUDA kernels (``cuda_emu``: the unmodified
CUDA sources built for the CPU), deferred as it is on a GPU: no read of g(w + e), a NaN undone on
the device by the undo launch, the error raised at the next step, the run then as the deferred
"pass" run (tests/optim/test_finite_in_pass.py's scenario on this backend)."""
from __future__ import annotations

import pytest
import torch

from sam_kernels.ops import dispatch
from sam_kernels.optim import base_step
from tests.optim.test_finite_in_pass import assert_same_states, base_states, deferred_run

pytestmark = pytest.mark.cuda_emu


@pytest.fixture(autouse=True)
def _in_pass_on_the_emulation(cuda_emu_backend, monkeypatch):
    """The emulated CUDA kernels take the check as the ``cuda`` backend does; every op call ran on them."""
    monkeypatch.setattr(base_step, "IN_PASS_BACKENDS", (*base_step.IN_PASS_BACKENDS, cuda_emu_backend))
    with dispatch.recording() as log:
        yield
    others = sorted({(r.op, p.backend) for r in log for p in r.parts if p.backend != cuda_emu_backend})
    assert log and not others, f"op calls that did not run the CUDA kernels: {others}"


@pytest.mark.parametrize("config", ["momentum", "nesterov", "plain"])
@pytest.mark.parametrize("first", [False, True], ids=["later-step", "first-step"])
@pytest.mark.parametrize("hand_over", [True, False], ids=["handed-over", "spares"])
def test_deferred_fault_on_the_cuda_kernels(cuda_emu_backend, config, first, hand_over):
    """``hand_over``: second_step(zero_grad=True), the new buffers written over the gradients (the
    undo launch puts the old buffers there); else into spare buffers."""
    good = 0 if first else 2
    model, opt, descent, before, after = deferred_run(cuda_emu_backend, True, config, good, hand_over=hand_over)
    ref_model, ref_opt, ref_descent, _, ref_after = deferred_run(cuda_emu_backend, "pass", config, good,
                                                                 hand_over=hand_over)
    assert descent == ["sgd_restore_step_"] and ref_descent == ["grad_sq_norm", "sgd_restore_step_"]
    assert all(torch.equal(p, w) for p, w in zip(after[0], before[0])), "weights must be at w"
    assert_same_states(after[1], ref_after[1] if first else before[1])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert_same_states(base_states(opt), base_states(ref_opt))

