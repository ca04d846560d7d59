"""The eager reference (backend="eager") against float64 naive per-tensor maths written here.

This is the top of the oracle chain: every other backend is compared against the reference.
"""
from __future__ import annotations

import math

import pytest
import torch

import sam_kernels.ops as ops
from sam_kernels.ops import reference
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_close, assert_lists_equal

SHAPES = {
    "odd": [(1,), (7,), (13, 17), (278011,), (0,), (3, 0, 2)],
    "many_small": [(5,)] * 150 + [(2, 3)] * 60,
    "conv": [(8, 3, 3, 3), (8,), (10, 8 * 9)],
}


def make(shapes, dtype, scale=1.0, positive=False):
    ts = [torch.randn(s, dtype=torch.float32).to(dtype) * scale for s in shapes]
    return [t.abs() + 0.1 if positive else t for t in ts]


def f64(ts):
    return [t.double().clone() for t in ts]


def naive_sq_norm(grads, params=None, masks=None, eta=0.0):
    total = 0.0
    for i, g in enumerate(grads):
        x = g.double()
        if params is not None:
            x = x * (params[i].double().abs() + eta)
        if masks is not None:
            x = x * masks[i].double()
        total += float((x * x).sum())
    return total


def rel_tol(dtype):
    return {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-5, torch.bfloat16: 1e-5}[dtype]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_grad_sq_norm(dtype, atol, rtol, case, adaptive, masked):
    grads = make(SHAPES[case], dtype)
    params = make(SHAPES[case], dtype) if adaptive else None
    masks = [torch.rand(s) < 0.5 for s in SHAPES[case]] if masked else None
    got = ops.grad_sq_norm(grads, params=params, masks=masks, eta=0.01, backend="eager")
    want = naive_sq_norm(grads, params, masks, eta=0.01)
    assert got.dim() == 0
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Inputs are exact in the naive fp64 sum, so only fp32 accumulation error remains.
    assert math.isclose(float(got), want, rel_tol=rel_tol(dtype), abs_tol=1e-30)


def test_grad_sq_norm_mixed_dtypes_sums_groups():
    grads = [torch.randn(10), torch.randn(5, dtype=torch.float64), torch.randn(3).bfloat16()]
    got = ops.grad_sq_norm(grads, backend="eager")
    assert got.dtype == torch.float32
    assert math.isclose(float(got), naive_sq_norm(grads), rel_tol=1e-6)


def test_dot_matches_naive():
    a, b = make(SHAPES["odd"], torch.float32), make(SHAPES["odd"], torch.float32)
    want = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    assert math.isclose(float(ops.dot(a, b, backend="eager")), want, rel_tol=1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_perturb(dtype, atol, rtol, case, adaptive, masked):
    shapes = SHAPES[case]
    params, grads = make(shapes, dtype), make(shapes, dtype)
    masks = [torch.rand(s) < 0.5 for s in shapes] if masked else None
    orig = [p.clone() for p in params]
    backups = [torch.full_like(p, float("nan")) for p in params]
    rho, eta = 0.07, 0.01
    ops.perturb_(params, grads, backups, rho, masks=masks, adaptive=adaptive, eta=eta, backend="eager")
    assert_lists_equal(backups, orig, "backup")
    # Default norm: UNMASKED (Sparse SAM's choice), adaptive-weighted when adaptive.
    norm = math.sqrt(naive_sq_norm(grads, orig if adaptive else None, None, eta))
    for i, (p, w, g) in enumerate(zip(params, orig, grads)):
        t2 = (w.double().abs() + eta) ** 2 if adaptive else 1.0
        e = rho * t2 * g.double() / (norm + 1e-12)
        want = w.double() + e
        if masks is not None:
            want = torch.where(masks[i], want, w.double())
            assert torch.equal(p[~masks[i]], w[~masks[i]]), "masked-out weights must be bitwise unchanged"
        assert_close(p, want.to(dtype), atol, rtol, f"param[{i}]")


def test_perturb_with_masked_norm_bounds_perturbation():
    params, grads = make([(50,), (20, 3)], torch.float64), make([(50,), (20, 3)], torch.float64)
    masks = [torch.rand(50) < 0.3, torch.rand(20, 3) < 0.3]
    orig = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    sq = ops.grad_sq_norm(grads, masks=masks, backend="eager")
    ops.perturb_(params, grads, backups, 0.1, sq_norm=sq, masks=masks, backend="eager")
    e_norm = math.sqrt(sum(float(((p - w) ** 2).sum()) for p, w in zip(params, orig)))
    assert math.isclose(e_norm, 0.1, rel_tol=1e-9)  # masked norm: ||e|| = rho exactly


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_perturb_nonfinite_norm_leaves_weights_unchanged(bad):
    params = make([(9,), (4, 4)], torch.float32)
    params[0][0] = -0.0
    grads = make([(9,), (4, 4)], torch.float32)
    grads[1][2, 2] = bad
    orig = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, 0.05, backend="eager")
    assert_lists_equal(params, orig, "params")
    assert_lists_equal(backups, orig, "backups")


@pytest.mark.parametrize("keep_prob", [0.25, 0.5, 0.9])
def test_perturb_keep_prob(keep_prob):
    n = 200_000
    params, grads = [torch.zeros(n)], [torch.ones(n)]
    backups = [torch.empty(n)]
    sq = torch.tensor(1.0)
    ops.perturb_(params, grads, backups, 0.5, sq_norm=sq, keep_prob=keep_prob, seed=123, backend="eager")
    kept = params[0] != 0
    # Kept entries are scaled by 1/keep_prob; dropped ones untouched.
    assert torch.allclose(params[0][kept], torch.full((int(kept.sum()),), 0.5 / keep_prob / (1 + 1e-12)))
    sigma = math.sqrt(n * keep_prob * (1 - keep_prob))
    assert abs(int(kept.sum()) - n * keep_prob) < 5 * sigma
    again = [torch.zeros(n)]
    ops.perturb_(again, grads, [torch.empty(n)], 0.5, sq_norm=sq, keep_prob=keep_prob, seed=123, backend="eager")
    assert torch.equal(again[0], params[0]), "same seed must give the same mask"
    other = [torch.zeros(n)]
    ops.perturb_(other, grads, [torch.empty(n)], 0.5, sq_norm=sq, keep_prob=keep_prob, seed=124, backend="eager")
    assert not torch.equal(other[0], params[0]), "another seed must give another mask"


def test_keep_mask_uses_the_documented_hash():
    key = reference.tensor_key(7, 3)
    got = reference.keep_mask(64, key, 0.5, torch.device("cpu"))
    for i in range(64):
        r = reference.fmix32_int(reference.fmix32_int(i ^ key) ^ 0)
        assert bool(got[i]) == ((r >> 8) < (1 << 23))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=DTYPE_IDS)
def test_restore_is_bitwise(dtype):
    backups = make(SHAPES["odd"], dtype)
    params = [torch.randn_like(b.float()).to(dtype) for b in backups]
    ops.restore_(params, backups, backend="eager")
    assert_lists_equal(params, backups)


SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False),
    dict(momentum=0.8, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True),
]


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_sgd_restore_step_matches_torch_sgd(cfg, dtype, atol, rtol):
    shapes = SHAPES["odd"]
    backups = make(shapes, dtype)
    ref_params = [b.clone().requires_grad_() for b in backups]
    torch_opt = torch.optim.SGD(ref_params, lr=0.1, **cfg)
    params = [torch.randn_like(b) for b in backups]  # perturbed weights, overwritten by the restore
    bufs = None
    for _ in range(3):
        grads = make(shapes, dtype)
        for rp, g in zip(ref_params, grads):
            rp.grad = g.clone()
        torch_opt.step()
        bufs = ops.sgd_restore_step_(params, backups, grads, bufs, lr=0.1, backend="eager", **cfg)
        torch._foreach_copy_(backups, params)
        assert_lists_close(params, [p.detach() for p in ref_params], atol, rtol, "params")
    if cfg["momentum"]:
        want = [torch_opt.state[p]["momentum_buffer"] for p in ref_params]
        assert_lists_close([b for b in bufs], want, atol, rtol, "momentum_buffer")
    else:
        assert all(b is None for b in bufs)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_adamw_restore_step_matches_torch_adamw(maximize, dtype, atol, rtol):
    shapes = SHAPES["odd"]
    backups = make(shapes, dtype)
    ref_params = [b.clone().requires_grad_() for b in backups]
    hp = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05, maximize=maximize)
    torch_opt = torch.optim.AdamW(ref_params, foreach=False, **hp)
    params = [torch.randn_like(b) for b in backups]
    m = [torch.zeros_like(b) for b in backups]
    v = [torch.zeros_like(b) for b in backups]
    for step in range(1, 5):
        grads = make(shapes, dtype)
        for rp, g in zip(ref_params, grads):
            rp.grad = g.clone()
        torch_opt.step()
        ops.adamw_restore_step_(params, backups, grads, m, v, step, lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-8,
                                weight_decay=0.05, maximize=maximize, backend="eager")
        torch._foreach_copy_(backups, params)
        assert_lists_close(params, [p.detach() for p in ref_params], atol * 10, rtol, "params")
    assert_lists_close(m, [torch_opt.state[p]["exp_avg"] for p in ref_params], atol, rtol, "exp_avg")
    assert_lists_close(v, [torch_opt.state[p]["exp_avg_sq"] for p in ref_params], atol, rtol, "exp_avg_sq")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_renormalize(dtype, atol, rtol):
    grads = make(SHAPES["odd"], dtype)
    orig = f64(grads)
    ref_sq = torch.tensor(3.7)
    before = ops.renormalize_(grads, ref_sq, backend="eager")
    norm = math.sqrt(naive_sq_norm(orig))
    assert math.isclose(float(before), norm**2, rel_tol=rel_tol(dtype))
    for i, (g, o) in enumerate(zip(grads, orig)):
        assert_close(g, (o * math.sqrt(float(ref_sq)) / (norm + 1e-12)).to(dtype), atol, rtol, f"grad[{i}]")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_fisher_accumulate(dtype, atol, rtol):
    fisher = make(SHAPES["conv"], dtype, positive=True)
    grads = make(SHAPES["conv"], dtype)
    want = [f.double() + 0.5 * g.double() ** 2 for f, g in zip(fisher, grads)]
    ops.fisher_accumulate_(fisher, grads, scale=0.5, backend="eager")
    assert_lists_close(fisher, [w.to(dtype) for w in want], atol, rtol, "fisher")


def test_looksam_store_and_apply_use_global_dot_and_norms():
    shapes = [(5, 3), (7,), (1,)]
    g, gs = make(shapes, torch.float64), make(shapes, torch.float64)
    gv = [torch.empty_like(x) for x in g]
    ops.looksam_store_(gv, g, gs, backend="eager")
    dot = sum(float((a * b).sum()) for a, b in zip(g, gs))
    g_sq = naive_sq_norm(g)
    for i in range(len(shapes)):
        assert_close(gv[i], gs[i] - dot / (g_sq + 1e-12) * g[i], 1e-12, 1e-10, f"g_v[{i}]")
    # g_v is orthogonal to g (globally, not per tensor)
    assert abs(sum(float((a * b).sum()) for a, b in zip(gv, g))) < 1e-9
    fresh = make(shapes, torch.float64)
    orig = [x.clone() for x in fresh]
    ops.looksam_apply_(fresh, gv, 0.7, backend="eager")
    coef = 0.7 * math.sqrt(naive_sq_norm(orig)) / (math.sqrt(naive_sq_norm(gv)) + 1e-12)
    for i in range(len(shapes)):
        assert_close(fresh[i], orig[i] + coef * gv[i], 1e-12, 1e-10, f"grad[{i}]")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_mix(dtype, atol, rtol):
    """g ← a·g + b·o in float64 by hand; the factors as floats or 0-dim tensors; o may be g itself."""
    grads, others = make(SHAPES["conv"], dtype), make(SHAPES["conv"], dtype)
    want = [1.3 * g.double() - 0.4 * o.double() for g, o in zip(grads, others)]
    ops.mix_(grads, others, 1.3, torch.tensor(-0.4, dtype=torch.float64), backend="eager")
    assert_lists_close(grads, [w.to(dtype) for w in want], atol, rtol, "grads")
    want = [0.5 * g.double() for g in grads]
    ops.mix_(grads, grads, torch.tensor(2.0), -1.5, backend="eager")
    assert_lists_close(grads, [w.to(dtype) for w in want], atol, rtol, "grads (others is grads)")


def test_topk_mask_exact_count_and_ties():
    scores = [torch.tensor([1.0, 3.0, 3.0]), torch.tensor([[3.0, 0.5], [2.0, float("nan")]]), torch.empty(0)]
    masks = ops.topk_mask(scores, 3 / 7, backend="eager")  # k = 3 of 7
    assert masks[0].tolist() == [False, True, True]
    assert masks[1].tolist() == [[True, False], [False, False]]  # the third 3.0 wins over 2.0; NaN never
    assert masks[2].numel() == 0 and masks[2].dtype == torch.bool
    big = make([(1000,), (37, 11)], torch.float32)
    for density in (0.0, 0.1, 0.5, 0.999, 1.0):
        kept = sum(int(m.sum()) for m in ops.topk_mask(big, density, backend="eager"))
        assert kept == int(1407 * density + 1e-9)


def test_topk_mask_keeps_the_largest():
    scores = make([(300,), (20, 20)], torch.float32)
    masks = ops.topk_mask(scores, 0.25, backend="eager")
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    dropped = torch.cat([s[~m] for s, m in zip(scores, masks)])
    assert kept.numel() == int(700 * 0.25)
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_mask(n, m):
    shapes = [(6, 16), (4, 3, 3, 3), (10,)]
    scores = make(shapes, torch.float32)
    masks = ops.nm_mask(scores, n, m, backend="eager")
    for s, mask in zip(scores, masks):
        rows = reference.nm_groups(s)
        mrows = reference.nm_groups(mask)
        for r in range(rows.shape[0]):
            for start in range(0, rows.shape[1], m):
                grp, keep = rows[r, start:start + m], mrows[r, start:start + m]
                assert int(keep.sum()) == min(n, grp.numel())
                if keep.any() and (~keep).any():
                    assert grp[keep].min() >= grp[~keep].max()


def test_nm_mask_groups_conv_over_input_channels_and_kernel():
    # One output filter of a (1, 2, 2, 2) conv: its 8 weights form two groups of 4 in row-major
    # (cin, kh, kw) order, so the group boundary falls between the two input channels.
    w = torch.tensor([[[[1.0, 8.0], [2.0, 7.0]], [[3.0, 6.0], [4.0, 5.0]]]])
    mask = ops.nm_mask([w], 2, 4, backend="eager")[0]
    assert mask.reshape(-1).tolist() == [False, True, False, True, False, True, False, True]


def test_errors_are_clear():
    with pytest.raises(ValueError, match="has 1 tensors but the first list has 2"):
        ops.restore_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)])
    with pytest.raises(TypeError, match="sparse"):
        ops.grad_sq_norm([torch.zeros(3).to_sparse()])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ops.grad_sq_norm([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="shape"):
        ops.perturb_([torch.zeros(3)], [torch.zeros(4)], [torch.zeros(3)], 0.05)
    with pytest.raises(TypeError, match="masks must be torch.bool"):
        ops.grad_sq_norm([torch.zeros(3)], masks=[torch.ones(3)])
    with pytest.raises(TypeError, match="not a tensor"):
        ops.grad_sq_norm([None])
    with pytest.raises(ValueError, match="unknown backend"):
        ops.restore_([torch.zeros(1)], [torch.zeros(1)], backend="nope")
    with pytest.raises(ValueError, match="keep_prob"):
        ops.perturb_([torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], 0.05, keep_prob=0.0)


def test_non_contiguous_tensors_are_handled():
    base = torch.randn(8, 6)
    params = [base.t()]  # non-contiguous view, updated in place
    grads = [torch.randn(6, 8)]
    backups = [torch.empty(6, 8)]
    orig = params[0].clone()
    ops.perturb_(params, grads, backups, 0.05, backend="auto")
    assert torch.equal(backups[0], orig)
    assert torch.allclose(base.t(), orig + 0.05 * grads[0] / grads[0].norm(), atol=1e-6)
