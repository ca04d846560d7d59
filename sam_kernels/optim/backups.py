"""The backups of perturbed weights: w kept in ``state[p]["backup"]`` from ``first_step`` to the
restore, so an error or a ``restore()`` gives w back bitwise (ours)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..ops.lists import none_at
from . import aliases


def get(state: dict, params: list[torch.Tensor], key: str = "backup") -> list[torch.Tensor]:
    """The backup buffer of each param (``state[p][key]``), created on first use. Their layouts are not compared with the
    params' here (three attribute pairs per param, every step): ``perturb_`` checks them and rejects a
    mismatch before writing, and the caller then renews the stale ones (:func:`renew_stale`)."""
    out = [state[p].get(key) for p in params]
    for i in none_at(out):  # the first step of these params
        out[i] = state[params[i]][key] = torch.empty_like(params[i], memory_format=torch.preserve_format)
    return out


def renew_stale(state: dict, params: list[torch.Tensor], backups: list[torch.Tensor], idx: list[int],
                key: str = "backup") -> bool:
    """Replace (in ``backups`` and ``state``) the backups of ``params[idx]`` whose shape, dtype or device
    no longer match their param (it was resized, cast or moved); whether any did."""
    renewed = False
    for i in idx:
        p, b = params[i], backups[i]
        if b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            backups[i] = state[p][key] = torch.empty_like(p, memory_format=torch.preserve_format)
            renewed = True
    return renewed


def relayout(optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
    """Give every state tensor of ``optimizers`` the memory layout of its param, so that the next step
    runs fused (the kernels need one layout per tensor across the lists)."""
    for opt in optimizers:
        for p, st in opt.state.items():
            if not (isinstance(p, torch.Tensor) and isinstance(st, dict)):  # a hook's own entry
                continue
            for k, t in st.items():
                if isinstance(t, torch.Tensor) and t.shape == p.shape and t.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=t.dtype, device=t.device).copy_(t)


def copy_back(params: list[torch.Tensor], backups: list[torch.Tensor], backend: Optional[str],
              alias_keys: Optional[dict] = None) -> None:
    """params ← backups: the fused restore, or a per-tensor copy when a param changed dtype or device
    since its backup was taken (``model.double()`` mid-step), so an error never leaves w + e.

    ``alias_keys`` (:func:`.aliases.find`): aliased params are restored one layer at a time, the last
    layer first, so the memory ends at the first layer's backup, w (see :mod:`.aliases`)."""
    for idx in reversed(aliases.split(list(range(len(params))), aliases.layers(params, alias_keys or {}))):
        ps, bs = [params[i] for i in idx], [backups[i] for i in idx]
        try:
            ops.restore_(ps, bs, backend=backend)
        except (TypeError, ValueError):  # rejected before writing anything
            for p, b in zip(ps, bs):
                p.copy_(b)
