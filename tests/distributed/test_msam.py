"""m-SAM (first backward under DDP's no_sync(), ``distributed="m-sam"``): per-replica perturbations,
synchronized plain steps, identical decisions on every rank."""
import pytest
import torch
from torch import nn

from sam_kernels.optim import AdaptivePolicy
from sam_kernels.optim.esam import draw_tensor_selection

from .common import AE, LOSS, batches, build, mlp, shard, train
from .harness import WORLD

RHO, LR, MOMENTUM = 0.05, 0.1, 0.9


def replica_grads(module, x, y):
    module.zero_grad()
    LOSS(module(x), y).backward()
    return [p.grad.detach().clone() for p in module.parameters()]


def msam_reference(variant: str, world: int = WORLD, steps: int = AE["total_steps"]):
    """One process simulating ``world`` replicas, written from the m-SAM recipe (plain torch):
    e_r = rho·g_r/‖g_r‖ per replica; descent with the replica mean of g_r(w + e_r) on SAM steps and of
    g_r(w) on plain steps. SS-SAM draws from a generator seeded 1 (p = 0.5); AE-SAM decides from the
    replica mean of ‖g_r‖²; ESAM's SWP ("esam_swp") perturbs the tensors drawn (beta = 0.5, generator
    seeded 7, the same on every replica) by rho·g_r/(‖g_r,selected‖·beta)."""
    module = mlp()
    params = list(module.parameters())
    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(1)
    swp = torch.Generator().manual_seed(7)
    ae = AdaptivePolicy(AE["total_steps"], l1=AE["l1"], l2=AE["l2"], decay=AE["decay"])
    decisions = []
    for t, (x, y) in enumerate(batches(steps)):
        shards = [(shard(x, r, world), shard(y, r, world)) for r in range(world)]
        first = [replica_grads(module, xr, yr) for xr, yr in shards]
        selected = [True] * len(params)
        if variant in ("sam", "esam_swp"):
            sam = True
            if variant == "esam_swp":
                selected = draw_tensor_selection(len(params), 0.5, swp)
        elif variant == "sssam":
            sam = bool(torch.rand((), generator=gen) < 0.5)
        else:
            mean_sq = sum(sum((g * g).sum() for g in gs) for gs in first) / world
            sam = bool(ae.update(t, mean_sq))
        decisions.append(sam)
        if sam:
            second = []
            w = [p.detach().clone() for p in params]
            beta = 0.5 if variant == "esam_swp" else 1.0
            for (xr, yr), gs in zip(shards, first):
                norm = torch.sqrt(sum((g * g).sum() for g, s in zip(gs, selected) if s)) * beta
                with torch.no_grad():
                    for p, w0, g, s in zip(params, w, gs, selected):
                        p.copy_(w0 + RHO * g / (norm + 1e-12) if s else w0)
                second.append(replica_grads(module, xr, yr))
                with torch.no_grad():
                    for p, w0 in zip(params, w):
                        p.copy_(w0)
            used = second
        else:
            used = first
        for i, p in enumerate(params):
            p.grad = sum(gs[i] for gs in used) / world
        sgd.step()
    return [p.detach().clone() for p in params], decisions


def bsam_msam_reference(world: int = WORLD, steps: int = AE["total_steps"]):
    """BSAM (lr 0.05, N 100, rho 0.05, weight decay 0.01, seed 3; official betas, damping, s_init) under
    m-SAM as the official code's msharpness = world sub-batches (optim.py, build_bsam_optimizer): the
    noisy-sample g_r and the perturbation e_r = rho·g_r/s per replica, then the replica means of
    g_r(w + e_r) and of sqrt(s·g_r²). The noise z: the optimizer's documented draw, the same on every
    replica (float32 randn per tensor from a generator seeded 3)."""
    lr, n, rho, wd, b1, b2, damping = 0.05, 100, 0.05, 1e-2, 0.9, 0.999, 0.1
    module = mlp()
    params = list(module.parameters())
    gen = torch.Generator().manual_seed(3)
    m = [torch.zeros_like(p) for p in params]
    s = [torch.ones_like(p) for p in params]
    for x, y in batches(steps):
        shards = [(shard(x, r, world), shard(y, r, world)) for r in range(world)]
        w = [p.detach().clone() for p in params]
        z = [torch.randn(p.shape, dtype=torch.float32, generator=gen).double() for p in params]
        first, second = [], []
        for xr, yr in shards:
            with torch.no_grad():
                for p, w0, zi, si in zip(params, w, z, s):
                    p.copy_(w0 + torch.sqrt(1.0 / (n * si)) * zi)
            gs = replica_grads(module, xr, yr)
            first.append(gs)
            with torch.no_grad():
                for p, w0, g, si in zip(params, w, gs, s):
                    p.copy_(w0 + rho * g / si)
            second.append(replica_grads(module, xr, yr))
        ge = [sum(g[i] for g in second) / world for i in range(len(params))]
        spread = [sum(torch.sqrt(s[i] * g[i] ** 2) for g in first) / world for i in range(len(params))]
        m = [b1 * mi + (1 - b1) * (gi + wd * w0) for mi, gi, w0 in zip(m, ge, w)]
        with torch.no_grad():
            for p, w0, mi, si in zip(params, w, m, s):
                p.copy_(w0 - lr * mi / si)
        s = [b2 * si + (1 - b2) * (sp + damping + wd) for si, sp in zip(s, spread)]
    return [p.detach().clone() for p in params]


def test_bsam_msam_equals_the_official_msharpness(pool):
    want = bsam_msam_reference()
    for rank, (params, _) in enumerate(pool.run(train, "bsam", "ddp", "m-sam")):
        for i, (a, b) in enumerate(zip(params, want)):
            err = (a - b).abs().max().item()
            assert err <= 1e-12, f"bsam rank {rank} param {i}: {err:.3e}"


@pytest.mark.parametrize("variant", ["sam", "sssam", "aesam", "esam_swp", "esam_swp_freeze"])
def test_msam_equals_per_replica_reference(pool, variant):
    want, want_decisions = msam_reference(variant.replace("_freeze", ""))
    ranks = pool.run(train, variant, "ddp", "m-sam")  # a rank waiting on its peer fails the run (harness)
    for rank, (params, decisions) in enumerate(ranks):
        assert decisions == want_decisions, f"rank {rank}"
        for i, (a, b) in enumerate(zip(params, want)):
            err = (a - b).abs().max().item()
            assert err <= 1e-12, f"{variant} rank {rank} param {i}: {err:.3e}"
    if variant in ("sssam", "aesam"):
        assert any(want_decisions) and not all(want_decisions)  # plain steps were exercised
    # m-SAM is not global SAM: the per-replica perturbation changes the result.
    glob, _ = train(None, WORLD, variant.replace("_freeze", ""))
    assert max((a - b).abs().max().item() for a, b in zip(glob, want)) > 1e-6


@pytest.mark.parametrize("variant", ["stablesam", "stable_asam", "looksam", "aelooksam", "sparse_dynamic",
                                     "esam_element", "sam_adamw"])
def test_msam_replicas_stay_identical(pool, variant):
    (w0, d0), (w1, d1) = pool.run(train, variant, "ddp", "m-sam", 8)
    assert d0 == d1
    for i, (a, b) in enumerate(zip(w0, w1)):
        assert torch.equal(a, b), f"{variant}: replicas differ at param {i} by {(a - b).abs().max().item():.3e}"
    if variant in ("looksam", "aelooksam"):
        assert any(d0) and not all(d0)


def no_sync_recipe_in_global_mode(rank, world, variant):
    """The m-SAM recipe (first backward under no_sync()) with the default distributed="global": each rank's
    first-pass gradient is its own. Returns the step that raised and whether every weight was unchanged."""
    module = mlp()
    model = nn.parallel.DistributedDataParallel(module)
    opt = build(variant, module, rank, world)
    for t, (x, y) in enumerate(batches(3)):
        x, y = shard(x, rank, world), shard(y, rank, world)
        with model.no_sync():
            LOSS(model(x), y).backward()
        before = [p.detach().clone() for p in module.parameters()]
        try:
            if opt.wants_sam():
                opt.first_step(zero_grad=True)
                LOSS(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.base_step(zero_grad=True)
        except RuntimeError as exc:
            return t, str(exc), all(torch.equal(a, p) for a, p in zip(before, module.parameters()))
    return None, "", True


@pytest.mark.parametrize("variant", ["sssam", "sam", "looksam", "aesam"])
def test_input_11_global_mode_refuses_the_no_sync_recipe(pool, variant):
    """Without the flag, SS-SAM's plain steps used each replica's own gradient and the replicas drifted
    apart silently (0.22 after 6 steps). Now the first step raises on every rank, naming the fix, with the
    weights unchanged (a SAM first step and a plain first step alike: SS-SAM and AE-SAM may take either)."""
    for step, message, unchanged in pool.run(no_sync_recipe_in_global_mode, variant):
        assert step == 0 and unchanged
        assert "distributed='m-sam'" in message


def nan_on_one_rank(rank, world, variant):
    """m-SAM: a NaN in ONE rank's unsynchronized first-pass gradient. Every rank must raise the same
    FloatingPointError (a rank that went on would wait for its peer's second backward forever),
    with the weights unperturbed, and training must go on in lockstep afterwards."""
    module = mlp()
    model = nn.parallel.DistributedDataParallel(module)
    opt = build(variant, module, rank, world, distributed="m-sam")
    raised = []
    for t, (x, y) in enumerate(batches(5)):
        x, y = shard(x, rank, world), shard(y, rank, world)
        with model.no_sync():
            LOSS(model(x), y).backward()
        if t == 2 and rank == 1:
            next(module.parameters()).grad.view(-1)[0] = float("nan")
        before = [p.detach().clone() for p in module.parameters()]
        try:
            if opt.wants_sam():
                opt.first_step(zero_grad=True)
                LOSS(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.base_step(zero_grad=True)
        except FloatingPointError:
            raised.append(t)
            assert all(torch.equal(a, p) for a, p in zip(before, module.parameters()))
            opt.zero_grad(set_to_none=True)
    return raised, [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("variant", ["sam", "aesam", "sssam", "stablesam"])
def test_msam_nan_on_one_rank_raises_on_every_rank(pool, variant):
    (r0, w0), (r1, w1) = pool.run(nan_on_one_rank, variant)
    assert r0 == r1 == [2]
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
