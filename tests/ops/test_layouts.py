"""Every op on every dense layout (issue 13): the compiled kernels walk storage linearly, so any
non-overlapping and dense tensors whose lists share strides run fused; only entries whose layouts
differ run eagerly, one by one, and the dispatch record says so. Complex tensors run as real views."""
from __future__ import annotations

import warnings

import pytest
import torch

import sam_kernels.ops as ops
from sam_kernels.ops import dispatch
from tests.utils import DTYPE_IDS, DTYPES, assert_lists_close, assert_lists_equal, require_backend

CASES = [("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]
CASE_IDS = [f"{b}-{d}" for b, d in CASES]
LAYOUTS = ["contiguous", "channels_last", "channels_last_3d", "permuted"]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    backend, device = request.param
    require_backend(backend, device)
    return backend, device


def _dense(shape, layout):
    """An empty tensor of ``shape`` in ``layout`` (every later tensor copies its strides with empty_like)."""
    if layout == "contiguous":
        return torch.empty(shape)
    if layout == "channels_last":
        return torch.empty(shape).to(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return torch.empty(shape).to(memory_format=torch.channels_last_3d)
    return torch.empty(shape[::-1]).t()  # permuted 2-D: shape (a, b) with strides (1, a)


SHAPES = {
    # odd sizes; a size-1 channel dim (depthwise conv); more than one CPU chunk (2^15) in the 4-D case
    "contiguous": [(5, 7, 3, 3), (4, 1, 3, 3), (33, 32, 7, 5)],
    "channels_last": [(5, 7, 3, 3), (4, 1, 3, 3), (33, 32, 7, 5)],
    "channels_last_3d": [(3, 5, 2, 3, 7), (2, 1, 3, 3, 3), (2, 4, 1, 1, 5)],
    "permuted": [(7, 5), (1, 9), (300, 130)],
}


def make_lists(layout, device, dtype, n, *, positive=()):
    """``n`` aligned lists of random tensors in ``layout`` (list indices in ``positive`` hold |x|)."""
    out = []
    for j in range(n):
        lst = []
        for shape in SHAPES[layout]:
            t = _dense(shape, layout).to(device)
            x = torch.empty_like(t, dtype=dtype).copy_(torch.randn(shape))
            lst.append(x.abs() if j in positive else x)
        out.append(lst)
    return out


def masks_like(ts):
    return [torch.rand_like(t, dtype=torch.float32) < 0.6 for t in ts]  # rand_like keeps the layout


def clones(lists):
    return [[t.clone() for t in lst] for lst in lists]  # clone() keeps the strides


def strides(lst):
    return [t.stride() for t in lst]


def sq(device, value=2.5):
    return torch.tensor(value, device=device)


# op -> (number of lists, indices of lists that must be >= 0, call(lists, backend) -> result)
OPS = {
    "grad_sq_norm": (2, (), lambda L, be: ops.grad_sq_norm(L[0], backend=be)),
    "grad_sq_norm_adaptive_masked": (2, (), lambda L, be: ops.grad_sq_norm(L[0], params=L[1], masks=L[2], eta=0.01,
                                                                           backend=be)),
    "dot": (2, (), lambda L, be: ops.dot(L[0], L[1], backend=be)),
    "perturb_": (3, (), lambda L, be: ops.perturb_(L[0], L[1], L[2], 0.05, backend=be)),
    "perturb_adaptive_masked_keep": (3, (), lambda L, be: ops.perturb_(
        L[0], L[1], L[2], 0.5, sq_norm=sq(L[0][0].device), masks=L[3], adaptive=True, keep_prob=0.7, seed=11,
        backend=be)),
    "restore_": (2, (), lambda L, be: ops.restore_(L[0], L[1], backend=be)),
    "sgd_restore_step_": (4, (), lambda L, be: ops.sgd_restore_step_(
        L[0], L[1], L[2], L[3], lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True, backend=be)),
    "sgd_restore_step_new_buffers": (3, (), lambda L, be: ops.sgd_restore_step_(
        L[0], L[1], L[2], None, lr=0.1, momentum=0.9, dampening=0.1, backend=be)),
    "adamw_restore_step_": (5, (4,), lambda L, be: ops.adamw_restore_step_(
        L[0], L[1], L[2], L[3], L[4], 3, lr=1e-2, weight_decay=1e-2, backend=be)),
    "renormalize_": (1, (), lambda L, be: ops.renormalize_(L[0], sq(L[0][0].device), backend=be)),
    "fisher_accumulate_": (2, (0,), lambda L, be: ops.fisher_accumulate_(L[0], L[1], scale=0.5, backend=be)),
    "looksam_store_": (3, (), lambda L, be: ops.looksam_store_(L[0], L[1], L[2], backend=be)),
    "looksam_apply_": (2, (), lambda L, be: ops.looksam_apply_(L[0], L[1], 0.7, backend=be)),
    "mix_": (2, (), lambda L, be: ops.mix_(L[0], L[1], 1.3, -0.4, backend=be)),
}
RECORDED = {"grad_sq_norm_adaptive_masked": "grad_sq_norm", "perturb_adaptive_masked_keep": "perturb_",
            "sgd_restore_step_new_buffers": "sgd_restore_step_"}


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", list(OPS))
def test_every_op_runs_fused_on_every_dense_layout(case, op, layout, dtype, atol, rtol):
    backend, device = case
    n, positive, call = OPS[op]
    lists = make_lists(layout, device, dtype, n, positive=positive)
    if "masked" in op:
        lists.append(masks_like(lists[0]))
    ref = clones(lists)
    before = [t.clone() for t in lists[0]]
    layouts = [strides(lst) for lst in lists]
    out = call(lists, backend)
    record = dispatch.last_call[RECORDED.get(op, op)]
    out_ref = call(ref, "eager")

    total = sum(t.numel() for t in lists[0])
    assert [p.backend for p in record.parts] == [backend], record
    assert record.elements(backend) == total and record.fallback_elements == 0
    if isinstance(out, torch.Tensor):  # a reduction
        torch.testing.assert_close(out, out_ref, rtol=max(rtol, 1e-5), atol=atol)
    elif isinstance(out, list):  # sgd's momentum buffers: new ones are created in the params' layout
        assert [b.stride() for b in out] == layouts[0]
        assert_lists_close(out, ref[3] if n == 4 else out_ref, atol, rtol, "momentum_buffers")
    for i, (mine, theirs) in enumerate(zip(lists, ref)):
        assert strides(mine) == layouts[i], f"list {i} changed layout"
        assert_lists_close(mine, theirs, atol, rtol, f"list {i}")
    if op.startswith("perturb_"):
        assert_lists_equal(lists[2], before, "backups")  # exact copies of the weights
    if op == "restore_":
        assert_lists_equal(lists[0], lists[1], "restored")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_restore_after_perturb_is_bitwise(case, layout):
    backend, device = case
    for dtype in (torch.float32, torch.bfloat16):
        p, g, b = make_lists(layout, device, dtype, 3)
        before = [t.clone() for t in p]
        ops.perturb_(p, g, b, 0.05, backend=backend)
        assert not all(torch.equal(x, y) for x, y in zip(p, before)), "nothing was perturbed"
        ops.restore_(p, b, backend=backend)
        assert_lists_equal(p, before, "restored")
        assert strides(p) == strides(before)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "permuted"])
def test_masks_come_back_in_the_scores_layout(case, layout):
    backend, device = case
    scores = make_lists(layout, device, torch.float32, 1)[0]
    contiguous = [s.contiguous() for s in scores]
    runs = {"topk_mask": lambda s, be: ops.topk_mask(s, 0.3, backend=be),
            "nm_mask": lambda s, be: ops.nm_mask(s, 2, 4, backend=be)}
    for op, run in runs.items():
        masks = run(scores, backend)
        assert [p.backend for p in dispatch.last_call[op].parts] == [backend]
        assert list(map(api_memory_order, masks)) == list(map(api_memory_order, scores))
        assert_lists_equal([m.contiguous() for m in masks], run(contiguous, "eager"), op)


# --------------------------------------------------------------------------- mixed layouts in one list

@pytest.mark.parametrize("op", ["grad_sq_norm", "perturb_", "sgd_restore_step_", "restore_"])
def test_a_gradient_in_another_layout_runs_eagerly_alone(case, op):
    """Params in channels_last, one gradient contiguous: right results, exactly that tensor on eager."""
    backend, device = case
    p, g, b, m = make_lists("channels_last", device, torch.float32, 4)
    bad = 2 if op != "restore_" else 0  # not entry 1: with one channel, channels_last is also contiguous
    if op == "restore_":
        b[bad] = b[bad].contiguous()  # the list that disagrees: the backups
    else:
        g[bad] = g[bad].contiguous()
    assert api_memory_order((b if op == "restore_" else g)[bad]) != api_memory_order(p[bad])
    lists = [p, g, b, m]
    ref = clones(lists)
    calls = {
        "grad_sq_norm": lambda L, be: ops.grad_sq_norm(L[1], params=L[0], backend=be),
        "perturb_": lambda L, be: ops.perturb_(L[0], L[1], L[2], 0.05, sq_norm=sq(device), backend=be),
        "sgd_restore_step_": lambda L, be: ops.sgd_restore_step_(L[0], L[2], L[1], L[3], lr=0.1, momentum=0.9,
                                                                 backend=be),
        "restore_": lambda L, be: ops.restore_(L[0], L[2], backend=be),
    }
    out = calls[op](lists, backend)
    parts = dispatch.last_call[op].parts
    sizes = [t.numel() for t in p]
    assert sorted((x.backend, x.tensors, x.elements, x.fallback) for x in parts) == sorted([
        (backend, 2, sum(sizes) - sizes[bad], ""), ("eager", 1, sizes[bad], "layout")])
    out_ref = calls[op](ref, "eager")
    if isinstance(out, torch.Tensor):
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for i, (mine, theirs) in enumerate(zip(lists, ref)):
        assert_lists_close(mine, theirs, 1e-6, 1e-5, f"list {i}")


def test_overlapping_views_run_eagerly(case):
    backend, device = case
    base = torch.randn(6, device=device)
    p = [torch.randn(4, 6, device=device), base.expand(4, 6)]  # the second: stride 0, overlapping
    g = [torch.randn(4, 6, device=device) for _ in p]
    norm = ops.grad_sq_norm(g, params=p, backend=backend)
    assert sorted((x.backend, x.tensors, x.fallback) for x in dispatch.last_call["grad_sq_norm"].parts) == sorted([
        (backend, 1, ""), ("eager", 1, "layout")])
    torch.testing.assert_close(norm, ops.grad_sq_norm(g, params=p, backend="eager"))


def test_size_one_dims_may_have_any_stride():
    """Autograd may give a grad other strides than its param on size-1 dims: still one memory order."""
    require_backend("cpp", "cpu")
    p = torch.randn(8, 1, 3, 3).to(memory_format=torch.channels_last)
    g = torch.empty_strided(p.shape, (9, 77, 3, 1)).copy_(torch.randn(p.shape))  # contiguous order, odd dim-1 stride
    g2 = torch.empty_like(p).copy_(g)
    assert g.stride() != p.stride() and api_memory_order(g) == api_memory_order(p)
    out = ops.grad_sq_norm([g], params=[p])
    assert dispatch.last_call["grad_sq_norm"].parts[0].backend == "cpp"
    torch.testing.assert_close(out, ops.grad_sq_norm([g2], params=[p], backend="eager"))


def api_memory_order(t):
    from sam_kernels.ops.layouts import memory_order
    return memory_order(t)


def test_memory_order():
    assert api_memory_order(torch.empty(2, 3)) == (3, 1)
    assert api_memory_order(torch.empty(3, 2).t()) == (1, 2)
    assert api_memory_order(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)) == (60, 1, 15, 3)
    assert api_memory_order(torch.empty(4, 6)[:, ::2]) is None  # gaps
    assert api_memory_order(torch.empty(6).expand(4, 6)) is None  # overlap
    assert api_memory_order(torch.empty(1, 5, 1)) == (1,)


# --------------------------------------------------------------------------- complex tensors

@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_tensors_run_as_real_views(case, dtype):
    backend, device = case
    shapes = [(5, 3), (7,), (2, 3, 4)]
    p = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    g = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    # ‖g‖² = Σ |z|² = Σ (re² + im²), as torch.linalg.vector_norm on complex tensors
    expected = sum(torch.linalg.vector_norm(x.to(torch.complex128)) ** 2 for x in g)
    got = ops.grad_sq_norm(g, backend=backend)
    assert got.dtype == real
    torch.testing.assert_close(got.double(), expected.real, rtol=1e-6, atol=0)
    assert [x.backend for x in dispatch.last_call["grad_sq_norm"].parts] == [backend]
    b = [torch.empty_like(x) for x in p]
    w0 = [x.clone() for x in p]
    ops.perturb_(p, g, b, 0.05, backend=backend)
    scale = 0.05 / (expected.real.sqrt() + 1e-12)
    for x, x0, gx in zip(p, w0, g):  # e = rho·g/‖g‖, component-wise on real and imaginary parts
        torch.testing.assert_close(x, x0 + (scale * gx.to(torch.complex128)).to(dtype), rtol=1e-5, atol=1e-6)
    assert_lists_equal(b, w0, "backups")
    bufs = ops.sgd_restore_step_(p, b, g, None, lr=0.1, momentum=0.9, backend=backend)
    assert all(m.dtype == dtype for m in bufs)  # torch.optim.SGD keeps complex momentum buffers
    for x, x0, gx in zip(p, w0, g):
        torch.testing.assert_close(x, x0 - 0.1 * gx, rtol=1e-5, atol=1e-6)


def test_complex_masks_cover_both_parts():
    require_backend("cpp", "cpu")
    p = [torch.randn(4, 3, dtype=torch.complex64)]
    g = [torch.randn(4, 3, dtype=torch.complex64)]
    m = [torch.rand(4, 3) < 0.5]
    got = ops.grad_sq_norm(g, masks=m)
    torch.testing.assert_close(got, (g[0].abs() ** 2)[m[0]].sum(), rtol=1e-5, atol=1e-6)
    b = [torch.empty_like(p[0])]
    w0 = p[0].clone()
    ops.perturb_(p, g, b, 0.05, masks=m)
    assert torch.equal(p[0][~m[0]], w0[~m[0]])
    assert not torch.equal(p[0][m[0]], w0[m[0]])


# --------------------------------------------------------------------------- the one-time CUDA warning

def test_cuda_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned_cuda", False)
    part = dispatch.Part("eager", "cuda", "float32", 2, 123, "layout")
    with pytest.warns(RuntimeWarning, match="123 elements of CUDA tensors in perturb_ ran on the slow eager path"):
        dispatch.record("perturb_", [part])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.record("perturb_", [part])  # once per process
        dispatch.record("perturb_", [dispatch.Part("eager", "cpu", "float32", 2, 123, "layout")])


def test_cuda_layout_fallback_warns_through_the_ops(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setattr(dispatch, "_warned_cuda", False)
    p = [torch.randn(4, 3, 5, 5, device="cuda").to(memory_format=torch.channels_last)]
    g = [torch.randn(4, 3, 5, 5, device="cuda")]  # contiguous: another layout than its param
    with pytest.warns(RuntimeWarning, match="300 elements of CUDA tensors in grad_sq_norm"):
        ops.grad_sq_norm(g, params=p)
    assert dispatch.last_call["grad_sq_norm"].parts[0].fallback == "layout"
