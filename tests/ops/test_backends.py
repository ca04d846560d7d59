"""Every op of each compiled/accelerated backend against the eager reference, on identical inputs.

Cases: cpp on CPU, cuda on a GPU, triton on a GPU and on CPU under the Triton interpreter
(conftest sets TRITON_INTERPRET=1 without a GPU); unavailable ones are skipped. The interpreter is
slow, so triton-on-CPU cases get the same shape families scaled down (see ``shapes_for``).
"""
from __future__ import annotations

import math

import pytest
import torch

import sam_kernels.ops as ops
from sam_kernels.ops.reference import keep_mask, tensor_key
from tests.utils import DTYPE_IDS, DTYPES, assert_lists_close, assert_lists_equal, require_backend

CASES = [("cpp", "cpu"), ("cuda", "cuda"), ("triton", "cpu"), ("triton", "cuda")]
CASE_IDS = [f"{b}-{d}" for b, d in CASES]
SHAPES = {
    "odd": [(1,), (7,), (127,), (278011,), (0,), (13, 17)],
    "many_small": [(3,)] * 200 + [(2, 5)] * 100,
    "conv": [(16, 8, 3, 3), (16,), (10, 144)],
}


def interpreted(case) -> bool:
    return case == ("triton", "cpu")


def shapes_for(name, case):
    """SHAPES[name], scaled down under the Triton interpreter: large dims /100 (kept odd), fewer small tensors."""
    shapes = SHAPES[name]
    if not interpreted(case):
        return shapes
    if name == "many_small":
        return [(3,)] * 40 + [(2, 5)] * 20
    return [tuple(d // 100 | 1 if d > 1000 else d for d in s) for s in shapes]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    backend, device = request.param
    require_backend(backend, device)
    return backend, device


def make(shapes, dtype, device, positive=False):
    ts = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return [t.abs() + 0.1 for t in ts] if positive else ts


def clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def both(fn, *lists, **kw):
    """Run ``fn`` on clones of ``lists`` with the backend under test and with eager; return both inputs after."""
    backend = kw.pop("backend")
    mine, ref = [clone(x) for x in lists], [clone(x) for x in lists]
    out_mine = fn(*mine, backend=backend, **kw)
    out_ref = fn(*ref, backend="eager", **kw)
    return mine, ref, out_mine, out_ref


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def same_bits(a, b):
    """Per element: are a and b bitwise equal (so -0.0 != 0.0 and NaN payloads count)?"""
    return a.view(_INT_OF[a.dtype]) == b.view(_INT_OF[b.dtype])


def close_scalar(a, b, rel):
    assert math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-30), (float(a), float(b))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shapes", list(SHAPES))
@pytest.mark.parametrize("adaptive,masked", [(False, False), (True, False), (True, True)],
                         ids=["plain", "adaptive", "adaptive-masked"])
def test_grad_sq_norm(case, dtype, atol, rtol, shapes, adaptive, masked):
    backend, device = case
    sh = shapes_for(shapes, case)
    grads = make(sh, dtype, device)
    params = make(sh, dtype, device) if adaptive else None
    masks = [torch.rand(s, device=device) < 0.5 for s in sh] if masked else None
    for g, m in zip(grads, masks or []):
        g[~m] = float("nan")  # masked-out entries are selected away, not multiplied by 0
    got = ops.grad_sq_norm(grads, params=params, masks=masks, backend=backend)
    want = ops.grad_sq_norm(grads, params=params, masks=masks, backend="eager")
    assert got.dtype == want.dtype and got.device == want.device
    assert torch.isfinite(got), "a masked-out NaN reached the norm"
    close_scalar(got, want, 1e-10 if dtype == torch.float64 else 2e-5)


def test_reductions_do_not_depend_on_thread_count(case):
    backend, device = case
    sh = shapes_for("odd", case) + shapes_for("many_small", case)
    grads, params = make(sh, torch.float32, device), make(sh, torch.float32, device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(torch.stack([ops.grad_sq_norm(grads, backend=backend),
                                        ops.grad_sq_norm(grads, params=params, backend=backend),
                                        ops.dot(grads, params, backend=backend)]))
    finally:
        torch.set_num_threads(threads)
    assert_lists_equal([results[0]], [results[1]], "reductions with 1 thread vs several")


def test_dot(case):
    backend, device = case
    sh = shapes_for("odd", case)
    a, b = make(sh, torch.float32, device), make(sh, torch.float32, device)
    close_scalar(ops.dot(a, b, backend=backend), ops.dot(a, b, backend="eager"), 2e-5)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shapes", list(SHAPES))
# Each option alone, and all of them together (a full product would triple the run time).
@pytest.mark.parametrize("adaptive,masked,keep_prob", [
    (False, False, None), (True, False, None), (False, True, None), (False, False, 0.3), (True, True, 0.3),
], ids=["plain", "adaptive", "masked", "keep", "adaptive-masked-keep"])
def test_perturb_and_restore(case, dtype, atol, rtol, shapes, adaptive, masked, keep_prob):
    backend, device = case
    sh = shapes_for(shapes, case)
    params, grads = make(sh, dtype, device), make(sh, dtype, device)
    params[0].view(-1)[0] = -0.0  # must survive bitwise where unselected
    masks = [torch.rand(s, device=device) < 0.5 for s in sh] if masked else None
    backups = [torch.full_like(p, float("nan")) for p in params]
    kw = dict(masks=masks, adaptive=adaptive, keep_prob=keep_prob, seed=11, backend=backend)
    (p1, _, b1), (p2, _, b2), _, _ = both(lambda p, g, b, **k: ops.perturb_(p, g, b, 0.05, **k),
                                          params, grads, backups, **kw)
    assert_lists_equal(b1, params, "backup")
    assert_lists_equal(b2, params, "backup (eager)")
    assert_lists_close(p1, p2, atol, rtol, "perturbed params")
    # Which entries moved must agree exactly (masks and keep masks are bit-identical), and
    # entries outside the mask must be bitwise untouched.
    for i, (x, y, w) in enumerate(zip(p1, p2, params)):
        assert torch.equal(same_bits(x, w), same_bits(y, w)), f"unchanged entries differ in tensor {i}"
        if masks is not None:
            assert same_bits(x, w)[~masks[i]].all(), f"masked-out entries of tensor {i} changed"
    ops.restore_(p1, b1, backend=backend)
    assert_lists_equal(p1, params, "restored")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_perturb_nonfinite_norm_keeps_weights(case, bad):
    backend, device = case
    sh = SHAPES["odd"][:3]
    params, grads = make(sh, torch.float32, device), make(sh, torch.float32, device)
    grads[2][5] = bad
    orig = clone(params)
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, 0.05, backend=backend)
    assert_lists_equal(params, orig, "params")
    assert_lists_equal(backups, orig, "backups")


def test_perturb_norm_finite_only_in_fp64(case):
    """A float64 norm beyond float32's range is finite: fp32 weights move by rho·g·0 like the reference
    (-0.0 becomes +0.0), which a finiteness test after rounding the norm to fp32 would skip."""
    backend, device = case
    params = [torch.tensor([-0.0, 1.0, -0.0, 2.0], device=device)]
    grads = [torch.tensor([1.0, -1.0, 3.0, 0.5], device=device)]
    sq = torch.tensor(1e300, dtype=torch.float64, device=device)
    mine, ref = clone(params), clone(params)
    ops.perturb_(mine, clone(grads), [torch.empty_like(p) for p in params], 0.05, sq_norm=sq, backend=backend)
    ops.perturb_(ref, clone(grads), [torch.empty_like(p) for p in params], 0.05, sq_norm=sq, backend="eager")
    assert torch.signbit(ref[0][0]).item() is False, "the reference no longer moves the weights here"
    assert_lists_equal(mine, ref, "params")


@pytest.mark.parametrize("keep_prob", [0.2, 0.75])
def test_keep_prob_fraction_and_seeds(case, keep_prob):
    backend, device = case
    n = 100_000
    sq = torch.tensor(1.0, device=device)

    def kept(seed):
        p = [torch.zeros(n, device=device)]
        ops.perturb_(p, [torch.ones(n, device=device)], [torch.empty(n, device=device)], 1.0, sq_norm=sq,
                     keep_prob=keep_prob, seed=seed, backend=backend)
        return p[0] != 0

    a, b, c = kept(5), kept(5), kept(6)
    assert torch.equal(a, keep_mask(n, tensor_key(5, 0), keep_prob, torch.device(device))), "not the reference hash"
    assert abs(int(a.sum()) - n * keep_prob) < 5 * math.sqrt(n * keep_prob * (1 - keep_prob))
    assert torch.equal(a, b) and not torch.equal(a, c)


SGD_CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True),
    dict(momentum=0.8, dampening=0.1, weight_decay=1e-2, maximize=True),
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=["plain", "nesterov", "dampening"])
def test_sgd_restore_step(case, dtype, atol, rtol, cfg):
    backend, device = case
    sh = shapes_for("odd", case)
    backups = make(sh, dtype, device)
    results = []
    for be in (backend, "eager"):
        params, bufs = make(sh, dtype, device), None
        torch.manual_seed(1)
        for _ in range(3):
            grads = make(sh, dtype, device)
            bufs = ops.sgd_restore_step_(params, backups, grads, bufs, lr=0.1, backend=be, **cfg)
        results.append((params, bufs))
    assert_lists_close(results[0][0], results[1][0], atol, rtol, "params")
    if cfg["momentum"]:
        assert_lists_close(results[0][1], results[1][1], atol, rtol, "momentum buffers")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_restore_step(case, dtype, atol, rtol, maximize):
    backend, device = case
    sh = shapes_for("conv", case)
    backups = make(sh, dtype, device)
    results = []
    for be in (backend, "eager"):
        params = make(sh, dtype, device)
        m = [torch.zeros_like(b) for b in backups]
        v = [torch.zeros_like(b) for b in backups]
        torch.manual_seed(1)
        for step in range(1, 4):
            grads = make(sh, dtype, device)
            ops.adamw_restore_step_(params, backups, grads, m, v, step, lr=1e-2, weight_decay=0.1,
                                    maximize=maximize, backend=be)
        results.append(params + m + v)
    assert_lists_close(results[0], results[1], atol * 10, rtol, "params+moments")


def descend(op, backend, params, backups, grads, state, amp, **tele):
    """One fused descent (sgd with momentum / adamw) of ``params`` from ``backups``; returns the state."""
    if op == "sgd":
        return ops.sgd_restore_step_(params, backups, grads, state, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                     backend=backend, **amp, **tele)
    m, v = state
    ops.adamw_restore_step_(params, backups, grads, m, v, 2, lr=1e-2, backend=backend, **amp, **tele)
    return state


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["sgd", "adamw"])
@pytest.mark.parametrize("amp", ["none", "scaled", "skipped"])
@pytest.mark.parametrize("with_ascent", [True, False], ids=["dot", "norm"])
def test_descent_sums(case, dtype, atol, rtol, op, amp, with_ascent):
    """Telemetry sums of the fused descents: [Σ g², Σ ⟨a, g⟩] of the grads as given (AMP-scaled) ADDED
    to sums (fp64 sums for fp64 data, else fp32), whether or not found_inf skips the step; the
    update is the one without sums, bitwise (same backend)."""
    backend, device = case
    sh = shapes_for("odd", case)
    backups, ascent = make(sh, dtype, device), make(sh, dtype, device)
    scale = 1024.0 if amp != "none" else 1.0
    grads = [g * scale for g in make(sh, dtype, device)]
    amp_kw = {} if amp == "none" else {"grad_scale": torch.tensor(scale, device=device),
                                       "found_inf": torch.tensor(float(amp == "skipped"), device=device)}
    sums_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    start = [0.5, -0.0]  # sums[1] must stay bitwise -0.0 without ascent_grads (an added +0.0 would flip it)
    got = {}
    for be in (backend, "eager"):
        for with_sums in (True, False):
            params = clone(backups) if amp == "skipped" else make(sh, dtype, device)
            state = None if op == "sgd" else ([torch.zeros_like(b) for b in backups],
                                              [torch.zeros_like(b) for b in backups])
            tele = {}
            if with_sums:
                tele["sums"] = torch.tensor(start, dtype=sums_dtype, device=device)
                if with_ascent:
                    tele["ascent_grads"] = ascent
            torch.manual_seed(3)
            p0 = clone(params)
            state = descend(op, be, params, backups, grads, state, amp_kw, **tele)
            flat_state = [] if state is None else (state if op == "sgd" else state[0] + state[1])
            got[be, with_sums] = (params, flat_state, tele.get("sums"), p0)
    exact_sq = sum(float((g.double() ** 2).sum()) for g in grads)
    exact_dot = sum(float((a.double() * g.double()).sum()) for a, g in zip(ascent, grads))
    for be in (backend, "eager"):
        sums = got[be, True][2]
        assert sums.dtype == sums_dtype
        close_scalar(sums[0] - start[0], exact_sq, 1e-10 if dtype == torch.float64 else 1e-5)
        if with_ascent:
            assert math.isclose(float(sums[1] - start[1]), exact_dot, rel_tol=1e-10 if dtype == torch.float64 else 1e-4,
                                abs_tol=1e-3 * math.sqrt(exact_sq) * scale if dtype != torch.float64 else 1e-9)
        else:
            assert float(sums[1]) == 0.0 and bool(torch.signbit(sums[1])), "sums[1] was written"
        # the sums never change the update: bitwise the same as the call without them
        assert_lists_equal(got[be, True][0], got[be, False][0])
        assert_lists_equal(got[be, True][1], got[be, False][1])
        if amp == "skipped":
            assert_lists_equal(got[be, True][0], backups)
    assert_lists_close(got[backend, True][0], got["eager", True][0], atol * 10, rtol, "params")


def test_descent_sums_with_an_ascent_grad_in_another_layout(case):
    """An ascent grad whose memory layout differs from its param's: that entry runs eagerly (the
    others fused) and the sums still cover every entry, once."""
    backend, device = case
    sh = [(6, 5), (4, 3, 2, 2), (7,)]
    params, backups, grads = (make(sh, torch.float64, device) for _ in range(3))
    ascent = make(sh, torch.float64, device)
    ascent[0] = ascent[0].t().contiguous().t()  # same values, column-major
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    ops.sgd_restore_step_(params, backups, grads, None, lr=0.1, ascent_grads=ascent, sums=sums, backend=backend)
    rec = ops.last_call["sgd_restore_step_"]
    assert rec.extra_lists == 1 and {p.backend for p in rec.parts} == {backend, "eager"}
    close_scalar(sums[0], sum(float((g * g).sum()) for g in grads), 1e-12)
    close_scalar(sums[1], sum(float((a * g).sum()) for a, g in zip(ascent, grads)), 1e-12)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", ["finite", "nan"])
@pytest.mark.parametrize("masked", [False, True])
def test_perturb_grad_copies(case, dtype, atol, rtol, norm, masked):
    """perturb_'s grad_copies: ← grads bitwise (NaN, -0.0, Inf included) for every element, whatever
    the mask or norm, with and without perturbation_sq; params/backups as without it."""
    backend, device = case
    sh = shapes_for("odd", case)
    grads = make(sh, dtype, device)
    special = torch.tensor([float("nan"), -0.0, float("inf"), 0.0], device=device).to(dtype)
    grads[2][:4] = special  # (127,)
    masks = [torch.rand(s, device=device) < 0.5 for s in sh] if masked else None
    sq = torch.tensor(float("nan") if norm == "nan" else 2.0, device=device)
    params = make(sh, dtype, device)
    results = []
    for tele in ({}, {"perturbation_sq": torch.zeros((), device=device)}, None):
        p, b = clone(params), [torch.empty_like(x) for x in params]
        copies = [torch.full_like(g, 3.0) for g in grads]
        kw = {} if tele is None else dict(tele, grad_copies=copies)
        ops.perturb_(p, grads, b, 0.05, sq_norm=sq, masks=masks, backend=backend, **kw)
        if tele is not None:
            for c, g in zip(copies, grads):
                assert bool(same_bits(c, g).all())
        results.append((p, b))
    for p, b in results[:2]:
        assert_lists_equal(p, results[2][0])
        assert_lists_equal(b, results[2][1])
    with pytest.raises((TypeError, ValueError)):
        ops.perturb_(clone(params), grads, [torch.empty_like(x) for x in params], 0.05,
                     grad_copies=[c.double() if c.dtype != torch.float64 else c.float() for c in grads],
                     backend=backend)


def test_descent_sums_reject_bad_arguments_before_writing(case):
    backend, device = case
    sh = [(5,), (3, 4)]
    params, backups, grads = make(sh, torch.float32, device), make(sh, torch.float32, device), make(sh, torch.float32,
                                                                                                     device)
    before = clone(params)
    good = torch.zeros(2, device=device)
    bad_calls = [
        (ValueError, dict(ascent_grads=grads)),  # no sums
        (TypeError, dict(sums=torch.zeros(3, device=device))),
        (TypeError, dict(sums=torch.zeros(2, dtype=torch.int64, device=device))),
        (TypeError, dict(sums=torch.zeros(2, 2, device=device)[:, 0])),  # not contiguous
        (ValueError, dict(sums=good, ascent_grads=grads[:1])),
        (TypeError, dict(sums=good, ascent_grads=[g.double() for g in grads])),
        (ValueError, dict(sums=good, ascent_grads=[torch.zeros(4, device=device), grads[1]])),
    ]
    for err, kw in bad_calls:
        with pytest.raises(err):
            ops.sgd_restore_step_(params, backups, grads, None, lr=0.1, momentum=0.9, backend=backend, **kw)
        assert_lists_equal(params, before)
        assert float(good.abs().sum()) == 0.0


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_variant_ops(case, dtype, atol, rtol):
    backend, device = case
    sh = shapes_for("conv", case)
    g, gs, f = make(sh, dtype, device), make(sh, dtype, device), make(sh, dtype, device, positive=True)
    ref_sq = torch.tensor(2.5, device=device)
    (g1,), (g2,), s1, s2 = both(lambda x, **k: ops.renormalize_(x, ref_sq, **k), g, backend=backend)
    assert_lists_close(g1, g2, atol, rtol, "renormalize_")
    close_scalar(s1, s2, 1e-10 if dtype == torch.float64 else 2e-5)
    (f1, _), (f2, _), _, _ = both(lambda a, b, **k: ops.fisher_accumulate_(a, b, scale=0.5, **k), f, g,
                                  backend=backend)
    assert_lists_close(f1, f2, atol, rtol, "fisher_accumulate_")
    gv = [torch.empty_like(x) for x in g]
    (v1, _, _), (v2, _, _), _, _ = both(ops.looksam_store_, gv, g, gs, backend=backend)
    assert_lists_close(v1, v2, atol * 10, rtol * 10, "looksam_store_")
    (a1, _), (a2, _), _, _ = both(lambda a, b, **k: ops.looksam_apply_(a, b, 0.7, **k), g, v2, backend=backend)
    assert_lists_close(a1, a2, atol * 10, rtol * 10, "looksam_apply_")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["float32", "bfloat16", "float64"])
def test_topk_mask_equals_eager(case, dtype):
    backend, device = case
    scores = make([(1000,), (37, 11), (0,), (5,)], dtype, device)
    scores[0][:50] = 0.25  # ties across the threshold
    scores[1][0, 0] = float("nan")
    scores[3][1] = float("inf")
    for density in (0.0, 0.05, 0.3, 0.999, 1.0):
        got = ops.topk_mask(scores, density, backend=backend)
        want = ops.topk_mask(scores, density, backend="eager")
        assert_lists_equal(got, want, f"density {density}")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3), (0, 4), (20, 40), (33, 64)])
def test_nm_mask_equals_eager(case, n, m):
    """Groups larger than 32 included (the CUDA kernel ranks those from memory, not registers)."""
    backend, device = case
    scores = make([(6, 16), (8, 3, 3, 3), (10,), (3, 13), (4, 100)], torch.float32, device)
    scores[3][0, 12] = float("nan")
    scores[0][1, :4] = 1.0
    assert_lists_equal(ops.nm_mask(scores, n, m, backend=backend), ops.nm_mask(scores, n, m, backend="eager"))


@pytest.mark.parametrize("row,kept", [
    ([1.0, float("nan"), 2.0, 3.0], [False, False, True, True]),      # NaN inside a group ranks last
    ([float("nan"), 1.0, 0.0, -1.0], [False, True, True, False]),     # and when it leads the group
    ([float("nan"), float("nan"), -5.0, float("-inf")], [False, False, True, True]),
])
def test_nm_mask_ranks_nan_last(case, row, kept):
    """2:4 by hand: the two largest scores of each group, NaN below every number (-inf included)."""
    backend, device = case
    mask = ops.nm_mask([torch.tensor(row, device=device)], 2, 4, backend=backend)[0]
    assert mask.cpu().tolist() == kept


def test_rejects_wrong_device_and_dtype_in_kernel():
    require_backend("cpp", "cpu")
    with pytest.raises(RuntimeError, match="expected"):
        torch.ops.sam_kernels.restore_([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        torch.ops.sam_kernels.grad_sq_norm([torch.zeros(3, dtype=torch.int32)], None, None, 0.0)
