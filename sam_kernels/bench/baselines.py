"""Per-parameter Python loops: the way the most used PyTorch SAM code (davda54/sam) is written.

These are the "before" of every speedup: one or more kernel launches per parameter, temporaries
allocated per parameter, and the base optimizer's own default implementation. They are kept
faithful on purpose (including ``1.0 * p.grad``, which costs a full extra pass), because that
is what users run; only where davda54 has no such op do the loops follow torch.optim's
single-tensor code.
"""
from __future__ import annotations

from typing import Sequence

import torch

Tensors = Sequence[torch.Tensor]


class Davda54SAM(torch.optim.Optimizer):
    """davda54/sam's SAM class (MIT), reproduced for benchmarking; behaviour unchanged."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None) -> None:
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def _grad_norm(self) -> torch.Tensor:
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
            for group in self.param_groups for p in group["params"] if p.grad is not None]), p=2)


# --------------------------------------------------------------------------- foreach step

def foreach_ascent(params: list, grads: Tensors, backups: list, rho: float) -> None:
    """SAM's first step the way a user writes it with torch's foreach ops: global norm, backup, w += e."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_copy_(backups, params)
    torch._foreach_add_(params, torch._foreach_mul(grads, rho / (norm + 1e-12)))


def foreach_descent(params: list, grads: Tensors, backups: Tensors, bufs: list, lr: float, momentum: float,
                    weight_decay: float) -> None:
    """Restore w, then torch.optim.SGD's foreach update (dampening 0, no nesterov)."""
    torch._foreach_copy_(params, backups)
    d = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    torch._foreach_add_(params, bufs, alpha=-lr)


# --------------------------------------------------------------------------- per-op loops

def grad_norm(grads: Tensors) -> torch.Tensor:
    """davda54's _grad_norm (non-adaptive): one norm kernel per tensor, then a stack."""
    return torch.norm(torch.stack([(1.0 * g).norm(p=2) for g in grads]), p=2)


def grad_sq_norm(grads: Tensors) -> torch.Tensor:
    return grad_norm(grads) ** 2


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def perturb_(params: Tensors, grads: Tensors, backups: list, sq_norm: torch.Tensor, rho: float) -> None:
    """davda54 first_step after the norm: clone a backup, then add e_w, per parameter."""
    scale = rho / (sq_norm.sqrt() + 1e-12)
    for i, (p, g) in enumerate(zip(params, grads)):
        backups[i] = p.clone()
        p.add_(1.0 * g * scale.to(p))


def restore_(params: Tensors, backups: Tensors) -> None:
    # davda54 rebinds p.data (free, but it is why first_step must clone); a copy is the fair loop
    for p, b in zip(params, backups):
        p.copy_(b)


def sgd_restore_step_(params, backups, grads, bufs, *, lr: float, momentum: float, weight_decay: float) -> None:
    """Restore, then torch.optim.SGD's single-tensor update (dampening 0, no nesterov)."""
    for p, b, g, buf in zip(params, backups, grads, bufs):
        p.copy_(b)
        d = g.add(p, alpha=weight_decay)
        buf.mul_(momentum).add_(d)
        p.add_(buf, alpha=-lr)


def adamw_restore_step_(params, backups, grads, exp_avgs, exp_avg_sqs, *, step: int, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float) -> None:
    """Restore, then torch.optim.AdamW's single-tensor update."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    for p, b, g, m, v in zip(params, backups, grads, exp_avgs, exp_avg_sqs):
        p.copy_(b)
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias_correction1)


def renormalize_(grads: Tensors, ref_sq_norm: torch.Tensor, eps: float = 1e-12) -> None:
    """Stable SAM authors' style: global norm from per-tensor norms, then one mul per tensor."""
    ratio = ref_sq_norm.sqrt() / (grad_norm(grads) + eps)
    for g in grads:
        g.mul_(ratio)


def fisher_accumulate_(fisher: Tensors, grads: Tensors, scale: float) -> None:
    for f, g in zip(fisher, grads):
        f.addcmul_(g, g, value=scale)


def looksam_store_(g_v: Tensors, grads: Tensors, sam_grads: Tensors, eps: float = 1e-12) -> None:
    coef = dot(grads, sam_grads) / (grad_sq_norm(grads) + eps)
    for v, g, gs in zip(g_v, grads, sam_grads):
        v.copy_(gs - coef * g)


def looksam_apply_(grads: Tensors, g_v: Tensors, alpha: float, eps: float = 1e-12) -> None:
    coef = alpha * grad_norm(grads) / (grad_norm(g_v) + eps)
    for g, v in zip(grads, g_v):
        g.add_(coef * v)


def mix_(grads: Tensors, others: Tensors, a: float, b: float) -> None:
    for g, o in zip(grads, others):
        g.mul_(a).add_(o, alpha=b)


def centralize_(grads: Tensors) -> None:
    """Gradient centralization as GCSAM's official code and pytorch-optimizer write it: per tensor."""
    for g in grads:
        if g.dim() > 1:
            g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True))
