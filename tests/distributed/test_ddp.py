"""DDP, global SAM (both backwards synchronized) = one process on the full batch, for every variant."""
import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk

from .common import BATCH, batches, mlp, train
from .harness import WORLD

VARIANTS = ["sam", "sam_adamw", "asam", "sssam", "stablesam", "stable_asam", "looksam", "aesam", "aelooksam",
            "sparse_fisher", "sparse_dynamic", "sparse_nm", "esam", "esam_element", "esam_sds", "bsam", "sam_on",
            "late_phase", "gsam", "wsam", "wsam_coupled", "gcsam"]


def assert_params_close(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item()
        assert err <= 1e-12, f"{what}: param {i} off by {err:.3e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_global_equals_single_process_full_batch(pool, variant):
    single, single_decisions = train(None, WORLD, variant)
    ranks = pool.run(train, variant, "ddp")
    for rank, (params, decisions) in enumerate(ranks):
        assert decisions == single_decisions, f"rank {rank}: decisions {decisions} != one process {single_decisions}"
        assert_params_close(params, single, f"{variant}, rank {rank} vs one process")
    moved = max((a - b).abs().max().item() for a, b in zip(single, train(None, WORLD, variant, steps=0)[0]))
    assert moved > 1e-3  # the comparison is not between untrained models


def test_ddp_esam_freeze_with_find_unused_parameters_equals_single_process(pool):
    single, _ = train(None, WORLD, "esam")  # one process freezes by default
    for rank, (params, _) in enumerate(pool.run(train, "esam_freeze", "ddp_unused")):
        assert_params_close(params, single, f"esam freeze=True, find_unused_parameters=True, rank {rank}")


def esam_local_reference(world: int = WORLD):
    """ESAM(gamma=0.5, selection="local") under DDP, written out in one process: SAM's ascent on the full
    batch, then each replica keeps the int(B_r·gamma) samples of ITS slice whose loss rose most, and the
    descent gradient is the replica mean of the per-replica means (what DDP's average gives)."""
    module = mlp()
    opt = sk.SAM(module.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in batches():
        before = F.cross_entropy(module(x), y, reduction="none")
        before.mean().backward()
        opt.first_step(zero_grad=True)
        with torch.no_grad():
            after = F.cross_entropy(module(x), y, reduction="none")
        loss = 0
        for r in range(world):
            lo, hi = r * BATCH // world, (r + 1) * BATCH // world
            rise = (after - before.detach())[lo:hi]
            keep = torch.sort(torch.sort(rise, descending=True, stable=True).indices[:(hi - lo) // 2]).values + lo
            loss = loss + F.cross_entropy(module(x[keep]), y[keep], reduction="none").mean() / world
        loss.backward()
        opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in module.parameters()]


def test_ddp_esam_local_selection_equals_per_replica_reference(pool):
    want = esam_local_reference()
    for rank, (params, _) in enumerate(pool.run(train, "esam_local", "ddp")):
        assert_params_close(params, want, f"esam selection='local', rank {rank}")
    glob, _ = train(None, WORLD, "esam_sds")  # the same ESAM with global selection: a different run
    assert max((a - b).abs().max().item() for a, b in zip(glob, want)) > 1e-6


def global_selection(rank, world):
    from sam_kernels.optim.esam import global_sharpness_indices

    before = torch.zeros(4, dtype=torch.float64)
    # rank 1's samples all rose more than rank 0's; a tie between rank 0's samples 1 and 3
    after = torch.tensor([0.1, 0.3, 0.2, 0.3], dtype=torch.float64) + rank
    picks = {gamma: global_sharpness_indices(before, after, gamma) for gamma in (0.5, 0.75)}
    return {gamma: (idx.tolist(), weight) for gamma, (idx, weight) in picks.items()}


def test_esam_global_selection_spans_ranks_with_exact_count_and_weight(pool):
    r0, r1 = pool.run(global_selection)
    assert r0[0.5] == ([], 2 / 4) and r1[0.5] == ([0, 1, 2, 3], 2 / 4)  # k = 4 of 8, all on rank 1
    assert r0[0.75] == ([1, 3], 2 / 6) and r1[0.75] == ([0, 1, 2, 3], 2 / 6)  # k = 6: rank 0's tie kept whole
