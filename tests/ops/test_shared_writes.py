"""The CPU ops refuse calls whose entries share memory themselves, before writing (the Python layer
then names the entries; tests/loops/test_aliased_params.py checks its messages)."""
import pytest
import torch

import sam_kernels as sk
from tests.ops.shared_writes_cases import check_allowed, check_refused

pytestmark = pytest.mark.skipif(not sk.backends()["cpp"]["available"], reason="the C++ extension is not built")


def test_cpu_ops_refuse_memory_shared_across_entries():
    check_refused(torch.ops.sam_kernels)


def test_cpu_ops_allow_a_tensor_shared_within_its_entry():
    check_allowed(torch.ops.sam_kernels)


N_LONG = 2000  # a long parameter list: thousands of start addresses per call


@pytest.mark.parametrize("where", [0, 1, 999, N_LONG - 1])
def test_cpu_ops_refuse_a_shared_start_at_any_position_of_a_long_list(where):
    """Momentum buffers that are adjacent views of one storage, one of them also starting where
    another entry's does; a backup that is another entry's param. Refused wherever it sits."""
    params = [torch.randn(8) for _ in range(N_LONG)]
    grads = [torch.randn(8) for _ in range(N_LONG)]
    backups = [torch.randn(8) for _ in range(N_LONG)]
    storage = torch.randn(8 * N_LONG)
    bufs = [storage[8 * i:8 * i + 8] for i in range(N_LONG)]
    other = (where + N_LONG // 2) % N_LONG
    bufs[where] = storage[8 * other:8 * other + 8]
    lists = [params, grads, backups, [storage]]
    before = [[t.clone() for t in lst] for lst in lists]
    with pytest.raises(ValueError, match="share memory"):
        torch.ops.sam_kernels.sgd_restore_step_(params, backups, grads, bufs, 0.1, 0.9, 0.0, 0.0, False, False, False,
                                                None, None, None, None)
    over_a_param = list(backups)
    over_a_param[where] = params[other]
    with pytest.raises(ValueError, match="share memory"):
        torch.ops.sam_kernels.perturb_(params, grads, over_a_param, torch.tensor(4.0), 0.1, 1e-12, None, False, 0.0,
                                       1.0, [], None, None)
    assert all(torch.equal(t, c) for lst, cl in zip(lists, before) for t, c in zip(lst, cl))


def test_cpu_ops_accept_adjacent_views_of_one_storage_in_a_long_list():
    """2,000 params that are adjacent views of one storage (distinct starts 32 bytes apart), some
    empty: no false refusal, and restore_ copies every backup."""
    storage = torch.zeros(8 * N_LONG)
    params = [storage[8 * i:8 * i + (0 if i % 7 == 3 else 8)] for i in range(N_LONG)]
    backups = [torch.randn(p.numel()) for p in params]
    torch.ops.sam_kernels.restore_(params, backups)
    want = torch.cat([b if b.numel() else torch.zeros(8) for b in backups])
    assert torch.equal(storage, want)
