"""centralize_ (GCSAM's gradient centralization) on every backend against float64 maths written here:
each row of dim 0 minus its mean, for every dtype, row-edge shapes and layouts; complex tensors
centred on their complex mean; tensors whose rows are not contiguous runs (a transposed matrix)
run eagerly, the rest fused; the kernels refuse such a tensor when handed it directly."""
from __future__ import annotations

import pytest
import torch

import sam_kernels.ops as ops
from tests.ops.opinfo import ALL, COMPILED, backend_param, dispatch_rows, laid_out, require
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_equal

SHAPES = [(1, 5), (3, 0), (0, 4), (5,), (), (4, 7001), (2, 3, 5), (6, 1), (7, 13), (8, 3, 3, 3)]


def by_hand(g: torch.Tensor) -> torch.Tensor:
    """Φ(g) in float64: a tensor of more than one dimension minus the sum of each row of dim 0 over its
    length; others as they are."""
    x = g.double()
    if g.dim() < 2 or g.numel() == 0:
        return x
    rows = x.reshape(x.shape[0], -1)
    return (rows - rows.sum(dim=1, keepdim=True) / rows.shape[1]).reshape(x.shape)


def _grads(dtype, device, layout="contiguous"):
    torch.manual_seed(3)
    return [laid_out((torch.randn(s, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device), layout) for s in SHAPES]


@backend_param(dispatch_rows(ALL))
@pytest.mark.parametrize("layout", ["contiguous", "dense", "misaligned"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_rows_minus_their_means(backend, dtype, atol, rtol, layout):
    require(backend)
    grads = _grads(dtype, backend.device, layout)
    before = [g.clone() for g in grads]
    strides = [g.stride() for g in grads]
    ops.centralize_(grads, backend=backend.name)
    for i, (g, g0) in enumerate(zip(grads, before)):
        assert g.stride() == strides[i]
        if g0.dim() < 2:
            assert_lists_equal([g], [g0], f"{tuple(g0.shape)} unchanged")
        else:
            assert_close(g.cpu(), by_hand(g0.cpu()).to(dtype), atol, rtol, f"{tuple(g0.shape)}")
    if dtype == torch.float64:  # the means are exact enough that every row sums to ~0
        for g in grads:
            if g.dim() > 1 and g.numel():
                assert g.reshape(g.shape[0], -1).sum(dim=1).abs().max() < 1e-9


@backend_param(dispatch_rows(ALL))
def test_nonfinite_stays_in_its_row(backend):
    require(backend)
    g = torch.randn(3, 9, device=backend.device)
    g[1, 4] = float("nan")
    g[2, 0] = float("inf")
    want = by_hand(g.cpu())
    ops.centralize_([g], backend=backend.name)
    assert torch.isnan(g[1]).all()  # the mean is NaN
    assert torch.isnan(g[2, 0]) and (g[2, 1:] == float("-inf")).all()  # mean inf: inf - inf, then x - inf
    assert_close(g[0].cpu(), want[0].float(), 1e-6, 1e-5, "finite row")


@backend_param(dispatch_rows(ALL))
def test_complex_rows_centred_on_their_complex_mean(backend):
    require(backend)
    torch.manual_seed(0)
    z = torch.randn(3, 4, dtype=torch.complex128, device=backend.device)
    w = torch.randn(2, 6, dtype=torch.float64, device=backend.device)
    z0, w0 = z.clone(), w.clone()
    ops.centralize_([z, w], backend=backend.name)
    re = z0.real - z0.real.sum(dim=1, keepdim=True) / 4
    im = z0.imag - z0.imag.sum(dim=1, keepdim=True) / 4
    assert_close(z.real.cpu(), re.cpu(), 1e-12, 1e-10, "real parts")
    assert_close(z.imag.cpu(), im.cpu(), 1e-12, 1e-10, "imaginary parts")
    assert_close(w.cpu(), by_hand(w0.cpu()), 1e-12, 1e-10, "real tensor")


@backend_param(dispatch_rows(COMPILED))
def test_transposed_matrix_runs_eagerly_the_rest_fused(backend):
    require(backend)
    grads = [torch.randn(6, 5, device=backend.device).t(), torch.randn(4, 3, 2, 2, device=backend.device)
             .contiguous(memory_format=torch.channels_last), torch.randn(9, device=backend.device)]
    before = [g.clone() for g in grads]
    with ops.recording() as records:
        ops.centralize_(grads, backend=backend.name)
    parts = records[-1].parts
    assert [(p.backend, p.tensors, p.fallback) for p in parts if p.backend == "eager"] == [("eager", 1, "layout")]
    assert [(p.backend, p.tensors) for p in parts if p.backend != "eager"] == [(backend.name, 1)]  # 1-dim: skipped
    for g, g0 in zip(grads[:2], before):
        assert_close(g.cpu(), by_hand(g0.cpu()).float(), 1e-6, 1e-5, str(tuple(g0.shape)))
    assert_lists_equal(grads[2:], before[2:], "1-dim unchanged")


def test_kernels_refuse_rows_that_are_not_contiguous_runs():
    """Handed a transposed matrix directly, the compiled kernels raise before writing anything."""
    from tests.utils import backend_available
    g = torch.randn(6, 5).t()
    ok = torch.randn(3, 4)
    before = [g.clone(), ok.clone()]
    tried = 0
    if backend_available("cpp", "cpu"):
        with pytest.raises(RuntimeError, match="contiguous runs"):
            torch.ops.sam_kernels.centralize_([ok, g])
        tried += 1
    if backend_available("triton", "cpu"):
        from sam_kernels.ops.backends import triton as tb
        with pytest.raises(ValueError, match="contiguous runs"):
            tb.OPS["centralize_"]([ok, g])
        tried += 1
    if not tried:
        pytest.skip("no compiled backend on the CPU here")
    assert_lists_equal([g, ok], before, "unchanged")
