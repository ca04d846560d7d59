"""The CUDA kernels in the loop matrix: every row of the variant table through the ``cuda_emu``
backend (the unmodified CUDA sources built for the CPU, tests/cuda_emu), each against the hand
reference, with the same loop bodies as the CPU backends' tests: manual, step(closure), AMP
(grad_scale, found_inf: a step taken after ``unscale_``, one skipped by an overflow in either
pass), checkpoints, and (``test_other_loop``) the rest of the loops whose tensors the kernels
take whole: step(closure) without a first pass and with zeroed gradients, accumulation, clipping,
bf16 and fp16 autocast, mid-run casts."""
from __future__ import annotations

import pytest

from tests.loops import test_amp_loops as amp
from tests.loops import test_aliasing_loops as aliasing
from tests.loops import test_cast_loops as casts
from tests.loops import test_plain_loops as plain
from tests.loops import test_sam_on_loops as sam_on
from tests.loops.harness import Run, only_kernels_of
from tests.loops.matrix import cases
from tests.loops import test_checkpoint_loops as checkpoint

pytestmark = pytest.mark.cuda_emu
BACKENDS = ("cuda_emu",)


@pytest.fixture(autouse=True)
def _only_the_kernels(cuda_emu_backend):
    """Every op call of the test ran on the emulated CUDA kernels (none fell back to eager)."""
    with only_kernels_of(cuda_emu_backend, "the CUDA kernels"):
        yield


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


@pytest.mark.parametrize("info,backend", cases("checkpoint", backends=BACKENDS))
def test_checkpoint_at_step_boundary(info, backend):
    checkpoint.test_checkpoint_at_step_boundary(info, backend)


@pytest.mark.parametrize("info,backend", cases("checkpoint/midstep_overflow", backends=BACKENDS))
def test_checkpoint_midstep_keeps_a_pending_overflow(info, backend):
    checkpoint.test_checkpoint_midstep_keeps_a_pending_overflow(info, backend)


OTHER_LOOPS = [  # (loop of the table, the CPU backends' test of it, its extra arguments)
    ("closure_first_pass", plain.test_closure_first_pass, {}),
    ("zeroed_closure", plain.test_zeroed_closure, {}),
    ("accumulation", plain.test_accumulation, {}),
    ("clipping", plain.test_clipping, {"where": "both"}),
    ("bf16", plain.test_bf16_autocast, {}),
    ("amp_manual/fp16", amp.test_amp_fp16_autocast, {}),
    ("cast", casts.test_cast_between_steps, {}),
    ("cast/midstep", casts.test_cast_between_first_and_second_step, {}),
    ("aliased/tied", aliasing.test_tied_parameter, {}),
]


@pytest.mark.parametrize("test,kw,info,backend", [
    pytest.param(test, kw, *c.values, id=f"{loop}-{c.id}", marks=c.marks)
    for loop, test, kw in OTHER_LOOPS for c in cases(loop, backends=BACKENDS)])
def test_other_loop(test, kw, info, backend):
    test(info, backend, **kw)


@pytest.mark.parametrize("info,backend", [c for c in cases("sam_on", backends=BACKENDS)
                                           + cases("sam_on", refused=True, backends=BACKENDS)
                                           if c.values[0].name != "SAM-ON"])
def test_sam_on_groups(info, backend):
    sam_on.test_every_variant_leaves_skipped_groups_at_w(info, backend)
