"""Checks that only the CUDA kernels need (csrc/cuda): launch splitting, the scalar (misaligned)
path, determinism, no host synchronization, CUDA graph capture.

The ops are called at group level (``backends.extension``: same signatures as ``reference.py``) and
compared with the eager reference on the same device. Every test skips without a GPU.
"""
import pytest
import torch

from sam_kernels.ops.backends import extension as ext
from sam_kernels.ops import reference as ref
from tests.ops.cuda_utils import capture, need_cuda_kernel
from tests.utils import assert_lists_close, assert_lists_equal

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# multi_tensor_apply.cuh, 4 KB tables: 320 blocks of 65,536 elements per launch, < 110 tensors.
# 32 KB tables (used for groups that do not fit a 4 KB one): 2048 blocks, 341-777 tensors; the 400
# tensors of _many_sizes() split them by count at depth >= 4 only (perturb, SGD, AdamW), hence
# test_large_tables_split_by_count_and_by_blocks.
BLOCK_CAP_ELEMENTS = 320 * 65536
LARGE_BLOCK_CAP_ELEMENTS = 2048 * 65536


@pytest.fixture(autouse=True)
def _need_kernels():
    need_cuda_kernel("perturb_")


def _randn(sizes, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, device="cuda", dtype=dtype, generator=g) for n in sizes]


def _many_sizes():
    """400 tensors (several tables at every depth), odd and aligned sizes, one tensor over the
    block cap of a launch (cut and carried into the next launch), zero-size entries."""
    sizes = [(i * 7919) % 5000 + 1 for i in range(398)] + [0, BLOCK_CAP_ELEMENTS + 65536 * 3 + 12]
    sizes[17] = 0
    sizes[200] = 65536 * 2 + 1
    return sizes


def _misaligned(sizes, dtype=torch.float32, seed=0):
    """Contiguous views at storage offset 1: pointers off the 16-byte grid -> the scalar path."""
    return [t[1:] for t in _randn([n + 1 for n in sizes], dtype, seed)]


def _run_first_and_second_step(mod, params, grads, bufs, masks=None, keep_prob=1.0, keys=None):
    """grad_sq_norm + perturb_ + sgd_restore_step_ through one backend; returns every output.

    ``keys`` default to the caller's list positions (seed 1234), as the public perturb_ does.
    """
    params = [p.clone() for p in params]
    bufs = [b.clone() for b in bufs]
    backups = [torch.empty_like(p) for p in params]
    if keys is None:
        keys = [ref.tensor_key(1234, i) for i in range(len(params))]
    sq = mod.grad_sq_norm(grads, None, masks, 0.0)
    mod.perturb_(params, grads, backups, sq, 0.05, 1e-12, masks, False, 0.01, keep_prob, keys)
    perturbed = [p.clone() for p in params]
    mod.sgd_restore_step_(params, backups, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4,
                          nesterov=True, maximize=False, init_buffers=False)
    return sq, perturbed, backups, params, bufs


def _nonempty(ts):
    return [t for t in ts if t.numel()]


# --------------------------------------------------------------------------- launch splitting

def test_launch_splitting_many_tensors_and_one_over_the_block_cap(tables):
    sizes = _many_sizes()
    params, grads, bufs = _randn(sizes, seed=1), _randn(sizes, seed=2), _randn(sizes, seed=3)
    masks = [torch.rand(n, device="cuda") < 0.5 for n in sizes]
    # The extension gets zero-size entries too: it must skip them without breaking the tables.
    keys = [ref.tensor_key(1234, i) for i in range(len(sizes))]
    got = _run_first_and_second_step(ext, params, grads, bufs, masks=masks, keep_prob=0.7, keys=keys)
    idx = [i for i, n in enumerate(sizes) if n]
    pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
    want = _run_first_and_second_step(ref, pick(params), pick(grads), pick(bufs), masks=pick(masks), keep_prob=0.7,
                                      keys=pick(keys))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    assert_lists_close(pick(got[1]), want[1], 1e-6, 1e-5, "perturbed")
    assert_lists_equal(got[2], params, "backups")  # exact copies, zero-size included
    assert_lists_close(pick(got[3]), want[3], 1e-6, 1e-5, "params")
    assert_lists_close(pick(got[4]), want[4], 1e-6, 1e-5, "momentum_buffers")
    # Entries outside the mask are bitwise unchanged.
    for p, e, m in zip(params, got[1], masks):
        assert torch.equal(p[~m].view(torch.int32), e[~m].view(torch.int32))


def test_launch_splitting_adamw_and_variants(tables):
    sizes = _many_sizes()
    p, b, g, m, v = (_randn(sizes, seed=s) for s in range(5))
    v = [x.abs() for x in v]
    outs = {}
    for name, mod in (("ext", ext), ("ref", ref)):
        pp, mm, vv, gg = [x.clone() for x in p], [x.clone() for x in m], [x.clone() for x in v], [x.clone() for x in g]
        mod.adamw_restore_step_(pp, b, gg, mm, vv, step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.01, maximize=False)
        sq = mod.grad_sq_norm(gg, None, None, 0.0)
        mod.renormalize_(gg, sq * 4, sq, 1e-12)
        mod.fisher_accumulate_(vv, gg, 0.5)
        outs[name] = (pp, mm, vv, gg)
    for what, a, e in zip(("params", "exp_avgs", "fisher", "grads"), outs["ext"], outs["ref"]):
        assert_lists_close(_nonempty(a), _nonempty(e), 1e-6, 1e-5, what)


def test_launch_splitting_masks(tables):
    sizes = _many_sizes()
    scores = _randn(sizes, seed=4)
    scores[3][:50] = 0.25  # ties across the threshold region are unlikely at random; force some
    total = sum(sizes)
    for k in (0, 1, total // 3, total):
        got = ext.wrapper("topk_mask")(scores, k)
        want = ref.topk_mask(scores, k)
        assert_lists_equal(got, want, f"topk k={k}")
    rows = _nonempty(scores)  # 1-D: one row each, groups of 4 run across chunk boundaries
    got = ext.wrapper("nm_mask")(rows, 2, 4)
    want = ref.nm_mask(rows, 2, 4)
    assert_lists_equal(got, want, "nm_mask")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_topk_ties_nan_signed_zero(dtype):
    x = torch.tensor([1.0, float("nan"), -0.0, 0.0, 2.0, 2.0, float("-inf"), float("inf"), 0.0, -1.0],
                     device="cuda", dtype=dtype)
    scores = [x, x.flip(0).contiguous(), torch.zeros(0, device="cuda", dtype=dtype)]
    for k in range(0, 21):
        assert_lists_equal(ext.wrapper("topk_mask")(scores, k), ref.topk_mask(scores, k), f"topk {dtype} k={k}")
    w = torch.randn(7, 3, 5, device="cuda").to(dtype)
    w[0, 0, :4] = 0.5
    w[1, 1, 1] = float("nan")
    for n, m in ((1, 4), (2, 4), (3, 8), (0, 2), (5, 5), (4, 32)):
        assert_lists_equal(ext.wrapper("nm_mask")([w, x], n, m), ref.nm_mask([w, x], n, m), f"nm {dtype} {n}:{m}")


# --------------------------------------------------------------------------- misaligned views

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_misaligned_views_take_the_scalar_path(dtype):
    sizes = [1, 3, 4, 5, 8, 1023, 65536 + 3, 278011]
    params, grads, bufs = (_misaligned(sizes, dtype, seed=s) for s in (1, 2, 3))
    assert all(p.storage_offset() == 1 and p.is_contiguous() for p in params)
    tol = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-12, 1e-10), torch.float16: (1e-3, 1e-3),
           torch.bfloat16: (1e-2, 1e-2)}[dtype]
    got = _run_first_and_second_step(ext, params, grads, bufs)
    want = _run_first_and_second_step(ref, params, grads, bufs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
    for name, a, e in zip(("perturbed", "backups", "params", "bufs"), got[1:], want[1:]):
        assert_lists_close(a, e, *tol, name)
    assert_lists_equal(got[2], params, "backups")
    # restore_ is a bitwise copy on the scalar path as well.
    dst = _misaligned(sizes, dtype, seed=9)
    ext.wrapper("restore_")(dst, params)
    assert_lists_equal(dst, params, "restore_")
    assert_lists_equal(ext.wrapper("topk_mask")(params, 1000), ref.topk_mask(params, 1000), "topk")


def test_mixed_aligned_and_misaligned_in_one_group():
    sizes = [4096, 4097, 8, 12, 100_000]
    a = _randn(sizes, seed=1)
    b = _misaligned(sizes, seed=2)
    grads = [a[0], b[1], a[2], b[3], a[4]]
    torch.testing.assert_close(ext.wrapper("grad_sq_norm")(grads, None, None, 0.0), ref.grad_sq_norm(grads, None, None, 0.0),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(ext.wrapper("dot")(grads, grads), ref.dot(grads, grads), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- determinism

def test_deterministic_reductions_and_masks(tables):
    sizes = _many_sizes()
    grads, params = _randn(sizes, seed=5), _randn(sizes, seed=6)
    masks = [torch.rand(n, device="cuda") < 0.3 for n in sizes]
    for _ in range(2):
        runs = [(ext.wrapper("grad_sq_norm")(grads, params, masks, 0.01), ext.wrapper("dot")(grads, params),
                 ext.wrapper("topk_mask")(grads, sum(sizes) // 7)) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        assert_lists_equal(runs[0][2], runs[1][2], "topk")


def _driver_version() -> int:
    import ctypes
    version = ctypes.c_int(0)
    ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
    return version.value


def _table_kernels(fn) -> list[str]:
    """Names of the multi-tensor kernels ``fn`` launches (their template arguments name the table size)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "multi_tensor_kernel" in e.name]


def test_auto_uses_the_table_that_fits(monkeypatch):
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", "auto")
    few, many = _randn([10] * 3), _randn([10] * 200)
    few_b, many_b = [t.clone() for t in few], [t.clone() for t in many]
    names = _table_kernels(lambda: ext.wrapper("restore_")(few, few_b))
    assert names and all("SmallTables" in n for n in names), names
    if _driver_version() < 12010:
        pytest.skip("driver older than CUDA 12.1: 4 KB tables only")
    names = _table_kernels(lambda: ext.wrapper("restore_")(many, many_b))
    assert len(names) == 1 and "LargeTables" in names[0], names  # 200 tensors: one 32 KB launch
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", "small")
    assert len(_table_kernels(lambda: ext.wrapper("restore_")(many, many_b))) > 1


def test_large_tables_split_by_count_and_by_blocks(monkeypatch):
    """More tensors than a 32 KB table holds at depth 1 (777) and one fp16 tensor over its 2048-block
    cap, cut and carried into the next launch: norm, masked norm, perturb and SGD against eager."""
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", "auto")
    sizes = [(i * 7919) % 3000 + 1 for i in range(800)] + [0, LARGE_BLOCK_CAP_ELEMENTS + 65536 * 2 + 5]
    params, grads, bufs = (_randn(sizes, dtype=torch.float16, seed=s) for s in (11, 12, 13))
    masks = [torch.rand(n, device="cuda") < 0.5 for n in sizes]
    got = _run_first_and_second_step(ext, params, grads, bufs, masks=masks)
    idx = [i for i, n in enumerate(sizes) if n]
    pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
    want = _run_first_and_second_step(ref, pick(params), pick(grads), pick(bufs), masks=pick(masks))
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
    assert_lists_equal(got[2], params, "backups")
    for what, a, e in zip(("perturbed", "params", "momentum_buffers"), (got[1], got[3], got[4]),
                          (want[1], want[3], want[4])):
        assert_lists_close(pick(a), e, 1e-3, 1e-3, what)


def test_table_sizes_agree_bitwise(monkeypatch):
    """Partials are indexed by the chunk's position over the whole call, not by launch: 4 KB and
    32 KB tables give bitwise the same norms and steps."""
    sizes = _many_sizes()
    params, grads, bufs = _randn(sizes, seed=7), _randn(sizes, seed=8), _randn(sizes, seed=9)
    out = {}
    for mode in ("small", "auto"):
        monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", mode)
        out[mode] = _run_first_and_second_step(ext, params, grads, bufs)
    assert torch.equal(out["small"][0], out["auto"][0])
    for a, b in zip(out["small"][1:], out["auto"][1:]):
        assert_lists_equal(a, b)


def test_bad_table_setting_is_rejected(monkeypatch):
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", "huge")
    with pytest.raises(RuntimeError, match="SAM_KERNELS_CUDA_TABLES=huge: use auto"):
        ext.wrapper("grad_sq_norm")(_randn([10]), None, None, 0.0)


def test_deterministic_step():
    sizes = [278011, 1, 4096, 65537]
    params, grads, bufs = (_randn(sizes, seed=s) for s in (1, 2, 3))
    a = _run_first_and_second_step(ext, params, grads, bufs, keep_prob=0.5)
    b = _run_first_and_second_step(ext, params, grads, bufs, keep_prob=0.5)
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        assert_lists_equal(x, y)


# --------------------------------------------------------------------------- no host synchronization

def test_no_host_sync():
    sizes = [278011, 17, 4096]
    params, grads, bufs, m, v = (_randn(sizes, seed=s) for s in range(5))
    backups = [torch.empty_like(p) for p in params]
    masks = [torch.rand(n, device="cuda") < 0.5 for n in sizes]
    keys = [ref.tensor_key(7, i) for i in range(len(params))]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sq = ext.wrapper("grad_sq_norm")(grads, params, masks, 0.01)
        d = ext.wrapper("dot")(grads, params)
        ext.wrapper("perturb_")(params, grads, backups, sq, 0.05, 1e-12, masks, True, 0.01, 0.5, keys)
        ext.wrapper("restore_")(params, backups)
        ext.wrapper("sgd_restore_step_")(params, backups, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                              nesterov=False, maximize=False, init_buffers=True)
        ext.wrapper("adamw_restore_step_")(params, backups, grads, m, v, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.01, maximize=False)
        ext.wrapper("renormalize_")(grads, sq, d, 1e-12)
        ext.wrapper("fisher_accumulate_")(v, grads, 1.0)
        ext.wrapper("looksam_store_")(m, grads, params, d, sq, 1e-12)
        ext.wrapper("looksam_apply_")(grads, m, 0.7, sq, d, 1e-12)
        ext.wrapper("topk_mask")(grads, 1000)
        ext.wrapper("nm_mask")(grads, 2, 4)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# --------------------------------------------------------------------------- CUDA graphs

def test_cuda_graph_capture_of_a_sam_step(tables):
    # 155 tensors: more than a 4 KB table holds; "auto" still captures 4 KB-table launches (no 32 KB
    # tables during capture) while the warm-up outside the capture used 32 KB ones.
    sizes = [278011, 1, 4096, 65537, 300] + [37] * 150
    params0, grads, bufs0 = (_randn(sizes, seed=s) for s in (1, 2, 3))
    params, bufs = [p.clone() for p in params0], [b.clone() for b in bufs0]
    backups = [torch.empty_like(p) for p in params]
    out = {}

    def step():
        out["sq"] = ext.wrapper("grad_sq_norm")(grads, None, None, 0.0)
        ext.wrapper("perturb_")(params, grads, backups, out["sq"], 0.05, 1e-12, None, False, 0.01, 1.0, [0] * len(params))
        ext.wrapper("sgd_restore_step_")(params, backups, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                              nesterov=False, maximize=False, init_buffers=False)

    graph = capture(step)
    for p, p0 in zip(params, params0):
        p.copy_(p0)
    for b, b0 in zip(bufs, bufs0):
        b.copy_(b0)
    graph.replay()
    torch.cuda.synchronize()
    ref_params, ref_bufs = [p.clone() for p in params0], [b.clone() for b in bufs0]
    ref.sgd_restore_step_(ref_params, [p.clone() for p in params0], grads, ref_bufs, lr=0.1, momentum=0.9,
                          dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, init_buffers=False)
    torch.testing.assert_close(out["sq"], ref.grad_sq_norm(grads, None, None, 0.0), rtol=1e-5, atol=0)
    assert_lists_close(params, ref_params, 1e-6, 1e-5, "params after replay")
    assert_lists_close(bufs, ref_bufs, 1e-6, 1e-5, "bufs after replay")
    assert_lists_equal(backups, params0, "backups after replay")


def test_cuda_graph_capture_of_the_sam_optimizer_step(tables):
    """sam_kernels.SAM (SGD momentum, finite_check=False) captured whole — both backwards, first_step and
    second_step — and replayed, against the same steps run eagerly: no host sync or host-side state
    change inside the step, buffers updated in place."""
    import copy

    import torch.nn.functional as F

    import sam_kernels as sk

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).cuda()
    model_ref = copy.deepcopy(model)
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")

    def make(m):
        return sk.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, finite_check=False)
    opt, opt_ref = make(model), make(model_ref)

    def step(m, o):  # grads zeroed in place: the graph reads fixed addresses
        o.zero_grad(set_to_none=False)
        F.cross_entropy(m(x), y).backward()
        o.first_step()
        o.zero_grad(set_to_none=False)
        F.cross_entropy(m(x), y).backward()
        o.second_step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: grads and momentum buffers created outside the capture
        for _ in range(2):
            step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(model_ref, opt_ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt)
    for _ in range(4):
        graph.replay()
        step(model_ref, opt_ref)
    torch.cuda.synchronize()
    for p, r in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    for p, r in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(opt.base_optimizer.state[p]["momentum_buffer"],
                                   opt_ref.base_optimizer.state[r]["momentum_buffer"], rtol=1e-5, atol=1e-6)
