"""perturb_'s telemetry outputs on the CUDA backend (csrc/cuda/perturb.cu): perturbation_sq and grad_copies.

``perturb_`` with ``perturbation_sq`` ADDS ‖e‖² as applied, Σ (w_new − w)² over the values as
stored (rounded to fp16/bf16 for those), in the pass that writes them; unchanged entries add exactly
+0 (reference.perturb_). ``grad_copies`` ← grads BITWISE for every element (NaN payloads, signalling
NaNs, ±Inf, -0.0, subnormals), whatever the mask, keep mask, non-finite norm or found_inf. Every
dtype x variant x condition x output against eager, with both table sizes and lists longer than one
table, is in the op table's samples (tests/ops/test_perturb.py); here, ``backend="cuda"`` against
``backend="eager"`` and against the definition: -0.0 starts, a tensor cut across launches,
misaligned views, determinism, params bitwise those without the outputs, planted bit patterns,
argument checks before any write, no host sync and CUDA-graph capture. Every test skips without a GPU.
"""
import pytest
import torch

import sam_kernels.ops as ops
from sam_kernels.ops.backends import extension as ext
from tests.ops.cuda_utils import capture, need_cuda_kernel, randn
from tests.ops.opinfo import INT_OF
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_close, assert_lists_equal

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

DEVICE, BACKEND = "cuda", "cuda"

# multi_tensor_apply.cuh: a 4 KB table holds 320 chunks of 65,536 elements and 44 tensors at
# perturb_'s depth (3 lists + masks); a 32 KB one 2048 chunks and 396 tensors.
BLOCK_CAP_ELEMENTS = 320 * 65536
GRAD_SCALE = 1024.0  # a power of 2, as GradScaler's

# Storage bits planted in the grads for grad_copies (as integers of the dtype's width): quiet NaN with
# a payload, signalling NaN, negative NaN with a payload, +Inf, -Inf, then the finite ones: -0.0,
# the smallest subnormal, the most negative subnormal.
NON_FINITE_BITS = {
    torch.float32: [0x7FC00001, 0x7F800001, 0xFFC12345, 0x7F800000, 0xFF800000],
    torch.float64: [0x7FF8000000000ABC, 0x7FF0000000000001, 0xFFF800000000BEEF, 0x7FF0000000000000,
                    0xFFF0000000000000],
    torch.float16: [0x7E55, 0x7C01, 0xFE01, 0x7C00, 0xFC00],
    torch.bfloat16: [0x7FC5, 0x7F81, 0xFFC1, 0x7F80, 0xFF80],
}
FINITE_BITS = {
    torch.float32: [0x80000000, 0x00000001, 0x807FFFFF],
    torch.float64: [0x8000000000000000, 0x0000000000000001, 0x800FFFFFFFFFFFFF],
    torch.float16: [0x8000, 0x0001, 0x83FF],
    torch.bfloat16: [0x8000, 0x0001, 0x807F],
}

VARIANTS = {
    "plain": dict(),
    "masked": dict(masked=True),
    "adaptive": dict(adaptive=True),
    "keep": dict(keep_prob=0.7),
    "all": dict(masked=True, adaptive=True, keep_prob=0.7),
}
# Conditions of the step; the last three leave every weight unchanged (perturbation_sq += +0).
CONDITIONS = ["off", "amp-step", "amp-skip", "inf-grad", "nan-norm"]
SKIPPED = ("amp-skip", "inf-grad", "nan-norm")
# perturbation_sq: dtype and shape (both shapes the contract allows).
OUTPUTS = [(torch.float32, ()), (torch.float64, (1,))]


@pytest.fixture(autouse=True)
def _need_kernels():
    need_cuda_kernel("perturb_")


def _many_sizes():
    """600 tensors: more than one table of either size at perturb_'s depth; odd and aligned sizes,
    several-chunk tensors, zero-size entries (skipped by the kernels, not by the tables)."""
    sizes = [(i * 7919) % 5000 + 1 for i in range(600)]
    sizes[0], sizes[17], sizes[300], sizes[599] = 278011, 0, 65536 * 2 + 1, 0
    return sizes


def _clone(ts):
    """Copies at the originals' storage offset (0, or 1: pointers off the 16-byte grid -> the
    kernel's scalar path)."""
    out = []
    for t in ts:
        storage = torch.empty(t.numel() + t.storage_offset(), device=t.device, dtype=t.dtype)
        storage[t.storage_offset():].copy_(t)
        out.append(storage[t.storage_offset():])
    return out


def _problem(sizes, dtype, condition="off", misaligned=False):
    """Inputs of one perturb_: params, grads (scaled by GRAD_SCALE under AMP, as the kernel receives
    them), masks (about half selected), backups holding a sentinel (any entry perturb_ fails to
    write shows), and rho = 0.05·sqrt(numel), so that e is about 0.05·g per entry: many fp16/bf16
    ulps of w, as it must be for ‖e‖² as stored to be more than rounding noise."""
    scale = GRAD_SCALE if condition.startswith("amp") else 1.0

    def place(ts):  # storage offset 1: pointers off the 16-byte grid -> the kernel's scalar path
        if not misaligned:
            return ts
        out = []
        for t in ts:
            storage = torch.empty(t.numel() + 1, device=DEVICE, dtype=t.dtype)
            storage[1:].copy_(t)
            out.append(storage[1:])
        return out

    grads = randn(sizes, dtype, 3, scale)
    if condition == "inf-grad":
        grads[0][5] = float("inf")
    p = dict(params=place(randn(sizes, dtype, 1)), grads=place(grads), rho=0.05 * sum(sizes) ** 0.5,
             backups=place([torch.full((n,), 7.0, device=DEVICE, dtype=dtype) for n in sizes]),
             copies=place([torch.full((n,), -3.0, device=DEVICE, dtype=dtype) for n in sizes]),
             masks=place([t > 0 for t in randn(sizes, torch.float32, 4)]), kw={})
    if condition.startswith("amp"):
        p["kw"] = dict(grad_scale=torch.tensor(scale, device=DEVICE),
                       found_inf=torch.tensor(1.0 if condition == "amp-skip" else 0.0, device=DEVICE))
    if condition == "nan-norm":
        p["kw"] = dict(sq_norm=torch.tensor(float("nan"), device=DEVICE))
    return p


def _perturb(backend, p, variant, out=None, seed=11, copies=None):
    """One perturb_ through the public op on copies of the mutable inputs: (params, backups, out,
    grad_copies); copies: the grad_copies' initial contents (None: the argument is not passed)."""
    v = VARIANTS[variant]
    params, backups = _clone(p["params"]), _clone(p["backups"])
    out = None if out is None else out.clone()
    copies = None if copies is None else _clone(copies)
    tele = {} if out is None else dict(perturbation_sq=out)
    if copies is not None:
        tele["grad_copies"] = copies
    ops.perturb_(params, p["grads"], backups, p["rho"], masks=p["masks"] if v.get("masked") else None,
                 adaptive=v.get("adaptive", False), keep_prob=v.get("keep_prob"), seed=seed, backend=backend,
                 **p["kw"], **tele)
    return params, backups, out, copies


def _plant_bits(grads, bits):
    """Writes the storage bits ``bits`` (integers of the dtype's width) into every grad with room,
    spread over the tensor (inside and outside the masks and keep masks, in vector and tail groups)."""
    int_dtype = INT_OF[grads[0].dtype]
    width = torch.iinfo(int_dtype).bits
    values = torch.tensor([b - (1 << width) if b >= 1 << (width - 1) else b for b in bits], dtype=int_dtype,
                          device=DEVICE)
    for g in grads:
        n = g.numel()
        if n >= len(bits):
            step = n // len(bits)
            g.view(int_dtype)[torch.arange(len(bits), device=DEVICE) * step + (n % 3 if step > 2 else 0)] = values


def _bits(ts):
    """The storage bits of ts, as integer tensors (compared with assert_lists_equal)."""
    return [t.view(INT_OF[t.dtype]).clone() for t in ts]


def _applied_sq(params, old):
    """Σ (w_new − w)² of stored values, differences and squares in the compute type, summed in
    fp64 (the oracle): the contract evaluated on a kernel's own output."""
    cdt = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    return sum(((p.to(cdt) - w.to(cdt)).double() ** 2).sum() for p, w in zip(params, old))


def _sums_rtol(param_dtype, out_dtype):
    """fp32 accumulation (fp32/fp16/bf16 params) or an fp32 result: reassociation over ~10^6
    terms; fp64 throughout: fp64 reassociation."""
    return 1e-10 if param_dtype == torch.float64 and out_dtype == torch.float64 else 1e-5


def _check_against_eager(p, variant, dtype, atol, rtol, condition, output, start=None, copies=False):
    """cuda vs eager from perturbation_sq = start; start None: the power of 2 at or below ‖e‖²
    (exact; a store instead of an add, or a wrong sum, shows at the sums' tolerance). copies: with
    grad_copies too (p["copies"] before): they must hold the grads' bits, and params, backups and
    perturbation_sq bitwise those of the call without them."""
    out_dtype, shape = output
    if start is None:
        start = 1.0
        if condition not in SKIPPED:
            start = 2.0 ** torch.floor(torch.log2(_applied_sq(_perturb("eager", p, variant)[0], p["params"]))).item()
    out = torch.full(shape, start, device=DEVICE, dtype=out_dtype)
    grad_bits = _bits(p["grads"])
    got = _perturb(BACKEND, p, variant, out, copies=p["copies"] if copies else None)
    want = _perturb("eager", p, variant, out)
    assert got[2].dtype == out_dtype and got[2].shape == shape
    assert_lists_equal(got[1], p["params"], "backups = params before the step")
    if copies:
        assert_lists_equal(_bits(got[3]), grad_bits, "grad_copies = grads, bitwise")
        assert_lists_equal(_bits(p["grads"]), grad_bits, "grads (read only)")
        without = _perturb(BACKEND, p, variant, out)
        assert_lists_equal(got[0], without[0], "params vs the call without grad_copies")
        assert_lists_equal([got[2]], [without[2]], "perturbation_sq vs the call without grad_copies")
    if condition in SKIPPED:
        # Every weight unchanged, bitwise; exactly +0 added (-0.0 + +0 = +0, as eager's += 0).
        assert_lists_equal(got[0], p["params"], "params (nothing applied)")
        assert_lists_equal([got[2]], [out + 0.0], "perturbation_sq (+0 added)")
        assert_lists_equal([got[2]], [want[2]], "perturbation_sq vs eager (+0 added)")
        return
    assert_lists_close(got[0], want[0], atol, rtol, "params")
    tol = _sums_rtol(dtype, out_dtype)
    applied = _applied_sq(got[0], p["params"])
    assert applied > 0, "the problem must apply a perturbation"
    # The contract on the kernel's own stored output: start + Σ (w_new − w)².
    assert_close(got[2].double(), torch.full(shape, start + applied.item(), device=DEVICE, dtype=torch.float64),
                 0.0, tol, "perturbation_sq = start + Σ (w_new - w)^2 of the stored params")
    # Against eager: low-precision params may round a few entries 1 ulp apart (within the params'
    # tolerance; the norms are reduced in other orders), which their rtol absorbs.
    assert_close(got[2], want[2], 0.0, max(tol, rtol) if dtype in (torch.float16, torch.bfloat16) else tol,
                 "perturbation_sq vs eager")


@pytest.mark.parametrize("condition", SKIPPED)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_perturbation_sq_adds_plus_zero_to_minus_zero(dtype, atol, rtol, condition):
    """Nothing applied from a -0.0 start: +0 is added (+0.0 after), not nothing and not -0."""
    p = _problem([1000, 65537, 3], dtype, condition)
    for output in OUTPUTS:
        _check_against_eager(p, "all", dtype, atol, rtol, condition, output, start=-0.0)


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_perturbation_sq_one_tensor_over_the_block_cap(variant, tables):
    """A tensor cut across launches (4 KB tables; its RNG key carried over): the partials of both
    launches are summed."""
    p = _problem([BLOCK_CAP_ELEMENTS + 65536 * 3 + 12, 5, 0, 4096], torch.float32)
    _check_against_eager(p, variant, torch.float32, 1e-6, 1e-5, "off", OUTPUTS[0])


@pytest.mark.parametrize("variant", ["plain", "all"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_perturbation_sq_misaligned_views(dtype, atol, rtol, variant):
    """Views at storage offset 1 (the scalar path), masks among them."""
    p = _problem([1, 3, 4, 5, 8, 1023, 65536 + 3, 278011], dtype, "amp-step", misaligned=True)
    assert all(t.storage_offset() == 1 for k in ("params", "grads", "backups", "masks") for t in p[k])
    assert all(t.storage_offset() == 1 for t in _clone(p["params"]))
    _check_against_eager(p, variant, dtype, atol, rtol, "amp-step", OUTPUTS[1])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_perturbation_sq_deterministic_and_independent_of_table_size(variant, monkeypatch):
    p = _problem(_many_sizes(), torch.float32, "amp-step")
    runs = []
    for mode in ("small", "small", "auto", "auto"):
        monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", mode)
        runs.append(_perturb(BACKEND, p, variant, torch.full((), 1.0, device=DEVICE)))
    for r in runs[1:]:
        assert torch.equal(r[2], runs[0][2]), "perturbation_sq differs between runs / table sizes"
        assert_lists_equal(r[0], runs[0][0], "params")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_params_bitwise_the_same_without_perturbation_sq(dtype, atol, rtol, variant):
    """The kernel without the reduction gives bitwise the params/backups of the one with it."""
    p = _problem(_many_sizes(), dtype, "amp-step")
    with_sq = _perturb(BACKEND, p, variant, torch.zeros(1, device=DEVICE, dtype=torch.float64))
    without = _perturb(BACKEND, p, variant)
    assert without[2] is None
    assert_lists_equal(with_sq[0], without[0], "params")
    assert_lists_equal(with_sq[1], without[1], "backups")


def test_kernel_rejects_bad_perturbation_sq_before_writing():
    """The op's own checks (check_sums_tensor) and the public wrapper's: nothing is written on a bad call."""
    p = _problem([1000, 7], torch.float32)
    sq = torch.tensor(1.0, device=DEVICE)
    bad = [
        (torch.zeros(2, device=DEVICE), "perturbation_sq must be a contiguous tensor of 1 element"),
        (torch.zeros(1, 1, device=DEVICE), "perturbation_sq must be a contiguous tensor of 1 element"),
        (torch.zeros(1, device=DEVICE, dtype=torch.float16), "perturbation_sq must be float32 or float64"),
        (torch.zeros(1, device=DEVICE, dtype=torch.int64), "perturbation_sq must be float32 or float64"),
        (torch.zeros(1, device="cpu"), "perturbation_sq is on cpu"),
    ]
    for out, match in bad:
        before = out.clone()
        params, backups = _clone(p["params"]), _clone(p["backups"])
        with pytest.raises(RuntimeError, match=match):
            ext.wrapper("perturb_")(params, p["grads"], backups, sq, p["rho"], 1e-12, p["masks"], True, 0.01, 0.7, [3, 4], out)
        if out.device.type == DEVICE:  # the public op adds a CPU output at its end: only a device one is wrong there
            with pytest.raises(TypeError, match="perturbation_sq"):
                ops.perturb_(params, p["grads"], backups, p["rho"], masks=p["masks"], keep_prob=0.7, seed=3,
                             backend=BACKEND, perturbation_sq=out)
        torch.cuda.synchronize()
        assert_lists_equal(params, p["params"], "params after a rejected call")
        assert_lists_equal(backups, p["backups"], "backups after a rejected call")
        assert_lists_equal([out], [before], "perturbation_sq after a rejected call")


def test_perturbation_sq_no_host_sync():
    p = _problem([278011, 17, 4096], torch.float32)
    params, backups = _clone(p["params"]), _clone(p["backups"])
    sq = torch.tensor(1.0, device=DEVICE)
    out = torch.zeros((), device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ext.wrapper("perturb_")(params, p["grads"], backups, sq, p["rho"], 1e-12, p["masks"], True, 0.01, 0.7, [3, 4, 5], out)
        ext.wrapper("perturb_")(params, p["grads"], backups, sq, p["rho"], 1e-12, None, False, 0.01, 1.0, [0, 0, 0], out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_cuda_graph_capture_of_perturb_with_perturbation_sq(variant, tables):
    """perturb_ with perturbation_sq captured and replayed: the replay gives eager's params and
    perturbation_sq, and a second replay from the same params adds bitwise the same amount."""
    sizes = [278011, 1, 4096, 65537, 300] + [37] * 150  # more than a 4 KB table: several captured launches
    p = _problem(sizes, torch.float32, "amp-step")
    v = VARIANTS[variant]
    params, backups = _clone(p["params"]), _clone(p["backups"])
    out = torch.zeros((), device=DEVICE)

    def step():
        ops.perturb_(params, p["grads"], backups, p["rho"], masks=p["masks"] if v.get("masked") else None,
                     adaptive=v.get("adaptive", False), keep_prob=v.get("keep_prob"), seed=11, backend=BACKEND,
                     perturbation_sq=out, **p["kw"])

    graph = capture(step)
    for d, s in zip(params, p["params"]):
        d.copy_(s)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    first = out.clone()
    want = _perturb("eager", p, variant, torch.zeros((), device=DEVICE))
    assert_lists_close(params, want[0], 1e-6, 1e-5, "params after replay")
    assert_lists_equal(backups, p["params"], "backups after replay")
    assert_close(first, want[2], 0.0, 1e-5, "perturbation_sq after replay")
    for d, s in zip(params, p["params"]):
        d.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, 2 * first), "a second replay must add the same amount again"


# ---------------------------------------------------------------- grad_copies


def _norm_of_finite_grads(p, variant):
    """The norm perturb_ would compute from p's grads (scaled under AMP), handed over as sq_norm
    before non-finite bits are planted in them: the step is then applied (inf-grad and nan-norm
    keep theirs: nothing applied)."""
    v = VARIANTS[variant]
    return ops.grad_sq_norm(p["grads"], params=p["params"] if v.get("adaptive") else None, backend="eager")


@pytest.mark.parametrize("with_sq", [False, True], ids=["copies", "copies+sq"])
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_grad_copies_bitwise_every_element(dtype, atol, rtol, variant, condition, with_sq, tables):
    """NaN payloads, a signalling NaN, ±Inf, -0.0 and subnormals in the grads, inside and outside
    the masks: grad_copies holds every element's bits, whether the step is applied, skipped by the
    norm or by found_inf; params and backups are bitwise those of the call without grad_copies and
    match eager."""
    p = _problem(_many_sizes(), dtype, condition)
    if condition in ("off", "amp-step", "amp-skip"):
        p["kw"]["sq_norm"] = _norm_of_finite_grads(p, variant)
    _plant_bits(p["grads"], NON_FINITE_BITS[dtype] + FINITE_BITS[dtype])
    grad_bits = _bits(p["grads"])
    out = torch.full((), 1.0, device=DEVICE) if with_sq else None
    got = _perturb(BACKEND, p, variant, out, copies=p["copies"])
    without = _perturb(BACKEND, p, variant, out)
    want = _perturb("eager", p, variant, out)
    assert_lists_equal(_bits(got[3]), grad_bits, "grad_copies = grads, bitwise")
    assert_lists_equal(_bits(p["grads"]), grad_bits, "grads (read only)")
    assert_lists_equal(got[0], without[0], "params vs the call without grad_copies")
    assert_lists_equal(got[1], p["params"], "backups = params before the step")
    if with_sq:
        assert_lists_equal([got[2]], [without[2]], "perturbation_sq vs the call without grad_copies")
    if condition in SKIPPED:
        assert_lists_equal(got[0], p["params"], "params (nothing applied)")
    else:
        assert_lists_close(got[0], want[0], atol, rtol, "params vs eager")
        assert not all(torch.equal(a, b) for a, b in zip(_bits(got[0]), _bits(p["params"]))), \
            "the problem must apply a perturbation"


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_grad_copies_one_tensor_over_the_block_cap(variant, tables):
    """A tensor cut across launches (4 KB tables): both launches copy their part."""
    p = _problem([BLOCK_CAP_ELEMENTS + 65536 * 3 + 12, 5, 0, 4096], torch.float32)
    _plant_bits(p["grads"], FINITE_BITS[torch.float32])
    _check_against_eager(p, variant, torch.float32, 1e-6, 1e-5, "off", OUTPUTS[0], copies=True)


@pytest.mark.parametrize("where", ["all", "copies-only", "all-but-copies"])
@pytest.mark.parametrize("variant", ["plain", "all"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_grad_copies_misaligned_views(dtype, atol, rtol, variant, where):
    """Views at storage offset 1 (the scalar path): every list, only grad_copies (its pointer alone
    sends the tensor to the scalar path), or all but grad_copies."""
    sizes = [1, 3, 4, 5, 8, 1023, 65536 + 3, 278011]
    p = _problem(sizes, dtype, "amp-step", misaligned=where != "copies-only")
    copies = [torch.full((n,), -3.0, device=DEVICE, dtype=dtype) for n in sizes]
    if where != "all-but-copies":
        copies = [torch.full((n + 1,), -3.0, device=DEVICE, dtype=dtype)[1:] for n in sizes]
    p["copies"] = copies
    offsets = {"all": (1, 1), "copies-only": (0, 1), "all-but-copies": (1, 0)}[where]
    assert all(t.storage_offset() == offsets[0] for t in p["params"] + p["grads"])
    assert all(t.storage_offset() == offsets[1] for t in p["copies"])
    _plant_bits(p["grads"], FINITE_BITS[dtype])
    _check_against_eager(p, variant, dtype, atol, rtol, "amp-step", OUTPUTS[1], copies=True)


def test_kernel_rejects_bad_grad_copies_before_writing():
    """check_list on grad_copies (count, device, shape, dtype, dense layout, memory order), before
    any launch: params, backups, perturbation_sq and the good entries of grad_copies unchanged."""
    p = _problem([1000, 7], torch.float32)
    sq = torch.tensor(1.0, device=DEVICE)

    def good():
        return [torch.full_like(g, -3.0) for g in p["grads"]]

    gappy = torch.full((14,), -3.0, device=DEVICE)[::2]
    bad = [
        (good()[:1], "grad_copies has 1 tensors, expected 2"),
        ([good()[0], torch.full((7,), -3.0, device="cpu")], r"grad_copies\[1\] is on cpu"),
        ([good()[0], torch.full((8,), -3.0, device=DEVICE)], r"grad_copies\[1\] has shape"),
        ([good()[0], torch.full((7,), -3.0, device=DEVICE, dtype=torch.float64)], r"grad_copies\[1\] has dtype"),
        ([good()[0], gappy], r"grad_copies\[1\] overlaps or has gaps"),
    ]
    for copies, match in bad:
        before = [c.clone() for c in copies]
        out = torch.zeros((), device=DEVICE)
        params, backups = _clone(p["params"]), _clone(p["backups"])
        for tele in ({}, dict(perturbation_sq=out)):
            with pytest.raises(RuntimeError, match=match):
                ext.wrapper("perturb_")(params, p["grads"], backups, sq, p["rho"], 1e-12, p["masks"], True, 0.01, 0.7, [3, 4],
                             grad_copies=copies, **tele)
        torch.cuda.synchronize()
        assert_lists_equal(params, p["params"], "params after a rejected call")
        assert_lists_equal(backups, p["backups"], "backups after a rejected call")
        assert_lists_equal(copies, before, "grad_copies after a rejected call")
        assert out.item() == 0.0, "perturbation_sq after a rejected call"
    # Memory order: a transposed copy of a 2-D grad (same shape, other strides).
    params = [torch.ones(40, 25, device=DEVICE)]
    grads = [torch.full((40, 25), 2.0, device=DEVICE)]
    backups = [torch.zeros(40, 25, device=DEVICE)]
    copies = [torch.full((25, 40), -3.0, device=DEVICE).t()]
    with pytest.raises(RuntimeError, match=r"grad_copies\[0\] has strides"):
        ext.wrapper("perturb_")(params, grads, backups, sq, 0.05, 1e-12, None, False, 0.01, 1.0, [0], grad_copies=copies)
    torch.cuda.synchronize()
    assert torch.equal(params[0], torch.ones(40, 25, device=DEVICE)) and torch.equal(backups[0], torch.zeros_like(
        backups[0])) and torch.equal(copies[0], torch.full((40, 25), -3.0, device=DEVICE))
    # The public op: a list of the wrong length is a ValueError before anything runs.
    params, backups, copies = _clone(p["params"]), _clone(p["backups"]), good()
    with pytest.raises(ValueError, match="grad_copies"):
        ops.perturb_(params, p["grads"], backups, p["rho"], backend=BACKEND, grad_copies=copies[:1])
    assert_lists_equal(params, p["params"], "params after a rejected public call")
    assert_lists_equal(backups, p["backups"], "backups after a rejected public call")


def test_grad_copies_no_host_sync():
    p = _problem([278011, 17, 4096], torch.float32)
    params, backups = _clone(p["params"]), _clone(p["backups"])
    copies = _clone(p["copies"])
    sq = torch.tensor(1.0, device=DEVICE)
    out = torch.zeros((), device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ext.wrapper("perturb_")(params, p["grads"], backups, sq, p["rho"], 1e-12, p["masks"], True, 0.01, 0.7, [3, 4, 5], out,
                     copies)
        ext.wrapper("perturb_")(params, p["grads"], backups, sq, p["rho"], 1e-12, None, False, 0.01, 1.0, [0, 0, 0], None,
                     copies)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert_lists_equal(copies, p["grads"], "grad_copies")


@pytest.mark.parametrize("with_sq", [False, True], ids=["copies", "copies+sq"])
@pytest.mark.parametrize("variant", ["plain", "all"])
def test_cuda_graph_capture_of_perturb_with_grad_copies(variant, with_sq, tables):
    """perturb_ with grad_copies captured and replayed: each replay copies the grads as they are
    then (new values written into the captured grads between replays)."""
    sizes = [278011, 1, 4096, 65537, 300] + [37] * 150  # more than a 4 KB table: several captured launches
    p = _problem(sizes, torch.float32, "amp-step")
    v = VARIANTS[variant]
    params, backups, copies = _clone(p["params"]), _clone(p["backups"]), _clone(p["copies"])
    out = torch.zeros((), device=DEVICE)
    tele = dict(perturbation_sq=out) if with_sq else {}

    def step():
        ops.perturb_(params, p["grads"], backups, p["rho"], masks=p["masks"] if v.get("masked") else None,
                     adaptive=v.get("adaptive", False), keep_prob=v.get("keep_prob"), seed=11, backend=BACKEND,
                     grad_copies=copies, **tele, **p["kw"])

    graph = capture(step)
    for new_grads in (randn(sizes, torch.float32, 21, GRAD_SCALE), randn(sizes, torch.float32, 22, GRAD_SCALE)):
        for g, n in zip(p["grads"], new_grads):
            g.copy_(n)
        for d, s in zip(params, p["params"]):
            d.copy_(s)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_lists_equal(copies, new_grads, "grad_copies after replay")
        want = _perturb("eager", p, variant, torch.zeros((), device=DEVICE))
        assert_lists_close(params, want[0], 1e-6, 1e-5, "params after replay")
        if with_sq:
            assert_close(out, want[2], 0.0, 1e-5, "perturbation_sq after replay")
