"""Collectives the optimizer issues per step, per mode (the figures of the docs' Collectives page).

Counted by patching the ``torch.distributed`` collectives while the optimizer's own methods run
(DDP's and FSDP2's gradient reductions inside forward/backward are theirs, not counted).
"""
import contextlib
import functools

import pytest
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sam_kernels.optim.distributed import AGREEMENT_STEPS

from .common import LOSS, batches, build, mlp, shard

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_gather_object", "broadcast_object_list", "all_to_all", "reduce", "gather", "scatter", "barrier")
METHODS = ("wants_sam", "first_step", "second_step", "base_step", "step")


def counted(rank, world, variant, wrap, mode, finite_check=True, telemetry="default", steps=6):
    """(collectives during construction, per step: (SAM step?, {collective: count})); ``telemetry``:
    the optimizer's ``telemetry=`` argument ("default": none given)."""
    counts: dict = {}
    active = [True]
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def patched(name, *args, **kwargs):
        if active[0]:
            counts[name] = counts.get(name, 0) + 1
        return originals[name](*args, **kwargs)

    for name in COLLECTIVES:
        setattr(dist, name, functools.partial(patched, name))
    try:
        module = mlp()
        active[0] = False
        if wrap == "ddp":
            model = nn.parallel.DistributedDataParallel(module)
        else:
            from torch.distributed.fsdp import fully_shard
            fully_shard(module)
            model = module
        active[0] = True
        extra = {"finite_check": finite_check} | ({"distributed": mode} if mode != "global" else {})
        if telemetry != "default":
            extra["telemetry"] = telemetry
        opt = build(variant, module, rank, world, **extra)
        construction = dict(counts)
        active[0] = False
        for name in METHODS:
            method = getattr(opt, name)

            def wrapper(*a, _m=method, **k):
                outer = active[0]
                active[0] = True
                try:
                    return _m(*a, **k)
                finally:
                    active[0] = outer
            setattr(opt, name, wrapper)
        per_step = []
        first_pass = model.no_sync if mode == "m-sam" else contextlib.nullcontext
        for x, y in batches(steps):
            counts.clear()
            x, y = shard(x, rank, world), shard(y, rank, world)
            if variant.startswith("esam"):
                opt.zero_grad()
                opt.step(lambda idx=None: F.cross_entropy(model(x if idx is None else x[idx]),
                                                          y if idx is None else y[idx], reduction="none"))
                per_step.append((True, dict(counts)))
                continue
            with first_pass():
                LOSS(model(x), y).backward()
            sam = opt.wants_sam()
            if sam:
                opt.first_step(zero_grad=True)
                LOSS(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.base_step(zero_grad=True)
            per_step.append((sam, dict(counts)))
        return construction, per_step
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# (variant, wrap, mode, finite_check) -> (construction, collectives on SAM steps, on plain steps), with the
# default telemetry ("norms"): under FSDP2 without the finite check its ‖g(w + e)‖ is one more scalar, and
# ASAM's ‖g(w)‖ and ‖e‖ two more (its ascent norm is ‖T ⊙ g‖; ‖e‖ is summed on each rank's shards)
EXPECTED = {
    ("sam", "ddp", "global", True): ({}, {}, None),
    ("sssam", "ddp", "global", True): ({"broadcast": 1}, {}, {}),
    ("aesam", "ddp", "global", True): ({}, {}, {}),
    ("looksam", "ddp", "global", True): ({}, {}, {}),
    ("sparse_dynamic", "ddp", "global", True): ({"broadcast": 1}, {}, None),
    ("esam", "ddp", "global", True): ({"broadcast": 1}, {"all_gather": 1}, None),
    ("sam", "ddp", "m-sam", True): ({}, {"all_reduce": 1}, None),
    ("sam", "ddp", "m-sam", False): ({}, {}, None),
    ("sssam", "ddp", "m-sam", True): ({"broadcast": 1}, {"all_reduce": 1}, {"all_reduce": 1}),
    ("aesam", "ddp", "m-sam", True): ({}, {"all_reduce": 1}, {"all_reduce": 2}),
    ("aesam_asam", "ddp", "m-sam", True): ({}, {"all_reduce": 2}, {"all_reduce": 2}),
    ("looksam", "ddp", "m-sam", True): ({}, {"all_reduce": 2}, {"all_reduce": 1}),
    ("stablesam", "ddp", "m-sam", False): ({}, {"all_reduce": 1}, None),
    ("sam", "fsdp2", "global", True): ({}, {"all_reduce": 2}, None),
    ("sam", "fsdp2", "global", False): ({}, {"all_reduce": 2}, None),
    ("stablesam", "fsdp2", "global", False): ({}, {"all_reduce": 2}, None),
    ("looksam", "fsdp2", "global", False): ({}, {"all_reduce": 4}, {"all_reduce": 2}),
    ("asam", "fsdp2", "global", False): ({}, {"all_reduce": 4}, None),
}
# the same with telemetry=False, where the default's counts differ
EXPECTED_TELEMETRY_OFF = {
    ("sam", "fsdp2", "global", False): ({}, {"all_reduce": 1}, None),
    ("looksam", "fsdp2", "global", False): ({}, {"all_reduce": 3}, {"all_reduce": 2}),
    ("asam", "fsdp2", "global", False): ({}, {"all_reduce": 1}, None),
}


CASES = [(case, "default") for case in EXPECTED] + [(case, False) for case in EXPECTED_TELEMETRY_OFF]


@pytest.mark.parametrize("case, telemetry", CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else
                         f"telemetry={c}")
def test_collectives_per_step(pool, case, telemetry):
    table = EXPECTED if telemetry == "default" else EXPECTED_TELEMETRY_OFF
    construction, sam_steps, plain_steps = table[case]
    for got_construction, per_step in pool.run(counted, *case, telemetry):
        assert got_construction == construction
        kinds = {sam for sam, _ in per_step}
        if plain_steps is None:
            assert kinds == {True}
        else:
            assert kinds == {True, False}, "the case must exercise both kinds of steps"
        for i, (sam, counts) in enumerate(per_step):
            expected = dict(sam_steps if sam else plain_steps)
            if case[1:3] == ("ddp", "global") and i < AGREEMENT_STEPS:  # the ranks compare their first-pass ‖g‖²
                expected["all_reduce"] = expected.get("all_reduce", 0) + 1
            assert counts == expected, (i, sam, counts)


def custom_group(rank, world):
    """m-SAM and Sparse SAM's Fisher sum on a user-given process group: every step collective uses it."""
    from sam_kernels.optim.distributed import PerReplica

    pg = dist.new_group(list(range(world)))
    seen = []
    original = dist.all_reduce

    def recording(tensor, *args, group=None, **kwargs):
        seen.append(group is pg)
        return original(tensor, *args, group=group, **kwargs)

    module = mlp()
    model = nn.parallel.DistributedDataParallel(module, process_group=pg)
    opt = build("sparse_fisher", module, rank, world, distributed=PerReplica(process_group=pg))
    dist.all_reduce = recording
    try:
        for x, y in batches(4):
            x, y = shard(x, rank, world), shard(y, rank, world)
            with model.no_sync():
                LOSS(model(x), y).backward()
            opt.first_step(zero_grad=True)
            LOSS(model(x), y).backward()
            opt.second_step(zero_grad=True)
    finally:
        dist.all_reduce = original
    return seen


def test_a_given_process_group_carries_every_collective(pool):
    for seen in pool.run(custom_group):
        assert len(seen) == 4 + 2 and all(seen)  # one check per step, one Fisher sum per refresh (steps 0, 3)
