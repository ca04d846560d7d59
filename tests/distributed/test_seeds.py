"""Ranks seeded differently (``manual_seed(base + rank)``) with ``seed=None`` still agree on every
decision, selection and mask, and train in lockstep (issue: SS-SAM/ESAM ranks split and hang)."""
import torch
import torch.nn.functional as F
from torch import nn

import sam_kernels as sk
from sam_kernels.optim.esam import draw_tensor_selection

from .common import LOSS, batches, full, mlp, shard


def draws(rank, world):
    torch.manual_seed(100 + rank)
    global_draw = torch.randint(0, 2**62, (1,)).item()  # proves the ranks' global RNGs differ
    module = mlp()  # seeds 0: same model on every rank
    torch.manual_seed(100 + rank)  # then the common per-rank seeding
    ps = list(module.parameters())
    sssam = sk.SSSAM(ps, torch.optim.SGD, p=0.5, lr=0.1)
    esam = sk.ESAM(ps, torch.optim.SGD, beta=0.5, lr=0.1)
    esam_el = sk.ESAM(ps, torch.optim.SGD, beta=0.5, swp="element", lr=0.1)
    rand = sk.SparseSAM(ps, torch.optim.SGD, mask="random", lr=0.1)
    nm = sk.SparseSAM(ps, torch.optim.SGD, mask="random", pattern="nm", n=1, m=2, lr=0.1)
    dyn = sk.SparseSAM(ps, torch.optim.SGD, mask="dynamic", horizon=4, update_unit="step", lr=0.1)
    for p in ps:
        p.grad = torch.randn_like(p)  # different on each rank: the global-SAM dynamic mask's regrow is what is compared
    out = {
        "global": global_draw,
        "sssam": [sssam.policy.decide(t) for t in range(40)],
        "esam_tensor": [draw_tensor_selection(len(ps), 0.5, esam.generator) for _ in range(10)],
        "esam_element": [esam_el.perturbation_options(ps, [p.grad for p in ps])["seed"] for _ in range(5)],
        "random": [m.clone() for m in rand.update_mask()],
        "nm": [m.clone() for m in nm.update_mask()],
        "dynamic_start": [m.clone() for m in dyn.update_mask()],
    }
    return out


def test_seed_none_draws_agree_across_differently_seeded_ranks(pool):
    r0, r1 = pool.run(draws)
    assert r0.pop("global") != r1.pop("global")
    for key in r0:
        a, b = r0[key], r1[key]
        if isinstance(a[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), key
        else:
            assert a == b, key
    assert any(r0["sssam"]) and not all(r0["sssam"])
    assert len({tuple(s) for s in r0["esam_tensor"]}) > 1


def lockstep(rank, world, variant):
    module = mlp()
    model = nn.parallel.DistributedDataParallel(module)
    torch.manual_seed(1000 + rank)
    ps = list(module.parameters())
    if variant == "sssam":
        opt = sk.SSSAM(ps, torch.optim.SGD, p=0.5, lr=0.1, momentum=0.9)
    elif variant == "esam":
        opt = sk.ESAM(ps, torch.optim.SGD, beta=0.5, gamma=0.5, lr=0.1)
    else:
        opt = sk.SparseSAM(ps, torch.optim.SGD, mask="dynamic", horizon=8, update_unit="step", lr=0.1)
    decisions = []
    for x, y in batches(10):
        x, y = shard(x, rank, world), shard(y, rank, world)
        if variant == "esam":
            opt.zero_grad()
            opt.step(lambda idx=None: F.cross_entropy(model(x if idx is None else x[idx]),
                                                      y if idx is None else y[idx], reduction="none"))
            decisions.append(None)
            continue
        LOSS(model(x), y).backward()
        decisions.append(opt.wants_sam())
        if decisions[-1]:
            opt.first_step(zero_grad=True)
            LOSS(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.base_step(zero_grad=True)
    return decisions, [full(p) for p in ps]


def test_seed_none_ddp_training_stays_in_lockstep(pool):
    for variant in ("sssam", "esam", "sparse_dynamic"):
        (d0, w0), (d1, w1) = pool.run(lockstep, variant)
        assert d0 == d1, variant
        assert all(torch.equal(a, b) for a, b in zip(w0, w1)), variant
        if variant == "sssam":
            assert any(d0) and not all(d0)
