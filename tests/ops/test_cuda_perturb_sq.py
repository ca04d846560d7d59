"""perturb_'s telemetry sum on the CUDA backend (csrc/cuda/perturb.cu).

``perturb_`` with ``perturbation_sq`` ADDS ‖e‖² as applied, Σ (w_new − w)² over the values as
stored (rounded to fp16/bf16 for those), in the pass that writes them; unchanged entries add exactly
+0 (reference.perturb_). Checked through the public op, ``backend="cuda"`` against
``backend="eager"`` and against the definition evaluated on the kernel's own output, over every
dtype, plain / masks / adaptive / keep_prob / all three, AMP (step taken and skipped), a non-finite
norm, fp32 and fp64 outputs (0-dim and shape (1,)), both kernel-argument table sizes, lists longer
than one table, a tensor cut across launches, misaligned views, determinism, bitwise-identical
params without the argument, argument checks before any write, no host sync and CUDA-graph capture.
Every test skips without a GPU.
"""
import pytest
import torch

import sam_kernels.ops as ops
from sam_kernels.ops import extension_ops as ext
from tests.ops.cuda_utils import capture, need_cuda_kernel, randn
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
OUTPUT_IDS = ["f32-0dim", "f64-1"]


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
             masks=place([t > 0 for t in randn(sizes, torch.float32, 4)]), kw={})
    if condition.startswith("amp"):
        p["kw"] = dict(grad_scale=torch.tensor(scale, device=DEVICE),
                       found_inf=torch.tensor(1.0 if condition == "amp-skip" else 0.0, device=DEVICE))
    if condition == "nan-norm":
        p["kw"] = dict(sq_norm=torch.tensor(float("nan"), device=DEVICE))
    return p


def _perturb(backend, p, variant, out=None, seed=11):
    """One perturb_ through the public op on copies of the mutable inputs: (params, backups, out)."""
    v = VARIANTS[variant]
    params, backups = _clone(p["params"]), _clone(p["backups"])
    out = None if out is None else out.clone()
    tele = {} if out is None else dict(perturbation_sq=out)
    ops.perturb_(params, p["grads"], backups, p["rho"], masks=p["masks"] if v.get("masked") else None,
                 adaptive=v.get("adaptive", False), keep_prob=v.get("keep_prob"), seed=seed, backend=backend,
                 **p["kw"], **tele)
    return params, backups, out


def _applied_sq(params, old):
    """Σ (w_new − w)² of stored values, differences and squares in the compute type, summed in
    fp64 (the oracle): the contract evaluated on a kernel's own output."""
    cdt = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    return sum(((p.to(cdt) - w.to(cdt)).double() ** 2).sum() for p, w in zip(params, old))


def _sums_rtol(param_dtype, out_dtype):
    """fp32 accumulation (fp32/fp16/bf16 params) or an fp32 result: reassociation over ~10^6
    terms; fp64 throughout: fp64 reassociation."""
    return 1e-10 if param_dtype == torch.float64 and out_dtype == torch.float64 else 1e-5


def _check_against_eager(p, variant, dtype, atol, rtol, condition, output, start=None):
    """cuda vs eager from perturbation_sq = start; start None: the power of 2 at or below ‖e‖²
    (exact; a store instead of an add, or a wrong sum, shows at the sums' tolerance)."""
    out_dtype, shape = output
    if start is None:
        start = 1.0
        if condition not in SKIPPED:
            start = 2.0 ** torch.floor(torch.log2(_applied_sq(_perturb("eager", p, variant)[0], p["params"]))).item()
    out = torch.full(shape, start, device=DEVICE, dtype=out_dtype)
    got = _perturb(BACKEND, p, variant, out)
    want = _perturb("eager", p, variant, out)
    assert got[2].dtype == out_dtype and got[2].shape == shape
    assert_lists_equal(got[1], p["params"], "backups = params before the step")
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


@pytest.mark.parametrize("output", OUTPUTS, ids=OUTPUT_IDS)
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_perturbation_sq_matches_eager(dtype, atol, rtol, variant, condition, output, tables):
    p = _problem(_many_sizes(), dtype, condition)
    _check_against_eager(p, variant, dtype, atol, rtol, condition, output)


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
            ext.perturb_(params, p["grads"], backups, sq, p["rho"], 1e-12, p["masks"], True, 0.01, 0.7, [3, 4], out)
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
        ext.perturb_(params, p["grads"], backups, sq, p["rho"], 1e-12, p["masks"], True, 0.01, 0.7, [3, 4, 5], out)
        ext.perturb_(params, p["grads"], backups, sq, p["rho"], 1e-12, None, False, 0.01, 1.0, [0, 0, 0], out)
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
