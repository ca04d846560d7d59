"""Opt-in (``-m cuda_emu_large``: a 4 GB tensor, ~2 min): one tensor of more than 2^31 elements
through the emulated kernels, a reduction and an in-place update, with distinct values past
element 2^31 (where 32-bit index arithmetic would wrap). test_launcher.py checks the same
arithmetic with synthetic sizes on every run."""
import pytest
import torch

from tests.cuda_emu.cases import CHUNK

pytestmark = [pytest.mark.cuda_emu, pytest.mark.cuda_emu_large]


def test_a_tensor_over_2_pow_31_elements(emu):
    head = 2 ** 31 - 1
    n = 2 ** 31 + 2 * CHUNK + 3
    x = torch.full((n,), 0.5, dtype=torch.float16)
    x[head] = -1.0
    x[head + 1:] = 2.0
    # By hand, in float64: (2^31 - 1)·0.25 + 1 + (n - 2^31)·4 (exact; fp32 accumulation within 1e-5).
    want = head * 0.25 + 1.0 + (n - 2 ** 31) * 4.0
    got = emu.grad_sq_norm([x], None, None, 0.0).item()
    assert abs(got - want) <= 1e-5 * want, (got, want)
    emu.renormalize_([x], torch.tensor(4.0), torch.tensor(1.0), 0.0)  # ratio sqrt(4)/sqrt(1) = 2
    assert x[head].item() == -2.0
    assert bool(x[head + 1:].eq(4.0).all())
    for start in range(0, head, 2 ** 28):  # in slices: one 2 GB comparison at a time at most
        assert bool(x[start:min(start + 2 ** 28, head)].eq(1.0).all()), start
