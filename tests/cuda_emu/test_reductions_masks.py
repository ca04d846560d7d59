"""The CUDA reductions (norm.cu: grad_sq_norm, dot; CUB block reductions emulated in CUB's order)
and masks (masks.cu: topk_mask's radix select and block scans, nm_mask), executed by the CPU
emulation and compared with the eager reference: reductions within the fp32/fp64 accumulation
tolerance, masks bitwise (ties, NaN, signed zeros, infinities, multi-chunk tensors)."""
import pytest
import torch

from sam_kernels.ops import reference as ref
from tests.cuda_emu.cases import CHUNK, SIZES, masks_for, randn, reduce_rtol
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_equal

pytestmark = pytest.mark.cuda_emu

DTYPE_LIST = [d[0] for d in DTYPES]


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("variant", ["plain", "masked", "adaptive", "masked-adaptive"])
@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=DTYPE_IDS)
def test_grad_sq_norm_matches_reference(emu, dtype, variant, misaligned):
    grads = randn(SIZES, dtype, 1, misaligned=misaligned)
    params = randn(SIZES, dtype, 2, misaligned=misaligned) if "adaptive" in variant else None
    masks = masks_for(SIZES, 3, misaligned) if "masked" in variant else None
    if masks is not None:  # masked-out NaN/Inf contribute nothing
        off = (~masks[4]).nonzero().flatten()[:2]
        grads[4][off] = torch.tensor([float("nan"), float("inf")], dtype=dtype)
    got = emu.grad_sq_norm(grads, params, masks, 0.01)
    want = ref.grad_sq_norm(grads, params, masks, 0.01)
    assert got.dtype == want.dtype and got.dim() == 0
    assert torch.isfinite(got)
    assert_close(got, want, 0.0, reduce_rtol(dtype), "grad_sq_norm")


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=DTYPE_IDS)
def test_dot_matches_reference(emu, dtype, misaligned):
    a = randn(SIZES, dtype, 1, misaligned=misaligned)
    b = [(0.5 * x.double() + y.double()).to(dtype) for x, y in zip(a, randn(SIZES, dtype, 2, misaligned=misaligned))]
    got = emu.dot(a, b)
    want = ref.dot(a, b)
    assert got.dtype == want.dtype and got.dim() == 0
    assert_close(got, want, 0.0, reduce_rtol(dtype), "dot")


def test_reduction_in_cubs_order(emu):
    """One chunk, one element per thread: the total is CUB's tree (offsets 1..16 in each warp of
    32, then the warp totals in order), not a sequential sum: values chosen so that the orders
    round differently in fp32."""
    x = torch.zeros(512 * 4, dtype=torch.float32)  # fp32: 4 elements per thread, thread t's at 4t..4t+3
    vals = torch.tensor([2.0 ** 24, 1.0, -(2.0 ** 24), 1.0] * 8, dtype=torch.float64)  # one warp's 32 threads
    x.view(512, 4)[:32, 0] = vals.float()
    got = emu.dot([x], [torch.ones_like(x)])
    # CUB's tree over lanes 0..31 in fp32, by hand: offset 1 pairs (2^24 + 1) -> 2^24 (rounded),
    # (-2^24 + 1) -> -2^24 + 1 (exact); offset 2: 2^24 + (-2^24 + 1) = 1; then 1 + 1 + ... over 8 groups.
    v = vals.float()
    for off in (1, 2, 4, 8, 16):  # lane i += lane i + off, all lanes at once (a shuffle down)
        nxt = v.clone()
        nxt[: 32 - off] = v[: 32 - off] + v[off:]
        v = nxt
    assert got.item() == v[0].item() == 8.0
    sequential = torch.zeros((), dtype=torch.float32)
    for y in vals.float():
        sequential += y
    assert sequential.item() != got.item()  # the test tells the orders apart


# --------------------------------------------------------------------------- masks

def _tie_scores(dtype):
    x = torch.tensor([1.0, float("nan"), -0.0, 0.0, 2.0, 2.0, float("-inf"), float("inf"), 0.0, -1.0], dtype=dtype)
    return [x, x.flip(0).contiguous(), torch.zeros(0, dtype=dtype)]


@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=DTYPE_IDS)
def test_topk_ties_nan_signed_zero(emu, dtype):
    scores = _tie_scores(dtype)
    for k in range(0, 21):
        assert_lists_equal(emu.topk_mask(scores, k), ref.topk_mask(scores, k), f"topk {dtype} k={k}")


@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=DTYPE_IDS)
def test_topk_many_chunks(emu, dtype):
    sizes = [n for n in SIZES if n] + [2 * CHUNK + 77]
    scores = randn(sizes, dtype, 5)
    scores[5][1000:5000] = 0.25  # ties across chunks and threads around the threshold
    scores[6][:3000] = 0.25
    total = sum(sizes)
    for k in (1, 1234, total // 3, total - 1, total):
        masks = emu.topk_mask(scores, k)
        assert sum(int(m.sum()) for m in masks) == k
        assert_lists_equal(masks, ref.topk_mask(scores, k), f"topk k={k}")


def test_topk_mixed_dtypes_widen(emu):
    scores = [torch.randn(300).half(), torch.randn(5000, dtype=torch.float32), torch.randn(77).bfloat16()]
    for k in (0, 10, 2000, 5377):
        assert_lists_equal(emu.topk_mask(scores, k), ref.topk_mask(scores, k), f"topk k={k}")


@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=DTYPE_IDS)
def test_nm_mask_matches_reference(emu, dtype):
    w = torch.randn(7, 3, 5).to(dtype)
    w[0, 0, :4] = 0.5
    w[1, 1, 1] = float("nan")
    wide = randn([CHUNK + 100], dtype, 3)[0].view(1, -1)  # groups across a chunk boundary
    for n, m in ((1, 4), (2, 4), (3, 8), (0, 2), (5, 5), (4, 32), (7, 40)):  # m > 32: the re-reading path
        scores = [w, _tie_scores(dtype)[0], wide, torch.zeros(0, dtype=dtype)]
        assert_lists_equal(emu.nm_mask(scores, n, m), ref.nm_mask(scores, n, m), f"nm {dtype} {n}:{m}")
