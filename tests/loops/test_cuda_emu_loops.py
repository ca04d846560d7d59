"""The CUDA kernels in the main loops: every row of the variant table through the ``cuda_emu``
backend (the unmodified CUDA sources built for the CPU, tests/cuda_emu), each against the hand
reference, with the same loop bodies as the CPU backends' tests. Besides manual and step(closure),
the loops where the kernels are handed something else: AMP (grad_scale, found_inf: a step taken
after ``unscale_``, and one skipped by an overflow in either pass) and a checkpoint between the
two passes."""
from __future__ import annotations

import pytest

from sam_kernels.ops import dispatch
from tests.loops import test_amp_loops as amp
from tests.loops.harness import Run
from tests.loops.matrix import cases
from tests.loops import test_checkpoint_loops as checkpoint

pytestmark = pytest.mark.cuda_emu
BACKENDS = ("cuda_emu",)


@pytest.fixture(autouse=True)
def _only_the_kernels(cuda_emu_backend):
    """Every op call of the test ran on the emulated CUDA kernels (none fell back to eager)."""
    with dispatch.recording() as log:
        yield
    assert log, "no op call was made"
    others = sorted({(r.op, p.backend) for r in log for p in r.parts if p.backend != cuda_emu_backend})
    assert not others, f"op calls that did not run the CUDA kernels: {others}"


@pytest.mark.parametrize("info,backend", cases("manual", backends=BACKENDS))
def test_manual(info, backend):
    Run(info, backend).train("manual")


@pytest.mark.parametrize("info,backend", cases("closure", backends=BACKENDS))
def test_closure(info, backend):
    Run(info, backend).train("closure")


@pytest.mark.parametrize("info,backend,unscale", amp.amp_cases("amp_manual", ("second",), backends=BACKENDS))
def test_amp_manual_unscaled(info, backend, unscale):
    amp.test_amp_manual(info, backend, unscale)


@pytest.mark.parametrize("info,backend,loop,pass_no", amp.overflow_cases(backends=BACKENDS))
def test_amp_overflow_skips_the_step(info, backend, loop, pass_no):
    amp.test_amp_overflow_skips_the_step(info, backend, loop, pass_no)


@pytest.mark.parametrize("info,backend", cases("checkpoint/midstep", backends=BACKENDS))
def test_checkpoint_between_first_and_second_step(info, backend):
    checkpoint.test_checkpoint_between_first_and_second_step(info, backend)
