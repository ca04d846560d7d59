"""The descent of a SAM step: restore w from its backup, then the base optimizer's update.

For ``torch.optim.SGD`` and ``torch.optim.AdamW`` both happen in one fused op per group
(``ops.sgd_restore_step_`` / ``ops.adamw_restore_step_``), writing the base optimizer's own state
entries (SGD ``momentum_buffer``; AdamW ``step``, ``exp_avg``, ``exp_avg_sq``) exactly as torch
lays them out, so its ``state_dict`` is the same as a plain torch run and either path can take
over mid-run. Every other optimizer: ``ops.restore_`` then ``base_optimizer.step()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops

_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "maximize")


def fused_kind(base: torch.optim.Optimizer) -> Optional[str]:
    """'sgd' / 'adamw' when the fused restore+update reproduces ``base.step()``, else None."""
    groups = base.param_groups
    if any(isinstance(g.get("lr"), torch.Tensor) or g.get("differentiable") for g in groups):
        return None
    if type(base) is torch.optim.SGD:
        return "sgd"
    # fused/capturable AdamW keep `step` on the device: reading it would sync, so they stay generic.
    if type(base) is torch.optim.AdamW and not any(g.get("amsgrad") or g.get("capturable") or g.get("fused")
                                                   for g in groups):
        return "adamw"
    return None


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives its ``step`` tensors (``optimizer._get_scalar_dtype``, private)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _by_hyperparams(entries, keys):
    """Group (group, param, backup, grad) entries by the hyperparameters that reach the kernel."""
    buckets: dict = {}
    last_group, bucket = None, []
    for entry in entries:  # entries come in group order: one key per param group, not per param
        if entry[0] is not last_group:
            last_group = entry[0]
            bucket = buckets.setdefault(tuple(last_group[k] for k in keys), [])
        bucket.append(entry)
    return buckets.values()


def _sgd(base: torch.optim.SGD, entries, backend) -> None:
    for bucket in _by_hyperparams(entries, _SGD_KEYS):
        group = bucket[0][0]
        _, params, backups, grads = map(list, zip(*bucket))
        momentum = group["momentum"]
        states = [base.state[p] for p in params] if momentum else None
        old = [st.get("momentum_buffer") for st in states] if momentum else None
        bufs = ops.sgd_restore_step_(params, backups, grads, old, lr=group["lr"], momentum=momentum,
                                     dampening=group["dampening"], weight_decay=group["weight_decay"],
                                     nesterov=group["nesterov"], maximize=group["maximize"], backend=backend)
        if momentum:
            for st, before, buf in zip(states, old, bufs):
                if buf is not before:  # a new buffer (first step of this param); the others were updated in place
                    st["momentum_buffer"] = buf


def _adamw(base: torch.optim.AdamW, entries, backend) -> None:
    states = [base.state[p] for _, p, _, _ in entries]
    for (_, p, _, _), st in zip(entries, states):
        if len(st) == 0:  # the layout torch.optim.AdamW creates on its first step
            st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    # The steps are CPU tensors (torch's layout for non-capturable AdamW): reading them is no device sync.
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    counts = torch.stack(steps).tolist() if len({s.dtype for s in steps}) == 1 else [s.item() for s in steps]
    step_of = {id(e[1]): (int(c), st) for e, c, st in zip(entries, counts, states)}
    # One launch per (hyperparameters, step count): usually one for the whole model.
    for bucket in _by_hyperparams(entries, _ADAMW_KEYS):
        by_step: dict = {}
        for e in bucket:
            step, st = step_of[id(e[1])]
            by_step.setdefault(step, []).append((*e, st))
        for step, items in by_step.items():
            group = items[0][0]
            _, params, backups, grads, sts = map(list, zip(*items))
            beta1, beta2 = group["betas"]
            ops.adamw_restore_step_(params, backups, grads, [st["exp_avg"] for st in sts],
                                    [st["exp_avg_sq"] for st in sts], step, lr=group["lr"], beta1=beta1,
                                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                    maximize=group["maximize"], backend=backend)


def restore_and_step(sam, perturbed: list[torch.Tensor], backup_of: dict[int, torch.Tensor],
                     backend: Optional[str]) -> None:
    """Restore every perturbed param from its backup (``backup_of[id(p)]``, in ``perturbed`` order)
    and take the base step, fused when possible. The caller has rejected sparse gradients."""
    base = sam.base_optimizer
    kind = fused_kind(base)
    if kind is None:
        if perturbed:
            ops.restore_(perturbed, list(backup_of.values()), backend=backend)
        base.step()
        return
    entries, restore_only = [], []
    for group in base.param_groups:
        for p in group["params"]:
            b = backup_of.get(id(p))
            g = p.grad
            if g is None:
                if b is not None:
                    restore_only.append((p, b))
                continue
            # A param that was not perturbed is its own backup: the fused op then just updates it.
            entries.append((group, p, p if b is None else b, g))
    if restore_only:
        ops.restore_([p for p, _ in restore_only], [b for _, b in restore_only], backend=backend)
    if entries:
        (_sgd if kind == "sgd" else _adamw)(base, entries, backend)
