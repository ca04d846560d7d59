"""The ``triton`` backend's own checks: its multi-tensor machinery (pointer-table cache, chunking,
int64 offsets, one launch per group, many programs), checks before any launch, telemetry cases the
op table's samples do not reach, and native compilation. Every op against the eager reference on
the table's samples: tests/ops/test_{reductions,perturb,descents,variants,masks}.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so shapes stay small. The group-level functions (``triton.OPS``) are called
directly with one homogeneous group, as dispatch does; the last tests go through the public ops.
The final test compiles every kernel natively for sm_90 (no GPU needed), which the interpreter
never does.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import sam_kernels.ops as ops
from sam_kernels.ops import reference
from tests.ops.opinfo import INT_OF
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_close, assert_lists_equal, require_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [(1,), (7,), (129,), (0,), (3, 5), (2, 3, 2, 2), (9000,)]
MANY = [(5,)] * 30 + [(3, 2)] * 10
EPS = 1e-12


@pytest.fixture(autouse=True)
def _triton():
    require_backend("triton", DEVICE)


def backend():
    from sam_kernels.ops.backends import triton as tb
    return tb


def make(shapes, dtype, positive=False):
    ts = [torch.randn(s, dtype=torch.float32, device=DEVICE).to(dtype) for s in shapes]
    return [t.abs() + 0.1 if positive else t for t in ts]


def masks_for(shapes):
    return [torch.rand(s, device=DEVICE) < 0.5 for s in shapes]


def clone(ts):
    return [t.clone() for t in ts]


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny BLOCK/CHUNK so small tensors span several programs and loop iterations."""
    from sam_kernels.ops.backends.triton import _tables
    monkeypatch.setattr(_tables, "BLOCK", 32)
    monkeypatch.setattr(_tables, "CHUNK", 64)


@pytest.fixture
def medium_blocks(monkeypatch):
    """Several programs per ~9k-element list without the interpreter's per-program cost of small_blocks."""
    from sam_kernels.ops.backends.triton import _tables
    monkeypatch.setattr(_tables, "BLOCK", 512)
    monkeypatch.setattr(_tables, "CHUNK", 2048)


@pytest.fixture
def launches(monkeypatch):
    """Kernel names launched, in order (wraps the single launcher)."""
    from sam_kernels.ops.backends.triton import _tables
    names = []
    real = _tables.launch

    def counting(kernel, n_programs, *args, **kwargs):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        real(kernel, n_programs, *args, **kwargs)

    monkeypatch.setattr(_tables, "launch", counting)
    return names


# --------------------------------------------------------------------------- backend module

def test_module_contract():
    tb = backend()
    assert tb.unavailable_reason() is None
    assert DEVICE in tb.DEVICES


# --------------------------------------------------------------------------- reductions

def test_reductions_many_small_tensors_and_chunks(small_blocks):
    g, p = make(MANY + SHAPES, torch.float32), make(MANY + SHAPES, torch.float32)
    assert_close(backend().OPS["grad_sq_norm"](g, p, None, 0.01), reference.grad_sq_norm(g, p, None, 0.01),
                 1e-6, 1e-5, "sq_norm")
    assert_close(backend().OPS["dot"](g, p), reference.dot(g, p), 1e-6, 1e-5, "dot")


def test_all_empty_group():
    g = [torch.zeros(0, device=DEVICE)]
    assert backend().OPS["grad_sq_norm"](g, None, None, 0.0).item() == 0.0
    backend().OPS["restore_"](g, clone(g))


# --------------------------------------------------------------------------- perturb / restore

PERTURB_CASES = {
    "plain": dict(masked=False, adaptive=False, keep_prob=1.0),
    "masked": dict(masked=True, adaptive=False, keep_prob=1.0),
    "adaptive": dict(masked=False, adaptive=True, keep_prob=1.0),
    "keep": dict(masked=False, adaptive=False, keep_prob=0.6),
    "all": dict(masked=True, adaptive=True, keep_prob=0.7),
}


def run_perturb(fn, params, grads, sq_norm, masks, case, seed=1234):
    backups = [torch.empty_like(p) for p in params]
    keys = [reference.tensor_key(seed, i) for i in range(len(params))]
    fn(params, grads, backups, sq_norm, 0.05, EPS, masks if case["masked"] else None, case["adaptive"], 0.01,
       case["keep_prob"], keys)
    return backups


def selection(params, masks, case, seed=1234):
    """Entries the perturbation may touch (mask & keep mask)."""
    sel = []
    for i, p in enumerate(params):
        s = torch.ones(p.shape, dtype=torch.bool, device=p.device)
        if case["masked"]:
            s &= masks[i]
        if case["keep_prob"] < 1.0:
            key = reference.tensor_key(seed, i)
            s &= reference.keep_mask(p.numel(), key, case["keep_prob"], p.device).view_as(p)
        sel.append(s)
    return sel


def test_perturb_many_tensors_multi_chunk(small_blocks):
    case = PERTURB_CASES["all"]
    shapes = MANY + SHAPES
    w, g, m = make(shapes, torch.float32), make(shapes, torch.float32), masks_for(shapes)
    sq = reference.grad_sq_norm(g, None, None, 0.0)
    got, want = clone(w), clone(w)
    run_perturb(backend().OPS["perturb_"], got, g, sq, m, case)
    run_perturb(reference.perturb_, want, g, sq, m, case)
    assert_lists_close(got, want, 1e-6, 1e-5, "params")


def test_keep_mask_bit_identical(small_blocks):
    """With w = 0 and g = 1 an entry changes iff it is kept: the kept set must equal reference.keep_mask."""
    shapes = [(1,), (7,), (129,), (1000,), (4, 33)]
    w = [torch.zeros(s, device=DEVICE) for s in shapes]
    g = [torch.ones(s, device=DEVICE) for s in shapes]
    for keep_prob, seed in [(0.5, 0), (0.9, 2**40 + 3), (0.13, 77)]:
        case = dict(masked=False, adaptive=False, keep_prob=keep_prob)
        got = clone(w)
        run_perturb(backend().OPS["perturb_"], got, g, torch.tensor(1.0, device=DEVICE), None, case, seed=seed)
        for i, (t, s) in enumerate(zip(got, shapes)):
            want = reference.keep_mask(t.numel(), reference.tensor_key(seed, i), keep_prob, t.device).view(s)
            assert torch.equal(t != 0, want), f"keep mask of tensor {i} (keep_prob={keep_prob}, seed={seed})"


def test_int64_offsets_and_keep_mask_beyond_2_32():
    """Element indices past 2^32 without allocating 16 GiB: a hand-made table points each tensor
    4·start bytes before its data and gives the program the chunk starting at element ``start``,
    so the kernel computes int64 offsets >= 2^32 and the hash's high word, on real memory."""
    from sam_kernels.ops.backends.triton import _tables, perturb
    import triton.language as tl
    start, n, keep_prob = 5 * 2**32 + 2**31 - 40, 100, 0.5
    w, g, b = torch.zeros(n, device=DEVICE), torch.ones(n, device=DEVICE), torch.empty(n, device=DEVICE)
    c = torch.full((n,), 3.0, device=DEVICE)
    key = reference.tensor_key(9, 0)
    ptrs = torch.tensor([[t.data_ptr() - 4 * start] for t in (w, g, b, c)], dtype=torch.int64, device=DEVICE)
    as_dev = dict(dtype=torch.int64, device=DEVICE)
    partials = torch.full((1, 1), float("nan"), device=DEVICE)
    _tables.launch(perturb._perturb_kernel, 1, ptrs[0], ptrs[1], ptrs[2], ptrs[0], torch.tensor([start + n], **as_dev),
                   torch.tensor([[0, start]], **as_dev), torch.tensor([key], **as_dev), torch.tensor(1.0, device=DEVICE),
                   1.0, 0.0, 0.0, keep_prob, int(keep_prob * 2**24), partials, ptrs[3], DT=tl.float32, CDT=tl.float32,
                   BLOCK=64, CHUNK=128, ALIGNED=False, MASKED=False, ADAPTIVE=False, KEEP=True, PERTURBATION_SQ=True,
                   GRAD_COPIES=True, INTO=False)
    i = torch.arange(start, start + n, device=DEVICE)
    r = reference.fmix32(reference.fmix32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32))
    kept = (r >> 8) < int(keep_prob * 2**24)
    assert torch.equal(w != 0, kept)
    assert torch.equal(b, torch.zeros_like(b))
    assert torch.equal(c, g), "grad copy at offsets >= 2^32"
    # Each kept entry moves by rho/(sqrt(1) + 0)/keep_prob = 2: the program's partial is 4 per kept entry.
    assert 0 < int(kept.sum()) < n and partials.item() == 4.0 * int(kept.sum())


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_perturb_non_finite_scale_leaves_params(bad):
    """sq_norm NaN/inf gives a non-finite (or zero-norm, eps=0: infinite) scale: params bitwise unchanged."""
    w, g = make(SHAPES, torch.float32), make(SHAPES, torch.float32)
    got = clone(w)
    backups = [torch.empty_like(t) for t in w]
    backend().OPS["perturb_"](got, g, backups, torch.tensor(bad, device=DEVICE), 0.05, 0.0, None, False, 0.01, 1.0,
                              [0] * len(w))
    assert_lists_equal(got, w, "params")
    assert_lists_equal(backups, w, "backups")


# --------------------------------------------------------------------------- telemetry sums of the fused descents

DESCENT_SHAPES = [(7,), (3, 5), (129,), (9000,)]  # 9000 > CHUNK: one tensor spans two programs


@pytest.mark.parametrize("op", ["sgd_restore_step_", "adamw_restore_step_"])
@pytest.mark.parametrize("found", [0.0, 1.0], ids=["taken", "skipped"])
def test_descent_sums_many_programs(op, found, small_blocks, launches):
    """~200 programs (BLOCK 32, CHUNK 64), so the final program loops over several BLOCKs of
    partials; many small tensors too. Group-level call vs the reference, fp64 sums of fp32 tensors."""
    shapes = MANY + DESCENT_SHAPES
    w, backups, g, a, m = (make(shapes, torch.float32) for _ in range(5))
    v = make(shapes, torch.float32, positive=True)
    amp = dict(grad_scale=torch.tensor(4.0, device=DEVICE), found_inf=torch.tensor(found, device=DEVICE))
    kw = (dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True,
               init_buffers=False) if op == "sgd_restore_step_" else
          dict(step=2, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, maximize=False))
    state = [m] if op == "sgd_restore_step_" else [m, v]
    got, want = [clone(w), *map(clone, state)], [clone(w), *map(clone, state)]
    got_sums = torch.tensor([1.0, 2.0], dtype=torch.float64, device=DEVICE)
    want_sums = got_sums.clone()
    backend().OPS[op](got[0], backups, g, *got[1:], **kw, **amp, ascent_grads=a, sums=got_sums)
    assert launches == [f"_{op[:-1]}_kernel", "add_partials_kernel"]
    getattr(reference, op)(want[0], backups, g, *want[1:], **kw, **amp, ascent_grads=a, sums=want_sums)
    for what, x, y in zip(("params", "state0", "state1"), got, want):
        assert_lists_close(x, y, 1e-6, 1e-5, what)
    assert_close(got_sums, want_sums, 1e-6, 1e-5, "sums")


def test_descent_sums_dense_layouts():
    """Lists in one non-contiguous memory order (channels_last), and an ascent grad whose strides
    differ from its grad's only on a size-1 dim: accepted, read element-aligned, as the reference."""
    shapes = [(2, 3, 4, 5), (4, 1, 3)]
    channels_last = lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t  # noqa: E731
    lists = [[channels_last(t) for t in make(shapes, torch.float32)] for _ in range(5)]
    w, backups, g, a, m = lists
    a[1] = torch.empty_strided((4, 1, 3), (3, 1, 1), device=DEVICE).copy_(a[1])
    assert a[1].stride() != g[1].stride() and not g[0].is_contiguous()
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
              init_buffers=False)
    got, want = [clone(w), clone(m)], [clone(w), clone(m)]
    got_sums, want_sums = torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    backend().OPS["sgd_restore_step_"](got[0], backups, g, got[1], **kw, ascent_grads=a, sums=got_sums)
    reference.sgd_restore_step_(want[0], backups, g, want[1], **kw, ascent_grads=a, sums=want_sums)
    for what, x, y in zip(("params", "momentum buffers"), got, want):
        assert_lists_close(x, y, 1e-6, 1e-5, what)
    assert_close(got_sums, want_sums, 1e-6, 1e-5, "sums")


def _bad_telemetry(w, g):
    """(what, kwargs, exception) for each rejected ascent_grads/sums combination."""
    ok = torch.zeros(2, device=DEVICE)
    a = clone(g)
    transposed = [t.t().contiguous().t() if t.dim() == 2 else t for t in g]
    return [
        ("ascent_grads without sums", dict(ascent_grads=a), ValueError),
        ("float16 sums", dict(sums=torch.zeros(2, dtype=torch.float16, device=DEVICE)), TypeError),
        ("int sums", dict(sums=torch.zeros(2, dtype=torch.int64, device=DEVICE)), TypeError),
        ("sums not a tensor", dict(sums=[0.0, 0.0]), TypeError),
        ("3 sums", dict(sums=torch.zeros(3, device=DEVICE)), ValueError),
        ("2-D sums", dict(sums=torch.zeros(1, 2, device=DEVICE)), ValueError),
        ("strided sums", dict(sums=torch.zeros(4, device=DEVICE)[::2]), ValueError),
        ("sums on another device", dict(sums=torch.zeros(2, device="meta")), ValueError),
        ("one ascent grad short", dict(sums=ok, ascent_grads=a[:-1]), ValueError),
        ("ascent grad of another dtype", dict(sums=ok, ascent_grads=[a[0].double(), *a[1:]]), TypeError),
        ("ascent grad of another shape", dict(sums=ok, ascent_grads=[*a[:-1], a[-1][:-1]]), ValueError),
        ("ascent grad in another memory order", dict(sums=ok, ascent_grads=transposed), ValueError),
        ("ascent grad not a tensor", dict(sums=ok, ascent_grads=[None, *a[1:]]), TypeError),
    ]


@pytest.mark.parametrize("op", ["sgd_restore_step_", "adamw_restore_step_"])
def test_descent_sums_rejected_before_any_write(op, launches):
    """Bad sums/ascent_grads raise TypeError/ValueError from the triton group function before any
    launch: params, state and sums keep their bits."""
    w, backups, g, m = (make(DESCENT_SHAPES, torch.float32) for _ in range(4))
    v = make(DESCENT_SHAPES, torch.float32, positive=True)
    kw = (dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
               init_buffers=False) if op == "sgd_restore_step_" else
          dict(step=1, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, maximize=False))
    state = [m] if op == "sgd_restore_step_" else [m, v]
    for what, tele, exc in _bad_telemetry(w, g):
        got = [clone(w), *map(clone, state)]
        sums = tele.get("sums")
        before = sums.clone() if isinstance(sums, torch.Tensor) and sums.device.type != "meta" else None
        with pytest.raises(exc):
            backend().OPS[op](got[0], backups, g, *got[1:], **kw, **tele)
        assert launches == [], what
        for got_list, want_list in zip(got, [w, *state]):
            assert_lists_equal(got_list, want_list, what)
        if before is not None:
            assert_lists_equal([sums], [before], what)


# --------------------------------------------------------------------------- telemetry: perturb_'s perturbation_sq

def run_perturb_sq(fn, params, grads, sq_norm, masks, case, out):
    """run_perturb with ``perturbation_sq=out`` (None: without the argument)."""
    backups = [torch.empty_like(p) for p in params]
    keys = [reference.tensor_key(1234, i) for i in range(len(params))]
    tele = {} if out is None else dict(perturbation_sq=out)
    fn(params, grads, backups, sq_norm, 0.05, EPS, masks if case["masked"] else None, case["adaptive"], 0.01,
       case["keep_prob"], keys, **tele)
    return backups


def test_perturbation_sq_many_programs(small_blocks, launches):
    """~200 programs (BLOCK 32, CHUNK 64): the final program loops over several BLOCKs of partials;
    many small tensors too. One extra launch, vs the reference (fp64 sum of fp32 tensors)."""
    case = PERTURB_CASES["all"]
    shapes = MANY + SHAPES
    w, g, m = make(shapes, torch.float32), make(shapes, torch.float32), masks_for(shapes)
    sq = reference.grad_sq_norm(g, None, None, 0.0)
    got, want = clone(w), clone(w)
    got_sq = torch.tensor([-2.0], dtype=torch.float64, device=DEVICE)
    want_sq = got_sq.clone()
    run_perturb_sq(backend().OPS["perturb_"], got, g, sq, m, case, got_sq)
    assert launches == ["_perturb_kernel", "add_partials_kernel"]
    run_perturb_sq(reference.perturb_, want, g, sq, m, case, want_sq)
    assert_lists_close(got, want, 1e-6, 1e-5, "params")
    assert_close(got_sq, want_sq, 1e-6, 1e-5, "perturbation_sq")
    launches.clear()
    run_perturb_sq(backend().OPS["perturb_"], clone(w), g, sq, m, case, None)
    assert launches == ["_perturb_kernel"], "the reduction launched without perturbation_sq"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter evaluates both where() arms
@pytest.mark.parametrize("case", ["masked", "keep"])
def test_perturbation_sq_unselected_non_finite_weights(case):
    """Unselected entries add exactly 0 even where the weight is NaN or ±inf (NaN − NaN would not):
    the same bits as with those weights at 0."""
    case = PERTURB_CASES[case]
    w, g, m = make(SHAPES, torch.float32), make(SHAPES, torch.float32), masks_for(SHAPES)
    sel = selection(w, m, case)
    bad = clone(w)
    for t, s in zip(bad, sel):
        off = t.view(-1)[~s.view(-1)]
        off[0::3], off[1::3], off[2::3] = float("nan"), float("inf"), float("-inf")
        t.view(-1)[~s.view(-1)] = off
    zeroed = [torch.where(s, t, torch.zeros_like(t)) for t, s in zip(w, sel)]
    assert sum(int((~t.isfinite()).sum()) for t in bad) > 100
    sq = reference.grad_sq_norm(g, None, None, 0.0)
    got_sq, zero_sq = torch.zeros((), device=DEVICE), torch.zeros((), device=DEVICE)
    run_perturb_sq(backend().OPS["perturb_"], bad, g, sq, m, case, got_sq)
    run_perturb_sq(backend().OPS["perturb_"], zeroed, g, sq, m, case, zero_sq)
    assert got_sq.item() > 0 and torch.equal(got_sq, zero_sq)
    for t, z, s in zip(bad, zeroed, sel):
        assert_lists_equal([t[s]], [z[s]], "selected entries")


def test_perturbation_sq_public_groups_and_version():
    """sam_kernels.ops.perturb_ with mixed dtypes (two groups, two launches adding into one output),
    vs eager; the output's version counter is bumped (written through a raw pointer)."""
    shapes = [(7,), (0,), (3, 5), (129,), (9000,)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    w = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, dtypes)]
    g = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, dtypes)]
    m = masks_for(shapes)
    outs, params = {}, {}
    for name in ("triton", "eager"):
        outs[name] = torch.full((1,), 0.25, device=DEVICE)
        version = outs[name]._version
        params[name] = clone(w)
        ops.perturb_(params[name], g, [torch.empty_like(t) for t in w], 0.05, masks=m, keep_prob=0.5, seed=3,
                     backend=name, perturbation_sq=outs[name])
        assert outs[name]._version > version, f"{name}: version not bumped"
    assert_lists_close(params["triton"], params["eager"], 1e-2, 1e-2, "params")
    assert_close(outs["triton"], outs["eager"], 1e-6, 1e-5, "perturbation_sq")
    with torch.inference_mode():  # an inference tensor has no version counter: accepted, not bumped
        out = torch.zeros((), device=DEVICE)
        ops.perturb_(clone(w), g, [torch.empty_like(t) for t in w], 0.05, backend="triton", perturbation_sq=out)
    assert out.item() > 0


def _bad_perturbation_sq():
    """(what, value, exception) for each rejected perturbation_sq."""
    return [
        ("float16", torch.zeros(1, dtype=torch.float16, device=DEVICE), TypeError),
        ("bfloat16", torch.zeros((), dtype=torch.bfloat16, device=DEVICE), TypeError),
        ("int", torch.zeros(1, dtype=torch.int64, device=DEVICE), TypeError),
        ("not a tensor", 0.0, TypeError),
        ("a list", [torch.zeros((), device=DEVICE)], TypeError),
        ("2 elements", torch.zeros(2, device=DEVICE), ValueError),
        ("no element", torch.zeros(0, device=DEVICE), ValueError),
        ("2-D", torch.zeros(1, 1, device=DEVICE), ValueError),
        ("on another device", torch.zeros(1, device="meta"), ValueError),
    ]


def test_perturbation_sq_rejected_before_any_write(launches):
    """A bad perturbation_sq raises TypeError/ValueError from the triton group function before any
    launch: params, backups (and the output) keep their bits."""
    w, g = make(DESCENT_SHAPES, torch.float32), make(DESCENT_SHAPES, torch.float32)
    sentinel = [torch.full_like(t, 7.0) for t in w]
    sq = reference.grad_sq_norm(g, None, None, 0.0)
    for what, out, exc in _bad_perturbation_sq():
        got, backups = clone(w), clone(sentinel)
        before = out.clone() if isinstance(out, torch.Tensor) and out.device.type != "meta" else None
        with pytest.raises(exc, match="perturbation_sq"):
            backend().OPS["perturb_"](got, g, backups, sq, 0.05, EPS, masks_for(DESCENT_SHAPES), True, 0.01, 0.5,
                                      list(range(len(w))), perturbation_sq=out)
        assert launches == [], what
        assert_lists_equal(got, w, f"{what}: params")
        assert_lists_equal(backups, sentinel, f"{what}: backups")
        if before is not None:
            assert torch.equal(out, before), what


# --------------------------------------------------------------------------- telemetry: perturb_'s grad_copies

NAN_BITS = {  # (a quiet NaN with a payload, a negative signalling NaN), unsigned bits: they must survive exactly
    torch.float32: (0x7FC12345, 0xFFA00001),
    torch.float64: (0x7FF8000000000123, 0xFFF0000000000001),
    torch.float16: (0x7E01, 0xFC01),
    torch.bfloat16: (0x7FC1, 0xFF81),
}


def special_grads(shapes, dtype):
    """Random grads whose first entries of every tensor of >= 7 elements are NaNs with payloads, -0.0,
    +0.0, ±inf and the smallest subnormal: the bits a copy through the compute type could change."""
    g = make(shapes, dtype)
    bits = torch.finfo(dtype).bits
    quiet, signalling = (u - (1 << bits) if u >> (bits - 1) else u for u in NAN_BITS[dtype])  # as signed ints
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    for t in g:
        if t.numel() >= 7:
            flat = t.view(-1)
            ints = flat.view(INT_OF[dtype])
            ints[0], ints[1] = quiet, signalling
            flat[2], flat[3], flat[4], flat[5], flat[6] = -0.0, 0.0, float("inf"), float("-inf"), tiny
            assert torch.isnan(flat[:2]).all() and torch.signbit(flat[2]) and 0 < flat[6] < torch.finfo(dtype).tiny
    return g


def run_perturb_tele(fn, params, grads, sq_norm, masks, case, **tele):
    """run_perturb with telemetry keywords (perturbation_sq, grad_copies)."""
    backups = [torch.empty_like(p) for p in params]
    keys = [reference.tensor_key(1234, i) for i in range(len(params))]
    fn(params, grads, backups, sq_norm, 0.05, EPS, masks if case["masked"] else None, case["adaptive"], 0.01,
       case["keep_prob"], keys, **tele)
    return backups


def sentinel_copies(grads):
    """grad_copies prefilled with 3.0: every entry must be overwritten."""
    return [torch.full_like(g, 3.0) for g in grads]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(PERTURB_CASES), ids=list(PERTURB_CASES))
def test_grad_copies(dtype, atol, rtol, case):
    """grad_copies ← grads bitwise (NaN payloads, -0.0, ±inf, subnormals; 9000 > CHUNK: one tensor
    spans two programs, and tails), every element whatever the mask/keep selection; params and
    backups bitwise as without it, vs the reference; with perturbation_sq too, the sum unchanged."""
    case = PERTURB_CASES[case]
    w, g, m = make(SHAPES, dtype), special_grads(SHAPES, dtype), masks_for(SHAPES)
    sq = torch.tensor(0.01, device=DEVICE)  # finite (these grads' norm is NaN), and steps that survive bf16 rounding
    op = backend().OPS["perturb_"]
    plain = clone(w)
    plain_backups = run_perturb_tele(op, plain, g, sq, m, case)
    got, copies = clone(w), sentinel_copies(g)
    backups = run_perturb_tele(op, got, g, sq, m, case, grad_copies=copies)
    assert_lists_equal(copies, g, "grad_copies")
    assert_lists_equal(got, plain, "params: with grad_copies vs without")
    assert_lists_equal(backups, plain_backups, "backups: with grad_copies vs without")
    assert_lists_equal(backups, w, "backups")
    want, want_copies = clone(w), sentinel_copies(g)
    run_perturb_tele(reference.perturb_, want, g, sq, m, case, grad_copies=want_copies)
    assert_lists_equal(want_copies, g, "reference grad_copies")
    assert_lists_close(got, want, atol, rtol, "params")
    assert sum(int((a != b).sum()) for a, b in zip(got, w)) > 1000, "the weights did not move"
    # Both outputs in one call (finite grads, or the sum is NaN): the same copies, params and sum as each alone.
    g = make(SHAPES, dtype)
    g[1][0], g[1][1] = -0.0, 0.0
    alone, both, both_copies = clone(w), clone(w), sentinel_copies(g)
    sq_alone, sq_both = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    run_perturb_tele(op, alone, g, sq, m, case, perturbation_sq=sq_alone)
    run_perturb_tele(op, both, g, sq, m, case, perturbation_sq=sq_both, grad_copies=both_copies)
    assert_lists_equal(both_copies, g, "grad_copies with perturbation_sq")
    assert_lists_equal(both, alone, "params with both outputs")
    assert sq_both.item() > 1e-4 and torch.equal(sq_both, sq_alone)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter computes with the NaN grads
def test_grad_copies_many_programs(small_blocks, launches):
    """~200 programs (BLOCK 32, CHUNK 64), many small tensors: the copies come from the one
    perturb launch (no copy kernel), alone or with perturbation_sq's reduction."""
    case = PERTURB_CASES["all"]
    shapes = MANY + SHAPES
    w, g, m = make(shapes, torch.float32), special_grads(shapes, torch.float32), masks_for(shapes)
    sq = reference.grad_sq_norm(w, None, None, 0.0)
    got, copies = clone(w), sentinel_copies(g)
    run_perturb_tele(backend().OPS["perturb_"], got, g, sq, m, case, grad_copies=copies)
    assert launches == ["_perturb_kernel"]
    assert_lists_equal(copies, g, "grad_copies")
    want = clone(w)
    run_perturb_tele(reference.perturb_, want, g, sq, m, case)
    assert_lists_close(got, want, 1e-6, 1e-5, "params")
    launches.clear()
    copies, out = sentinel_copies(g), torch.zeros(1, dtype=torch.float64)
    run_perturb_tele(backend().OPS["perturb_"], clone(w), g, sq, m, case, grad_copies=copies, perturbation_sq=out)
    assert launches == ["_perturb_kernel", "add_partials_kernel"]
    assert_lists_equal(copies, g, "grad_copies with perturbation_sq")


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", [d for d, _, _ in DTYPES], ids=DTYPE_IDS)
@pytest.mark.parametrize("why", ["nan_norm", "inf_norm", "found_inf", "nan_grad"])
def test_grad_copies_when_nothing_moves(dtype, why):
    """Through sam_kernels.ops.perturb_ (masks, ASAM, keep_prob, perturbation_sq on): a non-finite
    norm (given, or from a NaN gradient), or a non-zero found_inf under a loss scale, leaves every
    weight bitwise unchanged and still copies every grad bitwise, on triton as on eager."""
    shapes = [(7,), (3, 5), (9000,)]
    w, g, m = make(shapes, dtype), special_grads(shapes, dtype), masks_for(shapes)
    kw = dict(masks=m, adaptive=True, keep_prob=0.7, seed=5)
    if why == "found_inf":
        kw.update(grad_scale=torch.tensor(1024.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE))
    elif why != "nan_grad":  # nan_grad: the default norm of these grads is NaN
        kw.update(sq_norm=torch.tensor(float("nan" if why == "nan_norm" else "inf"), device=DEVICE))
    for name in ("triton", "eager"):
        got, backups, copies = clone(w), [torch.empty_like(t) for t in w], sentinel_copies(g)
        out = torch.tensor([1.5], dtype=torch.float64, device=DEVICE)
        ops.perturb_(got, g, backups, 0.05, backend=name, perturbation_sq=out, grad_copies=copies, **kw)
        assert ops.last_used["perturb_"] == name
        assert_lists_equal(copies, g, f"{name}: grad_copies")
        assert_lists_equal(got, w, f"{name}: params")
        assert_lists_equal(backups, w, f"{name}: backups")
        assert out.item() == 1.5, f"{name}: perturbation_sq"


def test_grad_copies_public_groups_layouts_and_version():
    """sam_kernels.ops.perturb_ with mixed dtypes (two triton groups), a channels_last weight (its
    grad and copy channels_last too) and an empty tensor: copies bitwise, params as eager; the
    non-empty copies' version counters are bumped (written through raw pointers), not the grads'."""
    shapes = [(7,), (0,), (3, 5), (129,), (2, 3, 4, 5)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    w = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, dtypes)]
    g = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, dtypes)]
    w[-1], g[-1] = (t.contiguous(memory_format=torch.channels_last) for t in (w[-1], g[-1]))
    g[0][3] = -0.0
    params = {}
    for name in ("triton", "eager"):
        copies = [torch.empty_like(t) for t in g]  # preserve_format: channels_last stays channels_last
        versions = [c._version for c in copies]
        grad_versions = [t._version for t in g]
        params[name] = clone(w)
        ops.perturb_(params[name], g, [torch.empty_like(t) for t in w], 0.05, keep_prob=0.5, seed=3, backend=name,
                     grad_copies=copies)
        assert ops.last_used["perturb_"] == name
        assert_lists_equal(copies, g, f"{name}: grad_copies")
        assert copies[-1].is_contiguous(memory_format=torch.channels_last)
        assert all(c._version > v for c, v in zip(copies, versions) if c.numel()), f"{name}: versions not bumped"
        assert [t._version for t in g] == grad_versions, f"{name}: grads' versions bumped"
    assert_lists_close(params["triton"], params["eager"], 1e-2, 1e-2, "params")
    with torch.inference_mode():  # inference tensors have no version counter: accepted, not bumped
        copies = [torch.empty_like(t) for t in g]
        ops.perturb_(clone(w), g, [torch.empty_like(t) for t in w], 0.05, backend="triton", grad_copies=copies)
    assert_lists_equal(copies, g, "inference-mode grad_copies")


def _bad_grad_copies(g):
    """(what, value, exception) for each rejected grad_copies (grads of DESCENT_SHAPES, one 2-D)."""
    ok = [torch.zeros_like(t) for t in g]
    transposed = [t.t().contiguous().t() if t.dim() == 2 else t for t in ok]
    return [
        ("a tensor, not a list", ok[0], TypeError),
        ("one short", ok[:-1], ValueError),
        ("one too many", ok + ok[:1], ValueError),
        ("an entry not a tensor", [None, *ok[1:]], TypeError),
        ("float64 entry", [ok[0].double(), *ok[1:]], TypeError),
        ("bfloat16 entry", [*ok[:-1], ok[-1].bfloat16()], TypeError),
        ("shape", [*ok[:-1], ok[-1][:-1]], ValueError),
        ("flattened", [t.view(-1) for t in ok], ValueError),
        ("another memory order", transposed, ValueError),
        ("strided view", [*ok[:-1], torch.zeros(2 * ok[-1].numel(), device=DEVICE)[::2]], ValueError),
        ("on another device", [*ok[:-1], torch.zeros(ok[-1].shape, device="meta")], ValueError),
        ("sparse", [*ok[:-1], ok[-1].to_sparse()], ValueError),
    ]


def test_grad_copies_rejected_before_any_write(launches):
    """A bad grad_copies raises TypeError/ValueError from the triton group function before any
    launch, also with a valid perturbation_sq: params, backups, the copies and the sum keep their bits."""
    w, g = make(DESCENT_SHAPES, torch.float32), make(DESCENT_SHAPES, torch.float32)
    sentinel = [torch.full_like(t, 7.0) for t in w]
    sq = reference.grad_sq_norm(g, None, None, 0.0)
    for what, copies, exc in _bad_grad_copies(g):
        for out in (None, torch.full((1,), 0.5)):
            got, backups = clone(w), clone(sentinel)
            tele = {} if out is None else dict(perturbation_sq=out)
            before = [c.clone() for c in copies if isinstance(c, torch.Tensor) and c.device.type != "meta"
                      and c.layout == torch.strided] if isinstance(copies, list) else []
            with pytest.raises(exc, match="grad_copies"):
                backend().OPS["perturb_"](got, g, backups, sq, 0.05, EPS, masks_for(DESCENT_SHAPES), True, 0.01, 0.5,
                                          list(range(len(w))), grad_copies=copies, **tele)
            assert launches == [], what
            assert_lists_equal(got, w, f"{what}: params")
            assert_lists_equal(backups, sentinel, f"{what}: backups")
            after = [c for c in copies if isinstance(c, torch.Tensor) and c.device.type != "meta"
                     and c.layout == torch.strided] if isinstance(copies, list) else []
            assert_lists_equal(after, before, f"{what}: grad_copies")
            assert out is None or out.item() == 0.5, what


# --------------------------------------------------------------------------- masks

def tricky_scores(shapes, dtype):
    """Coarse values (many ties), a NaN, -0.0/+0.0 and infinities."""
    ts = [(torch.randn(s, device=DEVICE) * 2).round().to(dtype) for s in shapes]
    flat = [t.view(-1) for t in ts if t.numel() >= 4]
    flat[0][0], flat[0][1], flat[1][0], flat[1][1], flat[2][0] = float("nan"), -0.0, 0.0, float("-inf"), float("inf")
    return ts


@pytest.mark.parametrize("dtype", [d for d, _, _ in DTYPES], ids=DTYPE_IDS)
def test_topk_mask_exact(dtype, medium_blocks):
    scores = tricky_scores(SHAPES, dtype)
    total = sum(s.numel() for s in scores)
    for k in (0, 1, 77, total - 1, total):
        got = backend().OPS["topk_mask"](scores, k)
        assert sum(int(m.sum()) for m in got) == k
        assert_lists_equal(got, reference.topk_mask(scores, k), f"topk k={k}")


def test_mask_special_values():
    """As the reference ranks them: NaN strictly lowest (below -inf), ±inf tie with ±DBL_MAX."""
    big = torch.finfo(torch.float64).max
    scores = [torch.tensor([float("nan"), float("-inf"), -big, 1.0], dtype=torch.float64, device=DEVICE),
              torch.tensor([big, float("inf"), float("nan")], dtype=torch.float64, device=DEVICE)]
    for k in range(8):
        assert_lists_equal(backend().OPS["topk_mask"](scores, k), reference.topk_mask(scores, k), f"topk k={k}")
    # A trailing partial group holding NaNs still keeps min(n, r) entries: padding ranks after NaN.
    scores = [torch.tensor([[1.0, 2.0, 3.0, 4.0, float("nan"), 5.0, float("nan")]], device=DEVICE)]
    for n in range(5):
        assert_lists_equal(backend().OPS["nm_mask"](scores, n, 4), reference.nm_mask(scores, n, 4), f"nm {n}:4")


def test_topk_mask_mixed_dtypes():
    scores = tricky_scores(SHAPES, torch.float32)
    scores[2], scores[4] = scores[2].to(torch.bfloat16), scores[4].double()
    for k in (3, 100):
        assert_lists_equal(backend().OPS["topk_mask"](scores, k), reference.topk_mask(scores, k), f"topk k={k}")


@pytest.mark.parametrize("dtype", [d for d, _, _ in DTYPES], ids=DTYPE_IDS)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 3), (0, 2), (3, 8), (5, 5), (1, 1), (2, 130)])
def test_nm_mask_exact(dtype, n, m):
    shapes = [(7,), (4, 10), (3, 2, 3, 3), (0,), (5, 1), (2, 300)]
    scores = tricky_scores(shapes, dtype)
    assert_lists_equal(backend().OPS["nm_mask"](scores, n, m), reference.nm_mask(scores, n, m), f"nm {n}:{m}")


# --------------------------------------------------------------------------- multi-tensor machinery

def test_table_cache_reused_and_rebuilt():
    from sam_kernels.ops.backends.triton import _tables
    w = make(MANY, torch.float32)
    g = make(MANY, torch.float32)
    first = _tables.table([w, g])
    assert _tables.table([w, g]) is first
    g = make(MANY, torch.float32)  # grads re-created, e.g. after zero_grad(set_to_none=True)
    rebuilt = _tables.table([w, g])
    assert rebuilt is not first
    assert rebuilt.ptrs[1].tolist() == [t.data_ptr() for t in g]
    assert rebuilt.n_blocks == len(MANY) and rebuilt.sizes.tolist() == [t.numel() for t in w]


def test_table_chunking():
    from sam_kernels.ops.backends.triton import _tables
    ts = [torch.empty(n, device=DEVICE) for n in (10, 0, 64, 65, 1)]
    tab = _tables.table([ts], chunk=64)
    assert tab.blocks.tolist() == [[0, 0], [2, 0], [3, 0], [3, 64], [4, 0]]


def test_one_launch_per_group(launches):
    """Whatever the number of tensors: one launch per pass (reductions: partials + final sum)."""
    tb = backend()
    w, g, b = make(MANY, torch.float32), make(MANY, torch.float32), make(MANY, torch.float32)
    sq = tb.OPS["grad_sq_norm"](g, w, masks_for(MANY), 0.01)
    assert launches == ["_sq_norm_partials_kernel", "_sum_partials_kernel"]
    launches.clear()
    tb.OPS["perturb_"](w, g, b, sq, 0.05, EPS, masks_for(MANY), True, 0.01, 0.5, list(range(len(MANY))))
    tb.OPS["restore_"](w, b)
    tb.OPS["sgd_restore_step_"](w, b, g, clone(g), lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                                nesterov=False, maximize=False, init_buffers=False)
    tb.OPS["adamw_restore_step_"](w, b, g, clone(g), [t.abs() for t in g], step=1, lr=0.1, beta1=0.9, beta2=0.99,
                                  eps=1e-8, weight_decay=0.0, maximize=False)
    tb.OPS["fisher_accumulate_"](b, g, 1.0)
    assert launches == ["_perturb_kernel", "_copy_kernel", "_sgd_restore_step_kernel", "_adamw_restore_step_kernel",
                        "_fisher_accumulate_kernel"]


# --------------------------------------------------------------------------- public ops with backend="triton"

def test_public_ops_backend_triton():
    """Mixed dtypes and a zero-size tensor through sam_kernels.ops: grouped, then run by triton."""
    shapes = [(7,), (0,), (3, 5), (129,)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    w = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, dtypes)]
    g = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, dtypes)]
    sq = ops.grad_sq_norm(g, backend="triton")
    assert ops.last_used["grad_sq_norm"] == "triton"
    assert_close(sq, ops.grad_sq_norm(g, backend="eager"), 1e-6, 1e-5, "grad_sq_norm")
    got, want = clone(w), clone(w)
    bk_got, bk_want = [torch.empty_like(t) for t in w], [torch.empty_like(t) for t in w]
    ops.perturb_(got, g, bk_got, 0.05, keep_prob=0.5, seed=3, backend="triton")
    assert ops.last_used["perturb_"] == "triton"
    ops.perturb_(want, g, bk_want, 0.05, keep_prob=0.5, seed=3, backend="eager")
    assert_lists_close(got, want, 1e-2, 1e-2, "perturbed params")
    assert_lists_equal(bk_got, w, "backups")
    bufs = ops.sgd_restore_step_(got, bk_got, g, None, lr=0.1, momentum=0.9, backend="triton")
    bufs_want = ops.sgd_restore_step_(want, bk_want, g, None, lr=0.1, momentum=0.9, backend="eager")
    assert_lists_close(got, want, 1e-2, 1e-2, "params after sgd")
    assert_lists_close(bufs, bufs_want, 1e-2, 1e-2, "buffers")
    masks = ops.topk_mask(g, 0.5, backend="triton")
    assert ops.last_used["topk_mask"] == "triton"
    assert_lists_equal(masks, ops.topk_mask(g, 0.5, backend="eager"), "topk")
    assert_lists_equal(ops.nm_mask(g, 2, 4, backend="triton"), ops.nm_mask(g, 2, 4, backend="eager"), "nm")


def test_public_ops_backend_triton_remaining_ops():
    """dot, restore_, adamw_restore_step_ and the variants' ops through sam_kernels.ops, vs eager."""
    shapes, dtypes = [(7,), (0,), (3, 5), (129,)], [torch.float32, torch.float32, torch.float16, torch.float32]

    def lst(positive=False):
        return [(torch.rand(s, device=DEVICE) + 0.1 if positive else torch.randn(s, device=DEVICE)).to(d)
                for s, d in zip(shapes, dtypes)]

    a, b = lst(), lst()
    d = ops.dot(a, b, backend="triton")
    assert ops.last_used["dot"] == "triton"
    assert_close(d, ops.dot(a, b, backend="eager"), 1e-5, 1e-5, "dot")
    state = [lst(), lst(), lst(positive=True)]  # params, exp_avgs, exp_avg_sqs
    runs = {}
    for name in ("triton", "eager"):
        w, m, v = (clone(t) for t in state)
        g, gv, f = clone(a), [torch.empty_like(t) for t in a], clone(state[2])
        ops.restore_(w, b, backend=name)
        ops.adamw_restore_step_(w, b, a, m, v, 3, lr=1e-2, backend=name)
        sq = ops.renormalize_(g, torch.tensor(2.0, device=DEVICE), backend=name)
        ops.fisher_accumulate_(f, g, scale=0.5, backend=name)
        ops.looksam_store_(gv, g, b, backend=name)
        ops.looksam_apply_(g, gv, 0.7, backend=name)
        runs[name] = [w, m, v, g, gv, f, [sq]]
        if name == "triton":
            assert all(ops.last_used[op] == "triton" for op in (
                "restore_", "adamw_restore_step_", "renormalize_", "fisher_accumulate_", "looksam_store_",
                "looksam_apply_"))
    for what, got, want in zip(("params", "exp_avgs", "exp_avg_sqs", "grads", "g_v", "fisher", "sq"),
                               runs["triton"], runs["eager"]):
        assert_lists_close(got, want, 2e-3, 2e-3, what)

# --------------------------------------------------------------------------- native compilation (no GPU needed)

_COMPILE_CHECK = r"""
import re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sam_kernels.ops.backends.triton import _tables, bsam, masks, norm, optimizer_steps, perturb, variants

C = dict(DT=tl.float32, CDT=tl.float32, BLOCK=1024, CHUNK=8192, ALIGNED=True)
SGD = dict(HAS_WD=True, HAS_MOMENTUM=True, INIT_BUFFERS=False, NESTEROV=True, MAXIMIZE=True, HAS_SCALE=True,
           HAS_FOUND=True, HAS_OUT=False, CHECK=False)
ADAMW = dict(MAXIMIZE=True, HAS_SCALE=True, HAS_FOUND=True)
HOT = [  # (kernel, constexprs): must get 128-bit vector loads on aligned full blocks
    (norm._sq_norm_partials_kernel, dict(C, ADAPTIVE=True, MASKED=True)),
    (norm._dot_partials_kernel, C),
    (perturb._perturb_kernel, dict(C, MASKED=True, ADAPTIVE=True, KEEP=True, PERTURBATION_SQ=False,
                                   GRAD_COPIES=False, INTO=False)),
    (perturb._perturb_kernel, dict(C, MASKED=True, ADAPTIVE=True, KEEP=True, PERTURBATION_SQ=True, GRAD_COPIES=False,
                                   INTO=False)),
    (perturb._perturb_kernel, dict(C, MASKED=True, ADAPTIVE=True, KEEP=True, PERTURBATION_SQ=False, GRAD_COPIES=True,
                                   INTO=False)),
    (perturb._perturb_kernel, dict(C, MASKED=True, ADAPTIVE=True, KEEP=True, PERTURBATION_SQ=True, GRAD_COPIES=True,
                                   INTO=False)),
    (perturb._perturb_kernel, dict(C, MASKED=False, ADAPTIVE=False, KEEP=False, PERTURBATION_SQ=False,
                                   GRAD_COPIES=False, INTO=True)),
    (perturb._perturb_kernel, dict(C, DT=tl.float16, MASKED=False, ADAPTIVE=False, KEEP=False, PERTURBATION_SQ=True,
                                   GRAD_COPIES=False, INTO=False)),
    (perturb._perturb_kernel, dict(C, DT=tl.bfloat16, MASKED=False, ADAPTIVE=False, KEEP=False,
                                   PERTURBATION_SQ=False, GRAD_COPIES=True, INTO=False)),
    (perturb._copy_kernel, dict(DT=tl.bfloat16, BLOCK=1024, CHUNK=8192, ALIGNED=True)),
    (optimizer_steps._sgd_restore_step_kernel, dict(C, **SGD, SUMS=False, HAS_ASCENT=False)),
    (optimizer_steps._sgd_restore_step_kernel, dict(C, **SGD, SUMS=True, HAS_ASCENT=True)),
    (optimizer_steps._sgd_restore_step_kernel, dict(C, **dict(SGD, HAS_OUT=True, CHECK=True), SUMS=False,
                                                    HAS_ASCENT=False)),
    (optimizer_steps._adamw_restore_step_kernel, dict(C, **ADAMW, SUMS=False, HAS_ASCENT=False)),
    (optimizer_steps._adamw_restore_step_kernel, dict(C, **ADAMW, SUMS=True, HAS_ASCENT=True)),
    (variants._renormalize_kernel, C), (variants._fisher_accumulate_kernel, C),
    (variants._looksam_store_kernel, C), (variants._looksam_apply_kernel, C), (variants._mix_kernel, C),
    (variants._ema_update_kernel, dict(C, HAS_DIR=True, HAS_SCALE=True, HAS_FOUND=True)),
    (variants._ema_update_kernel, dict(C, HAS_DIR=False, HAS_SCALE=False, HAS_FOUND=False)),
    (bsam._bsam_noise_kernel, C), (bsam._bsam_ascent_kernel, dict(C, PERTURB=True, HAS_SCALE=True, HAS_FOUND=True)),
    (bsam._bsam_descent_kernel, dict(C, HAS_WD=True, HAS_SCALE=True, HAS_FOUND=True)),
]
OTHER = [
    (norm._sum_partials_kernel, dict(BLOCK=1024)),
    (optimizer_steps._adamw_restore_step_kernel, dict(C, DT=tl.float64, CDT=tl.float64, ALIGNED=False, MAXIMIZE=False,
                                                      HAS_SCALE=False, HAS_FOUND=False, SUMS=True, HAS_ASCENT=False)),
    (optimizer_steps._sgd_restore_step_kernel, dict(C, DT=tl.bfloat16, **SGD, SUMS=True, HAS_ASCENT=False)),
    (optimizer_steps._sgd_restore_step_kernel, dict(C, DT=tl.bfloat16, **dict(SGD, HAS_OUT=True, CHECK=True),
                                                    SUMS=True, HAS_ASCENT=True)),
    (optimizer_steps._sgd_undo_kernel, dict(C, HAS_FOUND=True, HAS_NEW=True, HAS_OLD=True)),
    (optimizer_steps._sgd_undo_kernel, dict(C, DT=tl.bfloat16, HAS_FOUND=False, HAS_NEW=True, HAS_OLD=False)),
    (perturb._perturb_kernel, dict(C, DT=tl.bfloat16, ALIGNED=False, MASKED=False, ADAPTIVE=True, KEEP=False,
                                   PERTURBATION_SQ=True, GRAD_COPIES=True)),
    (perturb._perturb_kernel, dict(C, DT=tl.float64, CDT=tl.float64, MASKED=True, ADAPTIVE=False, KEEP=True,
                                   PERTURBATION_SQ=True, GRAD_COPIES=False)),
    (perturb._perturb_kernel, dict(C, DT=tl.float64, CDT=tl.float64, ALIGNED=False, MASKED=True, ADAPTIVE=False,
                                   KEEP=True, PERTURBATION_SQ=False, GRAD_COPIES=True)),
    (bsam._bsam_ascent_kernel, dict(C, DT=tl.bfloat16, PERTURB=False, HAS_SCALE=False, HAS_FOUND=False)),
    (bsam._bsam_descent_kernel, dict(C, DT=tl.float64, CDT=tl.float64, ALIGNED=False, HAS_WD=False, HAS_SCALE=False,
                                     HAS_FOUND=False)),
    (bsam._bsam_noise_kernel, dict(C, DT=tl.float16)),
    (_tables.add_partials_kernel, dict(WIDTH=2, USED=2, BLOCK=1024)),
    (_tables.add_partials_kernel, dict(WIDTH=1, USED=1, BLOCK=1024)),
    (masks._order_keys_kernel, dict(DT=tl.float16, BLOCK=1024, CHUNK=8192, ALIGNED=False)),
    (masks._nm_mask_kernel, dict(DT=tl.bfloat16, M=4, MP=4, GROUPS=256, ALIGNED=True)),
    (masks._radix_histogram_kernel, dict(BLOCK=1024, CHUNK=8192)),
    (masks._radix_select_kernel, {}),
    (masks._tie_count_kernel, dict(BLOCK=1024, CHUNK=8192)),
    (masks._topk_keep_kernel, dict(BLOCK=1024, CHUNK=8192)),
    (variants._centralize_kernel, dict(DT=tl.float32, CDT=tl.float32, BLOCK=1024)),
    (variants._centralize_kernel, dict(DT=tl.bfloat16, CDT=tl.float32, BLOCK=32)),
    (variants._centralize_kernel, dict(DT=tl.float64, CDT=tl.float64, BLOCK=256)),
]
SCALARS = {"partials": "*fp32", "out": "*fp32", "sq_norm": "*fp32", "ref_sq_norm": "*fp32", "gs_dot_g": "*fp32",
           "g_sq_norm": "*fp32", "gv_sq_norm": "*fp32", "n": "i32", "keep_threshold": "i32", "hist": "*i32",
           "keep": "*i8", "shift": "i32", "high_mask": "i64", "flip": "i32", "scale_ptr": "*fp32",
           "found_ptr": "*fp32", "sums": "*fp64", "flag_ptr": "*fp32"}
copies_off = {}
for fn, cx in HOT + OTHER:
    sig = {p.name: "constexpr" if p.name in cx else p.annotation_type or SCALARS.get(p.name, "*i64") for p in fn.params}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    if (fn, cx) in HOT:
        assert re.search(r"ld\.global(\.nc)?\.v4", ptx), f"{fn.__name__}: no 128-bit loads"
    for flag in ("SUMS", "PERTURBATION_SQ"):  # the telemetry reduction (tl.sum: warp shuffles) only when asked for
        if flag in cx:
            assert ("shfl.sync" in ptx) == cx[flag], f"{fn.__name__} {flag}={cx[flag]}: shuffles {'shfl.sync' in ptx}"
    if "CHECK" in cx:  # the finite check's flag is touched only with the flag: else compiled out
        row = f"{fn.__name__}_param_{fn.arg_names.index('flag_ptr')}]"
        assert (row in ptx) == cx["CHECK"], f"{fn.__name__} CHECK={cx['CHECK']}: reads {row}"
    if "GRAD_COPIES" in cx:  # the copies' pointer row (a parameter) is read only with the flag: else compiled out
        row = f"{fn.__name__}_param_{fn.arg_names.index('c_ptrs')}]"
        assert (row in ptx) == cx["GRAD_COPIES"], f"{fn.__name__} GRAD_COPIES={cx['GRAD_COPIES']}: reads {row}"
        stores = len(re.findall(r"st\.global", ptx))
        plain = copies_off.setdefault(tuple((k, v) for k, v in cx.items() if k != "GRAD_COPIES"), {})
        plain[cx["GRAD_COPIES"]] = stores
        if len(plain) == 2:  # the same kernel with and without the flag: the copy adds stores
            assert plain[True] > plain[False], f"{fn.__name__}: stores with GRAD_COPIES {plain}"
print("ok")
"""


def test_kernels_compile_natively_for_sm90():
    """The interpreter does not run Triton's compiler: compile every kernel for sm_90 (frontend to PTX,
    no GPU needed), which catches what only native compilation rejects, and check the hot kernels
    get 128-bit vector loads on aligned full blocks."""
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-4000:]
