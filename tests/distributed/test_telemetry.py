"""Telemetry under DDP and FSDP2 (global SAM): the norms and the cosine are the global ones, equal to
one process on the full batch (float64). The sharpness is each rank's own batch, not compared."""
import math

import pytest
import torch
from torch import nn

from .common import LOSS, batches, build, mlp, shard
from .harness import WORLD

COMPARED = ("grad_norm", "sam_grad_norm", "grad_cosine", "perturbation_norm", "steps", "sam_steps",
            "forward_passes", "backward_passes")


def telemetry_run(rank, world: int, variant: str, wrap: str = "ddp") -> dict:
    module = mlp()
    model = module
    if rank is not None and wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(module)
    elif rank is not None:
        from torch.distributed.fsdp import fully_shard
        for m in (module[0], module[2], module):
            fully_shard(m)
    opt = build(variant, module, rank, world, telemetry=True)
    for x, y in batches(3):
        x, y = shard(x, rank, world), shard(y, rank, world)
        loss1 = LOSS(model(x), y)
        loss1.backward()
        if opt.wants_sam():
            opt.first_step(zero_grad=True, loss=loss1)
            loss2 = LOSS(model(x), y)
            loss2.backward()
            opt.second_step(zero_grad=True, loss=loss2)
        else:
            opt.base_step(zero_grad=True)
    return opt.stats()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
@pytest.mark.parametrize("variant", ["sam", "asam", "looksam", "sparse_random"])
def test_distributed_norms_are_global(pool, variant, wrap):
    single = telemetry_run(None, WORLD, variant)
    assert all(math.isfinite(single[k]) for k in COMPARED)
    for rank, got in enumerate(pool.run(telemetry_run, variant, wrap)):
        for k in COMPARED:
            assert got[k] == pytest.approx(single[k], rel=1e-12), f"{variant} {wrap} rank {rank}: {k}"
        assert math.isfinite(got["sharpness"])
