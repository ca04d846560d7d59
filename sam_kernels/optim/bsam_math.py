"""bSAM's per-element work as eager multi-tensor (``torch._foreach_*``) maths, one call per list
bucketed by (device, dtype). Formulas: Moellenhoff and Khan, ICLR 2023, official code
github.com/team-approx-bayes/bayesian-sam ``optim.py`` (``build_bsam_optimizer``); see
:class:`~sam_kernels.optim.bsam.BSAM`.
"""
from __future__ import annotations

from typing import Optional

import torch


def _buckets(*lists: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], ...]]:
    """The aligned lists split by the (device, dtype) of the first list's tensors."""
    out: dict = {}
    for i, t in enumerate(lists[0]):
        out.setdefault((t.device, t.dtype), []).append(i)
    return [tuple([lst[i] for i in idx] for lst in lists) for idx in out.values()]


def draw_noise(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """z ~ N(0, 1) per element: ``torch.randn(p.shape, dtype=float32, generator=generator)`` for each
    param in order, on the generator's device, then moved and cast to the param's."""
    dev = generator.device
    return [torch.randn(p.shape, dtype=torch.float32, generator=generator, device=dev).to(p.device, p.dtype)
            for p in params]


def noise_(params: list[torch.Tensor], backups: list[torch.Tensor], s: list[torch.Tensor],
           noise: list[torch.Tensor], num_data: float) -> None:
    """backup ← w; w ← w + z / sqrt(N·s) (the official code's ``mu + sqrt(1/(Ndata*s)) * n``)."""
    for ps, bs, ss, zs in _buckets(params, backups, s, noise):
        torch._foreach_copy_(bs, ps)
        sigma = torch._foreach_reciprocal(torch._foreach_sqrt(torch._foreach_mul(ss, float(num_data))))
        torch._foreach_addcmul_(ps, zs, sigma)


def ascent_(params: list[torch.Tensor], backups: list[torch.Tensor], grads: list[torch.Tensor],
            s: list[torch.Tensor], s_next: list[torch.Tensor], *, rho: float, beta2: float, damping: float,
            weight_decay: float, perturb: bool, inv_scale: Optional[torch.Tensor] = None,
            found_inf: Optional[torch.Tensor] = None) -> None:
    """With g the noisy-sample gradient (times ``inv_scale`` when given: AMP's 1/S):

        w      ← backup + rho · g / s            (backup alone when ``perturb`` is False, or on overflow)
        s_next ← beta2 · s + (1 − beta2) · (sqrt(s)·|g| + damping + weight_decay)

    ``found_inf`` (0-dim, nonzero: this pass overflowed) leaves w at the backup, so no NaN reaches a
    forward; s_next is then never used (the step is skipped)."""
    for ps, bs, gs, ss, ns in _buckets(params, backups, grads, s, s_next):
        if inv_scale is not None:
            gs = torch._foreach_mul(gs, inv_scale.to(gs[0].device, torch.float32).to(gs[0].dtype))
        if perturb:
            e = torch._foreach_div(gs, ss)
            torch._foreach_mul_(e, float(rho))
            if found_inf is not None:
                ok = found_inf.to(ps[0].device).eq(0)
                e = [torch.where(ok, x, torch.zeros_like(x)) for x in e]
            torch._foreach_add_(e, bs)
            torch._foreach_copy_(ps, e)
        else:
            torch._foreach_copy_(ps, bs)
        spread = torch._foreach_mul(torch._foreach_sqrt(ss), torch._foreach_abs(gs))
        torch._foreach_add_(spread, float(damping) + float(weight_decay))
        torch._foreach_copy_(ns, ss)
        torch._foreach_mul_(ns, float(beta2))
        torch._foreach_add_(ns, spread, alpha=1.0 - float(beta2))


def descent_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
             s: list[torch.Tensor], s_next: list[torch.Tensor], *, lr: float, beta1: float, weight_decay: float,
             inv_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """At the restored w, with g the gradient at w + e (times ``inv_scale`` when given: AMP's 1/S):

        m ← beta1 · m + (1 − beta1) · (g + weight_decay · w);   w ← w − lr · m / s

    (w's update reads the old s; the caller then swaps the ``s`` and ``s_next`` buffers, nothing is
    copied). ``found_inf`` (0-dim, nonzero: the step overflowed) keeps m and w as they were and sets
    s_next ← s, so that the swap keeps s too: decided on the device, no host sync."""
    for ps, gs, ms, ss, ns in _buckets(params, grads, exp_avgs, s, s_next):
        if inv_scale is not None:
            gs = torch._foreach_mul(gs, inv_scale.to(gs[0].device, torch.float32).to(gs[0].dtype))
        if found_inf is None:
            torch._foreach_mul_(ms, float(beta1))
            torch._foreach_add_(ms, gs, alpha=1.0 - float(beta1))
            if weight_decay:
                torch._foreach_add_(ms, ps, alpha=(1.0 - float(beta1)) * float(weight_decay))
            torch._foreach_addcdiv_(ps, ms, ss, value=-float(lr))
            continue
        m_new = torch._foreach_mul(ms, float(beta1))
        torch._foreach_add_(m_new, gs, alpha=1.0 - float(beta1))
        if weight_decay:
            torch._foreach_add_(m_new, ps, alpha=(1.0 - float(beta1)) * float(weight_decay))
        w_new = torch._foreach_addcdiv(ps, m_new, ss, value=-float(lr))
        ok = found_inf.to(ps[0].device).eq(0)
        for w, m, sv, wn, mn, sn in zip(ps, ms, ss, w_new, m_new, ns):
            w.copy_(torch.where(ok, wn, w))
            m.copy_(torch.where(ok, mn, m))
            sn.copy_(torch.where(ok, sn, sv))
