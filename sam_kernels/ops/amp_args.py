"""AMP arguments of the ops (``torch.amp.GradScaler``'s loss scale and overflow flag)."""
from __future__ import annotations

from typing import Optional

import torch


def amp_sq_norm(sq_norm: torch.Tensor, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                eps: float) -> torch.Tensor:
    """The squared norm that makes perturb_'s kernels unscale by ``grad_scale`` and skip on ``found_inf``.

    s = 1/(sqrt(q) + eps) must equal 1/(sqrt(sq_norm) + eps·S): q = (sqrt(sq_norm) + eps·(S − 1))²;
    q = inf when ``found_inf`` is non-zero (a non-finite norm leaves every weight unchanged).
    """
    q = sq_norm
    if grad_scale is not None:
        s = grad_scale.to(device=sq_norm.device, dtype=sq_norm.dtype)
        q = (sq_norm.sqrt() + eps * (s - 1)).square()
    if found_inf is not None:
        q = torch.where(found_inf.to(sq_norm.device).ne(0), torch.full_like(q, float("inf")), q)
    return q


def amp_args(grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> dict:
    """The AMP keyword arguments of the fused descents; none at all without AMP (every backend's signature)."""
    out = {}
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            if not (isinstance(t, torch.Tensor) and t.numel() == 1):
                raise TypeError(f"{name} must be a 1-element tensor, got {t!r}")
            out[name] = t.reshape(()).float()
    return out


def on_device(scalars: dict, device: torch.device) -> dict:
    """Device scalars moved to a group's device (no copy when already there)."""
    return {k: v.to(device) for k, v in scalars.items()}
