"""The multi-tensor launcher (multi_tensor_apply.cuh) and the emulated runtime: lists that split
across kernel-argument tables of both sizes (bitwise the same results), a tensor cut across
launches, block-thread orders between barriers (bitwise the same results), the chunk and table
arithmetic of tensors over 2^31 elements (synthetic sizes, nothing allocated), and the runtime's
own checks (a barrier reached by some threads only, a misaligned vector access)."""
import re

import pytest
import torch

from sam_kernels.ops import reference as ref
from sam_kernels.ops.contract import OPS
from tests.cuda_emu.build import CSRC
from tests.cuda_emu.cases import CHUNK, SIZES, keys, masks_for, randn, reduce_rtol
from tests.utils import assert_close, assert_lists_close, assert_lists_equal

pytestmark = pytest.mark.cuda_emu

SMALL = dict(arg_bytes=4096, table_bytes=3800, max_blocks=320, index_bytes=1)
LARGE = dict(arg_bytes=32764, table_bytes=31744, max_blocks=2048, index_bytes=2)


def max_tensors(limits, depth):
    """Tensor slots of a table: what is left of its bytes after the block maps, per slot of depth
    pointers, a size, an aux value and an alignment flag (multi_tensor_apply.cuh)."""
    return (limits["table_bytes"] - 8 - limits["max_blocks"] * (4 + limits["index_bytes"])) // (depth * 8 + 17)


def test_every_op_has_an_emulated_kernel(emu):
    """Every op of csrc/sam_kernels.cpp has its CUDA kernel in the emulation (registered for CPU
    tensors under sam_kernels_emu); the other tests run each of them."""
    names = re.findall(r'm\.def\("(\w+)\(', (CSRC / "sam_kernels.cpp").read_text())
    assert sorted(names) == sorted(OPS)  # the op table's ops, each defined once
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_kernels_emu::{name}", "CPU"), name


def _many_sizes(cut=False):
    """400 tensors: more than a 32 KB table holds at depth >= 4 and many 4 KB tables at any depth;
    odd and aligned sizes, multi-chunk tensors, zero-size entries; with ``cut``, one tensor over a
    4 KB table's block cap (cut and carried into the next launch)."""
    sizes = [(i * 7919) % 3000 + 1 for i in range(400)]
    sizes[17], sizes[399] = 0, 0
    sizes[200] = 2 * CHUNK + 1
    if cut:
        sizes[300] = SMALL["max_blocks"] * CHUNK + 3 * CHUNK + 12
    return sizes


def _step(emu, sizes, dtype=torch.float32):
    """Every op with a reduction or a table walk, on one list of ``sizes``: their outputs."""
    params, grads, bufs = randn(sizes, dtype, 1), randn(sizes, dtype, 2), randn(sizes, dtype, 3)
    masks = masks_for(sizes, 4)
    out = {}
    sq = emu.grad_sq_norm(grads, params, masks, 0.01)
    out["sq"] = [sq, emu.dot(grads, params)]
    backups = [torch.empty_like(p) for p in params]
    copies = [torch.empty_like(g) for g in grads]
    psq = torch.zeros(1)
    emu.perturb_(params, grads, backups, sq, 0.05, 1e-12, masks, True, 0.01, 0.7, keys(len(sizes)), psq, copies)
    out["perturb"] = [p.clone() for p in params] + backups + copies + [psq]
    sums = torch.zeros(2, dtype=torch.float64)
    emu.sgd_restore_step_(params, backups, grads, bufs, 0.1, 0.9, 0.0, 1e-4, True, False, False, None, None,
                          copies, sums)
    out["sgd"] = params + bufs + [sums]
    out["topk"] = emu.topk_mask(grads, sum(sizes) // 3)
    out["nm"] = emu.nm_mask([g for g in grads if g.numel()], 2, 4)
    return out


def _assert_same_bits(a, b, what):
    for name in a:
        assert_lists_equal(a[name], b[name], f"{what}: {name}")


def test_table_sizes_agree_bitwise_and_match_reference(emu, probes, monkeypatch):
    sizes = _many_sizes()
    runs, stats = {}, {}
    for setting in ("small", "auto"):
        monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", setting)
        probes.take_launch_stats()
        runs[setting] = _step(emu, sizes)
        stats[setting] = probes.take_launch_stats()
    # The 32 KB tables were used (kernel arguments over 4 KB) and took fewer launches.
    assert stats["small"][2] <= SMALL["arg_bytes"] < stats["auto"][2] <= LARGE["arg_bytes"]
    assert stats["auto"][0] < stats["small"][0]
    _assert_same_bits(runs["small"], runs["auto"], "small vs auto tables")
    got = runs["auto"]
    nz = [i for i, n in enumerate(sizes) if n]
    pick = lambda ts: [ts[i] for i in nz]  # noqa: E731
    params, grads, masks = pick(randn(sizes, torch.float32, 1)), pick(randn(sizes, torch.float32, 2)), pick(
        masks_for(sizes, 4))
    want_sq = ref.grad_sq_norm(grads, params, masks, 0.01)
    assert_close(got["sq"][0], want_sq, 0.0, reduce_rtol(torch.float32), "grad_sq_norm")
    assert_close(got["sq"][1], ref.dot(grads, params), 0.0, reduce_rtol(torch.float32), "dot")
    backups = [torch.empty_like(p) for p in params]
    ref.perturb_(params, grads, backups, got["sq"][0], 0.05, 1e-12, masks, True, 0.01, 0.7, pick(keys(len(sizes))))
    n = len(sizes)
    assert_lists_close(pick(got["perturb"][:n]), params, 1e-6, 1e-5, "perturbed params")
    assert_lists_equal(pick(got["perturb"][n:2 * n]), backups, "backups")
    assert_lists_equal(pick(got["perturb"][2 * n:3 * n]), grads, "grad_copies")
    assert_lists_equal(got["topk"], ref.topk_mask(randn(sizes, torch.float32, 2), sum(sizes) // 3), "topk")


def test_a_tensor_cut_across_launches(emu, probes, monkeypatch):
    """4 KB tables (a 32 KB one holds the whole group): a tensor of more chunks than a launch has
    blocks is cut, and its rest carried into slot 0 of the next table."""
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", "small")
    sizes = [5, SMALL["max_blocks"] * CHUNK + 3 * CHUNK + 12, 77]
    grads = randn(sizes, torch.float32, 1)
    params = randn(sizes, torch.float32, 2)
    probes.take_launch_stats()
    sq = emu.grad_sq_norm(grads, None, None, 0.0)
    launches = probes.take_launch_stats()[0]
    assert launches == 3  # pass 1 in 2 launches, pass 2 in 1
    assert_close(sq, ref.grad_sq_norm(grads, None, None, 0.0), 0.0, reduce_rtol(torch.float32), "grad_sq_norm")
    backups = [torch.empty_like(p) for p in params]
    want = [p.clone() for p in params]
    emu.perturb_(params, grads, backups, sq, 0.05, 1e-12, None, False, 0.0, 1.0, [])
    wb = [torch.empty_like(p) for p in want]
    ref.perturb_(want, grads, wb, sq, 0.05, 1e-12, None, False, 0.0, 1.0, [])
    assert_lists_equal(backups, wb, "backups")
    assert_lists_close(params, want, 1e-6, 1e-5, "params")


ORDERS = ["reverse", "shuffle:1", "shuffle:2"]


def test_thread_orders_between_barriers_agree_bitwise(emu, monkeypatch):
    sizes = [n for n in SIZES] + [3 * CHUNK + 999, 5 * 512 * 4 + 3]
    monkeypatch.setenv("CUDA_EMU_THREAD_ORDER", "forward")
    base = _step(emu, sizes)
    for order in ORDERS:
        monkeypatch.setenv("CUDA_EMU_THREAD_ORDER", order)
        _assert_same_bits(base, _step(emu, sizes), f"forward vs {order}")


def test_thread_orders_are_what_they_say(probes, monkeypatch):
    seen = {}
    for order in ["forward", "reverse", "shuffle:1", "shuffle:2"]:
        monkeypatch.setenv("CUDA_EMU_THREAD_ORDER", order)
        seen[order] = probes.thread_order(3)
        for row in seen[order]:
            assert torch.equal(row.sort().values, torch.arange(512)), f"{order}: not a permutation"
    assert torch.equal(seen["forward"], torch.arange(512).repeat(3, 1))
    assert torch.equal(seen["reverse"], torch.arange(511, -1, -1).repeat(3, 1))
    shuffled = seen["shuffle:1"]
    assert not torch.equal(shuffled[0], shuffled[1])  # a new permutation in every phase
    assert not torch.equal(shuffled, seen["shuffle:2"])
    monkeypatch.setenv("CUDA_EMU_THREAD_ORDER", "shuffle:1")
    assert torch.equal(probes.thread_order(3), shuffled)  # seeded: reproducible
    monkeypatch.setenv("CUDA_EMU_THREAD_ORDER", "sideways")
    with pytest.raises(RuntimeError, match="CUDA_EMU_THREAD_ORDER=sideways"):
        probes.thread_order(1)


def test_a_barrier_reached_by_some_threads_only_fails(probes):
    probes.divergent_barrier(512)  # every thread arrives: fine
    with pytest.raises(RuntimeError, match=r"__syncthreads\(\) number 1 reached by 100 of the block's 512 threads"):
        probes.divergent_barrier(100)


def test_misaligned_vector_access_fails(probes):
    storage = torch.arange(8, dtype=torch.float32)
    assert probes.vector_load(storage).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="misaligned access .*16-byte type"):
        probes.vector_load(storage[1:])


def test_bad_table_setting_is_rejected(emu, monkeypatch):
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", "huge")
    with pytest.raises(RuntimeError, match="SAM_KERNELS_CUDA_TABLES=huge"):
        emu.grad_sq_norm([torch.ones(3)], None, None, 0.0)


def test_rejected_call_writes_nothing(emu):
    params = randn([10, 20], torch.float32, 1)
    before = [p.clone() for p in params]
    grads = randn([10, 21], torch.float32, 2)
    backups = [torch.empty_like(p) for p in params]
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        emu.perturb_(params, grads, backups, torch.tensor(1.0), 0.05, 1e-12, None, False, 0.0, 1.0, [])
    assert_lists_equal(params, before, "params")


# --------------------------------------------------------------------------- 64-bit indexing

def _expected_plan(sizes, offsets, aux, element_size, limits, depth):
    """The launcher's plan written out: the chunks of every non-empty tensor in order, one block
    each, a new launch when the blocks fill or the tensor slots fill at a tensor's last chunk (a
    cut tensor is carried into the next launch); rows as probes.table_plan's."""
    ilp = 16 // element_size
    max_b, max_t = limits["max_blocks"], max_tensors(limits, depth)
    rows, blocks, tensors, block = [], 0, 0, 0
    for i, n in enumerate(sizes):
        if n == 0:
            continue
        aligned = int(n % ilp == 0 and offsets[i] % ilp == 0)
        tensors += 1
        chunks = -(-n // CHUNK)
        for c in range(chunks):
            rows.append([i, c * CHUNK, min((c + 1) * CHUNK, n), aligned, block, blocks, aux[i]])
            block += 1
            blocks += 1
            last = c == chunks - 1
            if blocks == max_b or (tensors == max_t and last):
                blocks = 0
                tensors = 0 if last else 1
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("element_size,depth", [(2, 3), (4, 6), (8, 1)])
@pytest.mark.parametrize("limits", [SMALL, LARGE], ids=["small", "large"])
def test_chunk_and_table_arithmetic_over_2_pow_31_elements(probes, element_size, depth, limits):
    big = 2 ** 31 + 3 * CHUNK + 7  # element indices past 2^31: 32-bit arithmetic would wrap
    sizes = [5, big, 0, 100, 2 ** 32 + 1, 3 * CHUNK] + [1000 + i for i in range(max_tensors(limits, depth) + 3)]
    offsets = [0, 0, 0, 1, 0, 0] + [i % 2 for i in range(len(sizes) - 6)]
    aux = [7 * i + 1 for i in range(len(sizes))]
    got = probes.table_plan(sizes, offsets, aux, element_size, depth, limits is LARGE)
    want = _expected_plan(sizes, offsets, aux, element_size, limits, depth)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    # Spelled out for the largest tensor: its last chunk ends at its size, past 2^32.
    last = got[got[:, 0] == 4][-1]
    assert last[1].item() == (2 ** 32 // CHUNK) * CHUNK and last[2].item() == 2 ** 32 + 1
    # Every launch within its table: at most max_blocks blocks and max_tensors tensors.
    starts = (got[:, 5] == 0).nonzero().flatten().tolist() + [len(got)]
    for a, b in zip(starts, starts[1:]):
        assert b - a <= limits["max_blocks"]
        assert got[a:b, 0].unique().numel() <= max_tensors(limits, depth)
