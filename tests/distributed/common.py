"""Models, data, optimizers and training loops shared by the distributed tests (float64, tiny MLP).

Every job function takes ``(rank, world, ...)``; ``rank=None`` runs the same loop in one process
on the full batch (the reference the distributed runs must equal).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import sam_kernels as sk

IN, HID, OUT = 5, 7, 3
BATCH = 8  # global batch; rank r trains on rows [r·B/world, (r+1)·B/world)
STEPS = 6
LOSS = F.cross_entropy
AE = dict(total_steps=STEPS, l1=0.5, l2=0.5, decay=0.5)  # AE-SAM thresholds that give both kinds of steps on this data


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT)).double()


def batches(steps: int = STEPS, batch: int = BATCH, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, IN, generator=g, dtype=torch.float64), torch.randint(0, OUT, (batch,), generator=g))
            for _ in range(steps)]


def shard(t: torch.Tensor, rank, world: int) -> torch.Tensor:
    if rank is None:
        return t
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def fisher_data(rank, world):
    """The Fisher samples: rank r scores its own 3; one process scores all of them (the sum is the same)."""
    x, y = batches(1, batch=3 * world, seed=9)[0]
    return [(shard(x, rank, world), shard(y, rank, world))]


def build(variant: str, module: nn.Module, rank, world: int, **extra):
    """The optimizer of ``variant`` over ``module``'s parameters (explicit seeds: runs are comparable)."""
    ps = list(module.parameters())
    sgd = dict(lr=0.1, momentum=0.9)
    if variant == "sam":
        return sk.SAM(ps, torch.optim.SGD, rho=0.05, **sgd, **extra)
    if variant == "sam_adamw":
        return sk.SAM(ps, torch.optim.AdamW, rho=0.05, lr=0.01, **extra)
    if variant == "asam":
        return sk.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **sgd, **extra)
    if variant == "sssam":
        return sk.SSSAM(ps, torch.optim.SGD, rho=0.05, p=0.5, seed=1, **sgd, **extra)
    if variant == "stablesam":
        return sk.StableSAM(ps, torch.optim.SGD, rho=0.05, **sgd, **extra)
    if variant == "stable_asam":
        return sk.StableSAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **sgd, **extra)
    if variant == "looksam":
        return sk.LookSAM(ps, torch.optim.SGD, rho=0.05, k=2, **sgd, **extra)
    if variant == "aesam":
        return sk.AESAM(ps, torch.optim.SGD, rho=0.05, **AE, **sgd, **extra)
    if variant == "aesam_asam":
        return sk.AESAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **AE, **sgd, **extra)
    if variant == "aelooksam":
        return sk.AELookSAM(ps, torch.optim.SGD, rho=0.05, **AE, **sgd, **extra)
    if variant == "sparse_fisher":
        return sk.SparseSAM(ps, torch.optim.SGD, rho=0.05, sparsity=0.5, mask="fisher", model=module, loss_fn=LOSS,
                            fisher_data=fisher_data(rank, world), num_samples=3 * (1 if rank is not None else world),
                            update_unit="step", update_freq=3, **sgd, **extra)
    if variant == "sparse_dynamic":
        return sk.SparseSAM(ps, torch.optim.SGD, rho=0.05, sparsity=0.5, mask="dynamic", horizon=STEPS,
                            update_unit="step", update_freq=2, seed=5, **sgd, **extra)
    if variant == "sparse_random":
        return sk.SparseSAM(ps, torch.optim.SGD, rho=0.05, sparsity=0.6, mask="random", update_unit="step",
                            update_freq=2, seed=6, **sgd, **extra)
    if variant == "sparse_nm":
        return sk.SparseSAM(ps, torch.optim.SGD, rho=0.05, mask="random", pattern="nm", n=2, m=4,
                            update_unit="step", update_freq=2, seed=6, **sgd, **extra)
    if variant == "esam":
        return sk.ESAM(ps, torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5, seed=7, **sgd, **extra)
    if variant == "esam_freeze":  # the single-process saving kept: DDP needs find_unused_parameters=True
        return sk.ESAM(ps, torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5, seed=7, freeze=True, **sgd, **extra)
    if variant in ("esam_local", "esam_sds"):  # SDS only: local or global selection
        return sk.ESAM(ps, torch.optim.SGD, rho=0.05, gamma=0.5, selection=variant[5:].replace("sds", "global"),
                       **sgd, **extra)
    if variant in ("esam_swp", "esam_swp_freeze"):  # SWP only (the manual protocol: m-SAM)
        return sk.ESAM(ps, torch.optim.SGD, rho=0.05, beta=0.5, seed=7, freeze=variant.endswith("freeze"), **sgd,
                       **extra)
    if variant == "bsam":
        return sk.BSAM(ps, lr=0.05, num_data=100, rho=0.05, weight_decay=1e-2, seed=3, **extra)
    if variant == "sam_on":  # SAM-ON's groups on a model without norm layers: the 1-D tensors perturbed
        groups = [{"params": [p for p in ps if p.dim() == 1]}, {"params": [p for p in ps if p.dim() != 1],
                                                                 "perturb": False}]
        return sk.SAM(groups, torch.optim.SGD, rho=0.05, **sgd, **extra)
    if variant == "late_phase":
        return sk.SAM(ps, torch.optim.SGD, rho=0.05, policy=sk.LatePhasePolicy(STEPS, 0.5), **sgd, **extra)
    if variant == "esam_element":
        return sk.ESAM(ps, torch.optim.SGD, rho=0.05, beta=0.6, swp="element", seed=7, **sgd, **extra)
    if variant == "gsam":
        return sk.GSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.4, **sgd, **extra)
    if variant == "wsam":
        return sk.WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.9, **sgd, **extra)
    if variant == "wsam_coupled":
        return sk.WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.9, decouple=False, **sgd, **extra)
    if variant == "gcsam":
        return sk.SAM(ps, torch.optim.SGD, rho=0.05, use_gc=True, **sgd, **extra)
    raise KeyError(variant)


def full(t: torch.Tensor) -> torch.Tensor:
    from sam_kernels.ops.dtensor import is_dtensor
    return (t.full_tensor() if is_dtensor(t) else t).detach().clone()


def train(rank, world: int, variant: str, wrap: str = "ddp", mode: str = "global", steps: int = STEPS,
          backend=None):
    """``steps`` steps of ``variant``; returns (final params as full tensors, the SAM/plain decisions).

    wrap: "ddp" (DistributedDataParallel; "ddp_unused": find_unused_parameters=True), "fsdp2"
    (fully_shard on each Linear and the root; "fsdp2_hsdp_RxS": on an R×S (replicate, shard) mesh)
    or "none". mode: the optimizer's ``distributed`` option; "m-sam" runs the first backward under
    ``no_sync()``. backend: the optimizer's kernel backend (None: automatic).
    """
    module = mlp()
    model = module
    if rank is not None and wrap in ("ddp", "ddp_unused"):
        model = nn.parallel.DistributedDataParallel(module, find_unused_parameters=wrap == "ddp_unused")
    elif rank is not None and wrap.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = None
        if wrap.startswith("fsdp2_hsdp"):  # HSDP: (replicate, shard) mesh, e.g. "fsdp2_hsdp_2x1"
            shape = tuple(int(n) for n in wrap.rsplit("_", 1)[1].split("x"))
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        for m in (module[0], module[2], module):
            fully_shard(m, mesh=mesh)
    extra = ({"distributed": mode} if mode == "m-sam" else {}) | ({"backend": backend} if backend else {})
    opt = build(variant, module, rank, world, **extra)
    # "global-no_sync": the no_sync() recipe with the default mode (what the issue reports drifting)
    first_pass = model.no_sync if mode in ("m-sam", "global-no_sync") else contextlib.nullcontext
    decisions = []
    for x, y in batches(steps):
        x, y = shard(x, rank, world), shard(y, rank, world)
        if variant.startswith("esam") and mode != "m-sam":  # ESAM.step runs both passes: global SAM
            opt.zero_grad(set_to_none=True)
            opt.step(lambda idx=None: F.cross_entropy(model(x if idx is None else x[idx]),
                                                      y if idx is None else y[idx], reduction="none"))
            continue
        with first_pass(), (opt.ascent_pass() if hasattr(opt, "ascent_pass") else contextlib.nullcontext()):
            LOSS(model(x), y).backward()
        sam = opt.wants_sam()
        decisions.append(sam)
        if sam:
            opt.first_step(zero_grad=True)
            LOSS(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.base_step(zero_grad=True)
    return [full(p) for p in module.parameters()], decisions
