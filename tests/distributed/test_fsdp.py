"""FSDP2 (``fully_shard``: DTensor parameters and gradients) = the unsharded run; FSDP1 is refused."""
import pytest
import torch

import sam_kernels as sk
from sam_kernels import ops

from .common import mlp, train
from .harness import WORLD

FSDP2_VARIANTS = ["sam", "sam_adamw", "asam", "stablesam", "stable_asam", "looksam", "sparse_random", "sparse_nm",
                  "sparse_dynamic", "esam", "esam_element", "sssam", "aesam", "sam_on", "late_phase", "gsam", "wsam",
                  "wsam_coupled", "gcsam", "friendlysam", "vasso", "msam", "sam_2step"]


@pytest.mark.parametrize("variant", FSDP2_VARIANTS)
def test_fsdp2_equals_unsharded(pool, variant):
    single, single_decisions = train(None, WORLD, variant)
    for rank, (params, decisions) in enumerate(pool.run(train, variant, "fsdp2")):
        assert decisions == single_decisions, f"rank {rank}"
        for i, (a, b) in enumerate(zip(params, single)):
            err = (a - b).abs().max().item()
            assert err <= 1e-12, f"{variant} rank {rank} param {i}: {err:.3e}"


@pytest.mark.parametrize("variant", ["sam", "looksam", "sparse_nm", "esam_element"])
def test_fsdp2_eager_backend_equals_unsharded(pool, variant):
    """The issue's second failure: backend="eager" died on aten._foreach_copy_ with DTensors."""
    single, _ = train(None, WORLD, variant, backend="eager")
    for rank, (params, _) in enumerate(pool.run(train, variant, "fsdp2", "global", 6, "eager")):
        for i, (a, b) in enumerate(zip(params, single)):
            assert (a - b).abs().max().item() <= 1e-12, f"{variant} rank {rank} param {i}"


@pytest.mark.parametrize("mesh", ["1x2", "2x1"])
@pytest.mark.parametrize("variant", ["sam", "stable_asam", "looksam", "sparse_dynamic"])
def test_hsdp_equals_unsharded(pool, variant, mesh):
    """HSDP (Replicate, Shard) meshes: reductions run over the shard dimension only (2x1: the two ranks
    are replicas, nothing is summed across them; 1x2: both shards are summed)."""
    single, _ = train(None, WORLD, variant)
    for rank, (params, _) in enumerate(pool.run(train, variant, f"fsdp2_hsdp_{mesh}")):
        for i, (a, b) in enumerate(zip(params, single)):
            assert (a - b).abs().max().item() <= 1e-12, f"{variant} {mesh} rank {rank} param {i}"


def sharded_ops(rank, world):
    """Each op on DTensor shards against the same op on the full tensors (one process's answer)."""
    from torch.distributed.fsdp import fully_shard

    module = mlp()
    fully_shard(module)
    ps = list(module.parameters())
    torch.manual_seed(7)  # same full values on every rank
    full_scores = [torch.rand(p.shape, dtype=torch.float64) for p in ps]
    scores = sk.optim.masks.dtensor.shard_like(full_scores, ps)
    out = {}
    sq = ops.grad_sq_norm(scores)
    out["sq"] = (sq.item(), ops.grad_sq_norm(full_scores).item(), type(sq).__name__)
    out["dot"] = (ops.dot(scores, ps).item(), ops.dot(full_scores, [p.full_tensor() for p in ps]).item())
    for density in (0.3, 0.5, 0.77):
        masks = ops.topk_mask(scores, density)
        local_count = sum(int(m.to_local().sum()) for m in masks)
        want = ops.topk_mask(full_scores, density)
        same = all(torch.equal(m.full_tensor(), w) for m, w in zip(masks, want))
        out[f"topk{density}"] = (local_count, sum(int(w.sum()) for w in want), same)
    nm = ops.nm_mask(scores, 2, 4)
    out["nm"] = all(torch.equal(m.full_tensor(), w) for m, w in zip(nm, ops.nm_mask(full_scores, 2, 4)))
    centred = [s.clone() for s in scores]  # Shard(0): each row whole on one rank
    ops.centralize_(centred)
    by_hand = [f - f.sum(dim=1, keepdim=True) / f.shape[1] if f.dim() == 2 else f for f in full_scores]
    out["gc"] = max(float((c.full_tensor() - h).abs().max()) for c, h in zip(centred, by_hand))
    return out


def test_fsdp2_ops_reduce_over_the_mesh_and_masks_keep_the_exact_global_count(pool):
    ranks = pool.run(sharded_ops)
    for out in ranks:
        got, want, kind = out["sq"]
        assert kind == "Tensor" and abs(got - want) <= 1e-12 * want
        assert abs(out["dot"][0] - out["dot"][1]) <= 1e-12 * abs(out["dot"][1])
        assert out["nm"]
        assert out["gc"] <= 1e-12
    for density in (0.3, 0.5, 0.77):
        counts = [out[f"topk{density}"][0] for out in ranks]
        assert sum(counts) == ranks[0][f"topk{density}"][1]  # the shards' counts add up to the exact global k
        assert all(out[f"topk{density}"][2] for out in ranks)


def fsdp1(rank, world, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    module = FullyShardedDataParallel(mlp(), sharding_strategy=ShardingStrategy.FULL_SHARD,
                                      use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    before = [p.detach().clone() for p in module.parameters()]
    try:
        sk.SAM(module.parameters(), torch.optim.SGD, lr=0.1)
    except ValueError as exc:
        message = str(exc)
    else:
        message = None
    return message, all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_is_refused_at_construction_pointing_to_fsdp2(pool, use_orig_params):
    for message, unchanged in pool.run(fsdp1, use_orig_params):
        assert message is not None and "FSDP1" in message and "fully_shard" in message
        assert unchanged


def test_msam_refuses_dtensor_parameters(pool):
    for message in pool.run(msam_fsdp2):
        assert message is not None and "distributed='global'" in message


def msam_fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard

    module = mlp()
    fully_shard(module)
    try:
        sk.SAM(module.parameters(), torch.optim.SGD, lr=0.1, distributed="m-sam")
    except ValueError as exc:
        return str(exc)
    return None


def test_bsam_refuses_dtensor_parameters(pool):
    for message in pool.run(bsam_fsdp2):
        assert message is not None and "FSDP2" in message and "DDP" in message


def bsam_fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard

    module = mlp()
    fully_shard(module)
    try:
        sk.BSAM(module.parameters(), num_data=100)
    except ValueError as exc:
        return str(exc)
    return None


def test_unknown_distributed_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="distributed must be one of"):
        sk.SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, distributed="msam")


def dtensor_errors(rank, world):
    """Inputs the DTensor path cannot handle raise before anything is written."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial

    module = mlp()
    fully_shard(module)
    ps = list(module.parameters())
    grads = [torch.ones_like(p) for p in ps]
    backups = [torch.empty_like(p) for p in ps]
    before = [p.full_tensor() for p in ps]
    out = []
    attempts = [
        lambda: ops.perturb_(ps, [g.full_tensor() for g in grads], backups, 0.05),  # plain grads
        lambda: ops.perturb_(ps, grads, backups, 0.05, keep_prob=0.5),  # no seed: ranks would draw differently
        # from_local, not redistribute: torch 2.13 refuses redistributing to Partial ("internal use only")
        lambda: ops.grad_sq_norm([DTensor.from_local(g.to_local(), g.device_mesh, [Partial()], run_check=False)
                                  for g in grads]),
    ]
    for attempt in attempts:
        try:
            attempt()
            out.append(None)
        except (TypeError, ValueError) as exc:
            out.append(type(exc).__name__ + ": " + str(exc))
    unchanged = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, ps))
    return out, unchanged


def test_fsdp2_bad_dtensor_inputs_are_clear_errors(pool):
    for messages, unchanged in pool.run(dtensor_errors):
        assert unchanged
        mixed, unseeded, partial = messages
        assert mixed is not None and "mixes DTensors and plain tensors" in mixed
        assert unseeded is not None and "explicit seed" in unseeded
        assert partial is not None and "unreduced sum" in partial


def fsdp2_nan_on_one_shard(rank, world):
    """A NaN in one rank's gradient shard: the all-reduced norm makes every rank raise, weights unperturbed."""
    from torch.distributed.fsdp import fully_shard

    from .common import LOSS, batches, shard

    module = mlp()
    fully_shard(module)
    opt = sk.SAM(module.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    LOSS(module(shard(x, rank, world)), shard(y, rank, world)).backward()
    if rank == 1:
        next(module.parameters()).grad.to_local().view(-1)[0] = float("nan")
    before = [p.full_tensor() for p in module.parameters()]
    try:
        opt.first_step()
        raised = False
    except FloatingPointError:
        raised = True
    return raised, all(torch.equal(a, p.full_tensor()) for a, p in zip(before, module.parameters()))


def test_fsdp2_nan_on_one_shard_raises_on_every_rank(pool):
    assert pool.run(fsdp2_nan_on_one_shard) == [(True, True), (True, True)]


def gc_shard1(rank, world):
    """use_gc with weights sharded along dim 1 (rows split across ranks): refused before any change."""
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3).double()  # FSDP2 shards dim 1 only evenly: 4 columns over 2 ranks
    fully_shard(module, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    opt = sk.SAM(module.parameters(), torch.optim.SGD, lr=0.1, use_gc=True)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    F.cross_entropy(module(x), y).backward()
    before = [p.full_tensor().clone() for p in module.parameters()]
    try:
        opt.first_step()
    except ValueError as exc:
        message = str(exc)
    else:
        message = None
    return message, all(torch.equal(a, p.full_tensor()) for a, p in zip(before, module.parameters()))


def test_gc_refuses_gradients_sharded_along_rows(pool):
    for message, unchanged in pool.run(gc_shard1):
        assert message is not None and "Shard(0)" in message
        assert unchanged
