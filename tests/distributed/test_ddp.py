"""DDP, global SAM (both backwards synchronized) = one process on the full batch, for every variant."""
import pytest

from .common import train
from .harness import WORLD

VARIANTS = ["sam", "sam_adamw", "asam", "sssam", "stablesam", "stable_asam", "looksam", "aesam", "aelooksam",
            "sparse_fisher", "sparse_dynamic", "sparse_nm", "esam", "esam_element"]


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
