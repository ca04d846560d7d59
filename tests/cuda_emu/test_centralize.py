"""The CUDA centralize_ (csrc/cuda/centralize.cu), executed by the CPU emulation (docs/verification.md),
against float64 maths written here: every dtype; rows shorter and longer than a segment, rows of
one element, one row, rows that run past the end of a chunk and rows longer than a chunk (several
chunks without a row start), 1-dim and zero-size tensors, views off the 16-byte grid, channels_last;
a tensor whose rows are not contiguous runs is refused before anything is written."""
import pytest
import torch

from tests.cuda_emu.cases import CHUNK, clone
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_equal

pytestmark = pytest.mark.cuda_emu

SHAPES = [(7, 13), (5,), (0, 3), (6, 1), (1, 9), (3, 700), (3, CHUNK // 3 + 5), (2, CHUNK + 7), (40, 2049),
          (4, 3, 2, 2)]


def by_hand(g: torch.Tensor) -> torch.Tensor:
    x = g.double()
    if g.dim() < 2 or g.numel() == 0:
        return x
    rows = x.reshape(x.shape[0], -1)
    return (rows - rows.sum(dim=1, keepdim=True) / rows.shape[1]).reshape(x.shape)


def _grads(dtype, misaligned=False):
    gen = torch.Generator().manual_seed(5)
    out = []
    for s in SHAPES:
        n = torch.Size(s).numel()
        flat = (torch.randn(n + misaligned, dtype=torch.float64, generator=gen) * 2 + 0.5).to(dtype)
        out.append((flat[1:] if misaligned else flat).view(s))
    return out


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_centralize_matches_float64_maths(emu, dtype, atol, rtol, misaligned):
    grads = _grads(dtype, misaligned)
    got = clone(grads)
    emu.centralize_(got)
    for g, g0 in zip(got, grads):
        if g0.dim() < 2:
            assert_lists_equal([g], [g0], "1-dim unchanged")
        else:
            assert_close(g, by_hand(g0).to(dtype), atol, rtol, str(tuple(g0.shape)))


def test_centralize_channels_last(emu):
    g0 = torch.randn(5, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    g = g0.clone(memory_format=torch.preserve_format)
    emu.centralize_([g])
    assert g.stride() == g0.stride()
    assert_close(g, by_hand(g0), 1e-12, 1e-10, "channels_last")


def test_centralize_refuses_rows_that_are_not_contiguous_runs(emu):
    ok, bad = torch.randn(3, 4), torch.randn(6, 5).t()
    before = [ok.clone(), bad.clone()]
    with pytest.raises(RuntimeError, match="contiguous runs"):
        emu.centralize_([ok, bad])
    assert_lists_equal([ok, bad], before, "unchanged")


def _many(seed):
    """300 tensors of 2 to 4 dims (rows of 1 to 3,000 elements) and a few 1-dim ones: more than a
    4 KB table holds."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [((i % 7) + 1, (i * 7919) % 3000 + 1) if i % 3 else ((i % 5) + 2, 3, (i % 4) + 1) for i in range(300)]
    shapes += [(13,), (0, 4)]
    return [torch.randn(s, dtype=torch.float64, generator=gen).float() for s in shapes]


def test_centralize_table_sizes_agree_bitwise(emu, monkeypatch):
    grads = _many(7)
    runs = {}
    for setting in ("small", "auto"):
        monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", setting)
        runs[setting] = clone(grads)
        emu.centralize_(runs[setting])
    assert_lists_equal(runs["small"], runs["auto"], "small vs auto tables")
    for g, g0 in zip(runs["auto"], grads):
        assert_close(g, by_hand(g0).float(), 1e-6, 1e-5, str(tuple(g0.shape)))


def test_centralize_rows_starting_in_a_later_launch(emu, probes, monkeypatch):
    """4 KB tables: a tensor of more chunks than one launch has blocks; the rows that start in the
    chunks of the second launch are centralized there, each once."""
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", "small")
    g0 = torch.randn(323, CHUNK, generator=torch.Generator().manual_seed(2))
    g = g0.clone()
    probes.take_launch_stats()
    emu.centralize_([g])
    assert probes.take_launch_stats()[0] == 2
    assert_close(g, by_hand(g0).float(), 1e-6, 1e-5, "rows")


@pytest.mark.parametrize("order", ["reverse", "shuffle:1", "shuffle:2"])
def test_centralize_thread_orders_agree_bitwise(emu, monkeypatch, order):
    """Threads run in another order between barriers: the shared-memory sums give the same bits."""
    grads = _grads(torch.float32)
    runs = {}
    for setting in ("forward", order):
        monkeypatch.setenv("CUDA_EMU_THREAD_ORDER", setting)
        runs[setting] = clone(grads)
        emu.centralize_(runs[setting])
    assert_lists_equal(runs["forward"], runs[order], f"forward vs {order}")
