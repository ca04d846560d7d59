"""SAM (or a variant) with torch.distributed: DDP global SAM, m-SAM, or FSDP2.

One node, 2 CPU processes (gloo):
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode global
One node, 8 GPUs (NCCL):
    torchrun --nproc_per_node 8 examples/train_distributed.py --mode m-sam --variant sssam
Several nodes (run on every node, NODE_RANK = 0..N-1, MASTER = the address of node 0):
    torchrun --nnodes N --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $MASTER:29500 examples/train_distributed.py --mode global --wrap fsdp2

A synthetic classification task (a fixed random teacher network labels Gaussian inputs), so the
example needs no download. Each rank trains on its own slice of every global batch (what
DistributedSampler gives); at the end every rank checks that its weights equal rank 0's.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sam_kernels as sk

VARIANTS = ("sam", "asam", "sssam", "stablesam", "looksam", "aesam", "sparse", "esam")


def make_optimizer(variant: str, model: nn.Module, mode: str, steps: int):
    ps = list(model.parameters())
    kw = dict(lr=0.05, momentum=0.9, distributed=mode)
    if variant == "sam":
        return sk.SAM(ps, torch.optim.SGD, rho=0.05, **kw)
    if variant == "asam":
        return sk.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **kw)
    if variant == "sssam":
        return sk.SSSAM(ps, torch.optim.SGD, rho=0.05, p=0.6, **kw)  # seed=None: rank 0's seed on every rank
    if variant == "stablesam":
        return sk.StableSAM(ps, torch.optim.SGD, rho=0.05, **kw)
    if variant == "looksam":
        return sk.LookSAM(ps, torch.optim.SGD, rho=0.05, k=5, **kw)
    if variant == "aesam":
        return sk.AESAM(ps, torch.optim.SGD, rho=0.05, total_steps=steps, **kw)
    if variant == "sparse":
        return sk.SparseSAM(ps, torch.optim.SGD, rho=0.05, sparsity=0.5, mask="dynamic", horizon=steps,
                            update_unit="step", update_freq=20, **kw)
    return sk.ESAM(ps, torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("global", "m-sam"), default="global")
    ap.add_argument("--wrap", choices=("ddp", "fsdp2"), default="ddp")
    ap.add_argument("--variant", choices=VARIANTS, default="sam")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split across ranks)")
    args = ap.parse_args()
    if args.mode == "m-sam" and args.wrap != "ddp":
        ap.error("m-SAM is DDP's no_sync() recipe; FSDP2 runs global SAM")
    if args.mode == "m-sam" and args.variant == "esam":
        ap.error("ESAM.step runs both passes itself (global SAM); use the manual protocol for m-SAM")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights everywhere (DDP would broadcast rank 0's anyway)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    module = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    torch.manual_seed(1000 + rank)  # per-rank seeding, as usual: the optimizer's seeds still agree
    if args.wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if cuda else None)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in (module[0], module[2]):
            fully_shard(layer)
        model = fully_shard(module)
    opt = make_optimizer(args.variant, module, args.mode, args.steps)
    first_pass = model.no_sync if args.mode == "m-sam" else contextlib.nullcontext

    local = args.batch // world
    data = torch.Generator().manual_seed(1)
    sam_steps = 0
    for step in range(args.steps):
        x = torch.randn(args.batch, 16, generator=data)[rank * local:(rank + 1) * local].to(device)
        with torch.no_grad():
            y = teacher(x).argmax(dim=1)
        if args.variant == "esam":
            opt.zero_grad()
            losses = opt.step(lambda idx=None: F.cross_entropy(model(x if idx is None else x[idx]),
                                                               y if idx is None else y[idx], reduction="none"))
            loss = losses.mean()
            sam_steps += 1
        else:
            with first_pass():  # m-SAM: each replica perturbs with its own gradient
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            if opt.wants_sam():  # the same answer on every rank
                sam_steps += 1
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.base_step(zero_grad=True)
        if step % 20 == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:4d}  loss {mean.item() / world:.4f}")

    # Every rank must hold the same weights (full tensors under FSDP2).
    flat = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"{args.variant} ({args.mode}, {args.wrap}, {world} ranks): {sam_steps}/{args.steps} SAM steps; "
              f"max weight difference between ranks {diff.item():.1e}")
    # Free DDP's reducer now, not at interpreter exit, where torch 2.14 + gloo sometimes aborts
    # ("terminate called without an active exception"; seen without sam_kernels too).
    del model, opt
    gc.collect()
    dist.barrier()  # no rank tears its process group down while a peer still talks to it
    dist.destroy_process_group()
    if diff.item() != 0:
        raise SystemExit("replicas diverged")


if __name__ == "__main__":
    main()
