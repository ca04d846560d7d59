"""``zero_grad(set_to_none=False); step(closure)`` under DDP and FSDP2 = the unsharded manual loop.

The closure zeroes, forwards and backpropagates. Whether a backward wrote the gradients is known
from post-accumulate-gradient hooks (DDP) or, for FSDP2's DTensor gradients (written outside
autograd), from their version counters: both paths are run, with the first pass left to the
closure and with the first backward run by the loop itself (then the closure runs once per step).
"""
import pytest
import torch
import torch.nn.functional as F

from .common import batches, build, full, mlp, shard, train
from .harness import WORLD


def closure_train(rank, world, variant, wrap, user_first_pass):
    module = mlp()
    model = module
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(module)
    else:
        from torch.distributed.fsdp import fully_shard
        for m in (module[0], module[2], module):
            fully_shard(m)
    opt = build(variant, module, rank, world)
    calls = 0
    for x, y in batches():
        x, y = shard(x, rank, world), shard(y, rank, world)

        def closure():
            nonlocal calls
            calls += 1
            opt.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.zero_grad(set_to_none=False)
        if user_first_pass:
            F.cross_entropy(model(x), y).backward()
        opt.step(closure)
    return [full(p) for p in module.parameters()], calls


@pytest.mark.parametrize("user_first_pass", [False, True])
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
@pytest.mark.parametrize("variant", ["sam", "sssam"])
def test_input_06_zeroed_closure_equals_unsharded(pool, variant, wrap, user_first_pass):
    single, decisions = train(None, WORLD, variant)
    sam_steps = sum(decisions)
    for rank, (params, calls) in enumerate(pool.run(closure_train, variant, wrap, user_first_pass)):
        # the closure gives the second pass of each SAM step, and the first pass when the loop did not
        assert calls == sam_steps + (0 if user_first_pass else len(decisions)), f"rank {rank}"
        for i, (a, b) in enumerate(zip(params, single)):
            err = (a - b).abs().max().item()
            assert err <= 1e-12, f"{variant} {wrap} rank {rank} param {i}: {err:.3e}"
