"""The telemetry sums of the fused descents on the CUDA backend (csrc/cuda/optimizer_steps.cu).

``sgd_restore_step_`` / ``adamw_restore_step_`` with ``sums`` ADD ``[Σ g², Σ ⟨ascent_grads, g⟩]``
(grads as given, still scaled under AMP; ``sums[1]`` untouched without ``ascent_grads``) in the pass
that updates the params (reference.add_descent_sums). Every dtype x AMP x telemetry setting against
eager, with both kernel-argument table sizes and lists longer than one table, is in the op table's
samples (tests/ops/test_descents.py); here, through the public ops, ``backend="cuda"`` against
``backend="eager"``: a tensor cut across launches, misaligned views, determinism and table-size
independence, no host sync and CUDA-graph capture. Every test skips without a GPU.
"""
import pytest
import torch

import sam_kernels.ops as ops
from sam_kernels.ops.backends import extension as ext
from tests.ops.cuda_utils import capture, need_cuda_kernel, randn
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_close, assert_lists_equal

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# multi_tensor_apply.cuh: a 4 KB table holds 320 chunks of 65,536 elements and ~30-40 tensors at
# the descents' depth (5-6 lists with sums); a 32 KB one 2048 chunks and 299-396 tensors.
BLOCK_CAP_ELEMENTS = 320 * 65536
GRAD_SCALE = 1024.0  # a power of 2, as GradScaler's

# Group-level (backends.extension) arguments, for the calls that bypass the public wrappers.
SGD_ARGS = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                init_buffers=False)
ADAMW_ARGS = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)


@pytest.fixture(autouse=True)
def _need_kernels():
    need_cuda_kernel("sgd_restore_step_")


def _many_sizes():
    """400 tensors: more than one table of either size at the descents' depth; odd and aligned
    sizes, several-chunk tensors, zero-size entries (skipped by the kernels, not by the tables)."""
    sizes = [(i * 7919) % 5000 + 1 for i in range(400)]
    sizes[0], sizes[17], sizes[200], sizes[399] = 278011, 0, 65536 * 2 + 1, 0
    return sizes


def _problem(sizes, dtype, telemetry, amp, misaligned=False):
    """Inputs of one descent: params (unused values: the kernels restore them from the backups),
    backups, grads (scaled by GRAD_SCALE under AMP, as the kernels receive them), ascent_grads
    correlated with the grads (so Σ ⟨a, g⟩ is far from 0 and from Σ g²), state, AMP scalars and the
    initial sums: non-zero (the kernels ADD), sums[1] = -0.0 without ascent_grads (bitwise: any
    write, even of a 0, would show)."""
    scale = GRAD_SCALE if amp != "off" else 1.0

    def place(ts):  # storage offset 1: pointers off the 16-byte grid -> the kernels' scalar path
        if not misaligned:
            return ts
        out = []
        for t in ts:
            storage = torch.empty(t.numel() + 1, device="cuda", dtype=dtype)
            storage[1:].copy_(t)
            out.append(storage[1:])
        return out

    def lists(seed, s=1.0):
        return place(randn(sizes, dtype, seed, s))

    p = dict(params=lists(1), backups=lists(2), grads=lists(3, scale), bufs=lists(4), exp_avgs=lists(5),
             exp_avg_sqs=place([t.abs() for t in randn(sizes, dtype, 6)]))
    noise = randn(sizes, dtype, 7, scale)
    p["ascent_grads"] = place([(0.5 * g.double() + n.double()).to(dtype) for g, n in zip(p["grads"], noise)])
    p["amp"] = {} if amp == "off" else dict(
        grad_scale=torch.tensor(scale, device="cuda"),
        found_inf=torch.tensor(1.0 if amp == "skip" else 0.0, device="cuda"))
    p["sums"] = None
    p["with_ascent"] = False
    if telemetry is not None:
        sums_dtype, with_ascent = telemetry
        base = 2.0 ** 20 * scale * scale  # exact; comparable with Σ g², so a store instead of an add fails
        p["sums"] = torch.tensor([base, -base if with_ascent else -0.0], device="cuda", dtype=sums_dtype)
        p["with_ascent"] = with_ascent
    return p


def _clone(ts):
    return [t.clone() for t in ts]


def _descend(op, backend, p):
    """One descent through the public op on copies of the mutable inputs: (params, state, sums)."""
    params = _clone(p["params"])
    sums = None if p["sums"] is None else p["sums"].clone()
    tele = {} if sums is None else dict(sums=sums, ascent_grads=p["ascent_grads"] if p["with_ascent"] else None)
    if op == "sgd":
        bufs = _clone(p["bufs"])
        ops.sgd_restore_step_(params, p["backups"], p["grads"], bufs, lr=0.1, momentum=0.9, dampening=0.0,
                              weight_decay=1e-4, nesterov=True, backend=backend, **p["amp"], **tele)
        state = [bufs]
    else:
        m, v = _clone(p["exp_avgs"]), _clone(p["exp_avg_sqs"])
        ops.adamw_restore_step_(params, p["backups"], p["grads"], m, v, 3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.01, backend=backend, **p["amp"], **tele)
        state = [m, v]
    return params, state, sums


def _sums_rtol(param_dtype, sums_dtype):
    """fp32 accumulation (fp32/fp16/bf16 grads) or an fp32 result: reassociation over ~10^6 terms;
    fp64 throughout: fp64 reassociation."""
    return 1e-10 if param_dtype == torch.float64 and sums_dtype == torch.float64 else 1e-5


def _check_against_eager(op, p, dtype, atol, rtol):
    got = _descend(op, "cuda", p)
    want = _descend(op, "eager", p)
    if p["amp"] and p["amp"]["found_inf"].item() != 0.0:
        # Skipped step: params bitwise at the backups, state bitwise unchanged; sums still taken.
        assert_lists_equal(got[0], p["backups"], "params (skipped step)")
        initial = [p["bufs"]] if op == "sgd" else [p["exp_avgs"], p["exp_avg_sqs"]]
        for a, e in zip(got[1], initial):
            assert_lists_equal(a, e, "state (skipped step)")
    else:
        assert_lists_close(got[0], want[0], atol, rtol, "params")
        for a, e in zip(got[1], want[1]):
            assert_lists_close(a, e, atol, rtol, "state")
    sums, ref_sums = got[2], want[2]
    if sums is None:
        return
    assert sums.dtype == p["sums"].dtype and sums.shape == (2,)
    tol = _sums_rtol(dtype, sums.dtype)
    assert_close(sums[:1], ref_sums[:1], 0.0, tol, "sums[0] = initial + Σ g²")
    if p["with_ascent"]:
        assert_close(sums[1:], ref_sums[1:], 0.0, tol, "sums[1] = initial + Σ <a, g>")
    else:
        assert_lists_equal([sums[1:]], [p["sums"][1:]], "sums[1] untouched without ascent_grads")
        assert torch.signbit(sums[1]).item()


@pytest.mark.parametrize("op", ["sgd", "adamw"])
def test_descent_sums_one_tensor_over_the_block_cap(op, tables):
    """A tensor cut across launches (4 KB tables): the partials of both launches are summed."""
    p = _problem([BLOCK_CAP_ELEMENTS + 65536 * 3 + 12, 5, 0, 4096], torch.float32, (torch.float32, True), "off")
    _check_against_eager(op, p, torch.float32, 1e-6, 1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["sgd", "adamw"])
def test_descent_sums_misaligned_views(op, dtype, atol, rtol):
    """Views at storage offset 1 (the scalar path), ascent_grads among them."""
    p = _problem([1, 3, 4, 5, 8, 1023, 65536 + 3, 278011], dtype, (torch.float64, True), "step", misaligned=True)
    assert all(t.storage_offset() == 1 for t in p["params"] + p["ascent_grads"])
    _check_against_eager(op, p, dtype, atol, rtol)


def test_descent_sums_sgd_without_momentum():
    """momentum == 0: the buffers' list is absent from the table; the ascent list follows it."""
    p = _problem(_many_sizes(), torch.float32, (torch.float32, True), "off")
    out = {}
    for backend in ("cuda", "eager"):
        params, sums = _clone(p["params"]), p["sums"].clone()
        ops.sgd_restore_step_(params, p["backups"], p["grads"], None, lr=0.1, ascent_grads=p["ascent_grads"],
                              sums=sums, backend=backend)
        out[backend] = params, sums
    assert_lists_close(out["cuda"][0], out["eager"][0], 1e-6, 1e-5, "params")
    assert_close(out["cuda"][1], out["eager"][1], 0.0, 1e-5, "sums")


@pytest.mark.parametrize("op", ["sgd", "adamw"])
def test_descent_sums_deterministic_and_independent_of_table_size(op, monkeypatch):
    p = _problem(_many_sizes(), torch.float32, (torch.float32, True), "step")
    runs = []
    for mode in ("small", "small", "auto", "auto"):
        monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", mode)
        runs.append(_descend(op, "cuda", p))
    for r in runs[1:]:
        assert torch.equal(r[2], runs[0][2]), "sums differ between runs / table sizes"
        assert_lists_equal(r[0], runs[0][0], "params")
        for a, e in zip(r[1], runs[0][1]):
            assert_lists_equal(a, e, "state")


def test_descent_sums_without_sums_unchanged():
    """The kernels without the reduction give bitwise the params/state of the ones with it."""
    p = _problem(_many_sizes(), torch.bfloat16, (torch.float32, True), "step")
    with_sums = _descend("adamw", "cuda", p)
    p_plain = dict(p, sums=None)
    without = _descend("adamw", "cuda", p_plain)
    assert_lists_equal(with_sums[0], without[0], "params")
    for a, e in zip(with_sums[1], without[1]):
        assert_lists_equal(a, e, "state")


def test_kernel_rejects_bad_telemetry_args_before_writing():
    """The CUDA op's own checks (check_telemetry_args): nothing is written on a bad call."""
    p = _problem([1000, 7], torch.float32, None, "off")
    good = torch.zeros(2, device="cuda")
    bad = [
        (dict(ascent_grads=p["ascent_grads"], sums=None), "ascent_grads given without sums"),
        (dict(sums=torch.zeros(3, device="cuda")), "sums must be a contiguous 1-D tensor of 2 elements"),
        (dict(sums=torch.zeros(2, 2, device="cuda")[:, 0]), "sums must be a contiguous 1-D tensor of 2 elements"),
        (dict(sums=torch.zeros(2, device="cuda", dtype=torch.float16)), "sums must be float32 or float64"),
        (dict(sums=torch.zeros(2)), "sums is on cpu"),
        (dict(ascent_grads=p["ascent_grads"][:1], sums=good), "ascent_grads"),
        (dict(ascent_grads=[t.double() for t in p["ascent_grads"]], sums=good), "ascent_grads"),
    ]
    for kw, match in bad:
        params, bufs, m, v = (_clone(p[k]) for k in ("params", "bufs", "exp_avgs", "exp_avg_sqs"))
        with pytest.raises(RuntimeError, match=match):
            ext.wrapper("sgd_restore_step_")(params, p["backups"], p["grads"], bufs, **SGD_ARGS, **kw)
        with pytest.raises(RuntimeError, match=match):
            ext.wrapper("adamw_restore_step_")(params, p["backups"], p["grads"], m, v, **ADAMW_ARGS, **kw)
        torch.cuda.synchronize()
        assert_lists_equal(params, p["params"], "params after a rejected call")
        assert_lists_equal(bufs, p["bufs"], "momentum_buffers after a rejected call")
        assert_lists_equal(m, p["exp_avgs"], "exp_avgs after a rejected call")
        assert_lists_equal(v, p["exp_avg_sqs"], "exp_avg_sqs after a rejected call")
        assert torch.equal(good, torch.zeros(2, device="cuda"))


def test_descent_sums_no_host_sync():
    p = _problem([278011, 17, 4096], torch.float32, (torch.float32, True), "step")
    params, bufs, m, v = (_clone(p[k]) for k in ("params", "bufs", "exp_avgs", "exp_avg_sqs"))
    sums = p["sums"].clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ext.wrapper("sgd_restore_step_")(params, p["backups"], p["grads"], bufs, **SGD_ARGS, **p["amp"],
                              ascent_grads=p["ascent_grads"], sums=sums)
        ext.wrapper("adamw_restore_step_")(params, p["backups"], p["grads"], m, v, **ADAMW_ARGS, **p["amp"], sums=sums)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", ["sgd", "adamw"])
def test_cuda_graph_capture_of_a_descent_with_sums(op, tables):
    """The descent with sums and ascent_grads captured and replayed: the replay adds the same sums
    (bitwise twice the first after two replays from zero) and gives eager's params and state."""
    sizes = [278011, 1, 4096, 65537, 300] + [37] * 150  # more than a 4 KB table: several captured launches
    p = _problem(sizes, torch.float32, (torch.float32, True), "step")
    params, bufs, m, v = (_clone(p[k]) for k in ("params", "bufs", "exp_avgs", "exp_avg_sqs"))
    sums = torch.zeros(2, device="cuda")

    def step():
        if op == "sgd":
            ops.sgd_restore_step_(params, p["backups"], p["grads"], bufs, lr=0.1, momentum=0.9, dampening=0.0,
                                  weight_decay=1e-4, nesterov=True, backend="cuda", ascent_grads=p["ascent_grads"],
                                  sums=sums, **p["amp"])
        else:
            ops.adamw_restore_step_(params, p["backups"], p["grads"], m, v, 3, lr=1e-3, beta1=0.9, beta2=0.999,
                                    eps=1e-8, weight_decay=0.01, backend="cuda", ascent_grads=p["ascent_grads"],
                                    sums=sums, **p["amp"])

    graph = capture(step)
    for dst, src in ((params, p["params"]), (bufs, p["bufs"]), (m, p["exp_avgs"]), (v, p["exp_avg_sqs"])):
        for d, s in zip(dst, src):
            d.copy_(s)
    sums.zero_()
    graph.replay()
    torch.cuda.synchronize()
    first = sums.clone()
    want = _descend(op, "eager", dict(p, sums=torch.zeros(2, device="cuda")))
    assert_lists_close(params, want[0], 1e-6, 1e-5, "params after replay")
    for a, e in zip([bufs] if op == "sgd" else [m, v], want[1]):
        assert_lists_close(a, e, 1e-6, 1e-5, "state after replay")
    assert_close(first, want[2], 0.0, 1e-5, "sums after replay")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(sums, 2 * first), "a second replay must add the same sums again"
