"""The Triton backend in the main loops, every row of the variant table, each against the hand
reference, with the same loop bodies as the CPU backends' tests: manual, step(closure), AMP in
the manual loop (grad_scale, found_inf: a step taken after ``unscale_``, one skipped by an
overflow in either pass), a checkpoint between the two passes, SAM-ON groups, and the other loops
whose tensors the kernels take whole (``OTHER_LOOPS`` of the emulated CUDA kernels' file). Under the
Triton interpreter on CPU (about 4 minutes on two shared cores), so AMP's closure loop is left to
the other backends: ``scaler.step(opt, closure)`` hands the kernels the same grad_scale/found_inf as
the manual loop's ``scaler.step(opt)`` (the optimizer's routing is the same Python on every backend).

tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA device; with one, Triton runs on the
GPU and these CPU runs are skipped by ``require_backend`` (as in tests/ops)."""
from __future__ import annotations

import pytest

from tests.loops import test_amp_loops as amp
from tests.loops import test_checkpoint_loops as checkpoint
from tests.loops import test_sam_on_loops as sam_on
from tests.loops.harness import Run, only_kernels_of
from tests.loops.test_cuda_emu_loops import OTHER_LOOPS  # the loops whose tensors the kernels take whole
from tests.loops.matrix import cases
from tests.utils import require_backend

BACKENDS = ("triton",)


@pytest.fixture(autouse=True)
def _only_the_kernels():
    """Every op call of the test ran on the Triton kernels (none fell back to eager)."""
    require_backend("triton", "cpu")
    with only_kernels_of("triton", "the Triton kernels"):
        yield


@pytest.mark.parametrize("info,backend", cases("manual", backends=BACKENDS))
def test_triton_manual(info, backend):
    Run(info, backend).train("manual")


@pytest.mark.parametrize("info,backend", cases("closure", backends=BACKENDS))
def test_triton_closure(info, backend):
    Run(info, backend).train("closure")


@pytest.mark.parametrize("info,backend,unscale", amp.amp_cases("amp_manual", ("second",), backends=BACKENDS))
def test_triton_amp_manual_unscaled(info, backend, unscale):
    amp.test_amp_manual(info, backend, unscale)


@pytest.mark.parametrize("info,backend,loop,pass_no",
                         [c for c in amp.overflow_cases(backends=BACKENDS) if c.values[2] == "amp_manual"])
def test_triton_amp_overflow_skips_the_step(info, backend, loop, pass_no):
    amp.test_amp_overflow_skips_the_step(info, backend, loop, pass_no)


@pytest.mark.parametrize("info,backend", cases("checkpoint/midstep", backends=BACKENDS))
def test_triton_checkpoint_between_first_and_second_step(info, backend):
    checkpoint.test_checkpoint_between_first_and_second_step(info, backend)


@pytest.mark.parametrize("info,backend", [c for c in cases("sam_on", backends=BACKENDS)
                                           + cases("sam_on", refused=True, backends=BACKENDS)
                                           if c.values[0].name != "SAM-ON"])
def test_triton_sam_on_groups(info, backend):
    sam_on.test_every_variant_leaves_skipped_groups_at_w(info, backend)


@pytest.mark.parametrize("test,kw,info,backend", [
    pytest.param(test, kw, *c.values, id=f"{loop}-{c.id}", marks=c.marks)
    for loop, test, kw in OTHER_LOOPS for c in cases(loop, backends=BACKENDS)])
def test_triton_other_loop(test, kw, info, backend):
    test(info, backend, **kw)
