"""What the framework tests share: a tiny regression task and the manual SAM loop they are compared with."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

import sam_kernels as sk

N_FEATURES = 4


def make_data(n: int, dtype=torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g, dtype=dtype)
    y = (x.sum(1, keepdim=True) * 0.5).tanh() + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)
    return x, y


def make_net(dtype=torch.float32, seed: int = 0, batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    norm = [torch.nn.BatchNorm1d(8)] if batchnorm else []
    return torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 8), *norm, torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def make_sam(params, base: str = "sgd", **kw) -> sk.SAM:
    """``base``: "sgd" (momentum), "adamw", or "sssam" (SS-SAM, p = 0.5, seed 1: steps 1 and 4 plain, the others SAM)."""
    if base == "sgd":
        return sk.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw)
    if base == "sssam":
        return sk.SSSAM(params, torch.optim.SGD, rho=0.05, p=0.5, seed=1, lr=0.1, momentum=0.9, **kw)
    return sk.SAM(params, torch.optim.AdamW, rho=0.05, lr=0.01, weight_decay=0.01, **kw)


def autocast(precision: str, device_type: str = "cpu"):
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
    if precision == "16-mixed":
        return torch.autocast(device_type, dtype=torch.float16, cache_enabled=False)
    return contextlib.nullcontext()


def manual_steps(net: torch.nn.Module, opt: sk.SAM, steps: list[list[tuple[torch.Tensor, torch.Tensor]]],
                 precision: str = "32-true", clip: float = 0.0, sched=None,
                 scaler: Optional[torch.amp.GradScaler] = None, loss_divisor: Optional[int] = None) -> None:
    """The documented loops: each step a list of micro-batches, both passes accumulated over all of them
    (each loss divided by ``loss_divisor``, default the number of micro-batches), the second pass
    under ``frozen_running_stats`` and clipped; a plain step where the policy says so."""
    def backward(x, y, n):
        with autocast(precision, x.device.type):
            loss = F.mse_loss(net(x), y) / n
        (scaler.scale(loss) if scaler is not None else loss).backward()

    for micro in steps:
        n = loss_divisor or len(micro)
        for x, y in micro:
            backward(x, y, n)
        sam_step = opt.wants_sam()
        if sam_step:
            opt.first_step(zero_grad=True)
            with sk.frozen_running_stats(net):
                for x, y in micro:
                    backward(x, y, n)
        if clip > 0:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        elif sam_step:
            opt.second_step()
        else:
            opt.base_step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    """Parameters and buffers (BatchNorm statistics) of ``a`` and ``b`` close."""
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


def launch(framework: str, out_dir, timeout: float = 300) -> list[dict]:
    """Run ``launched.py FRAMEWORK`` on 2 CPU processes (torch.distributed.run, gloo); each rank's state dict."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("launched.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), framework, str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=script.parents[2])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(2)]


def global_steps(x: torch.Tensor, y: torch.Tensor, world: int, steps: int, batch: int):
    """The single-process steps of a ``world``-rank run (``launched.py``): one micro-batch each."""
    n = world * batch
    return [[(x[s * n:(s + 1) * n], y[s * n:(s + 1) * n])] for s in range(steps)]
