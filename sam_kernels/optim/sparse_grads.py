"""Sparse gradients (``nn.Embedding(sparse=True)``): the SAM step on an eager path (ours).

The step is defined on the stored values: a sparse gradient is coalesced first (duplicate indices
summed, as autograd leaves them for repeated tokens), its values join the global norm
‖g‖² = Σ dense g² + Σ stored v² (ASAM: (T ⊙ v)² with T = |w| + eta read at the stored indices;
masks: m ⊙ v), and e = rho·(m ⊙ T² ⊙ v)/(‖g‖ + eps) is added at the stored indices only: every
other element of the weight stays bitwise unchanged. The backup is the whole weight (a restore is
bitwise whatever the indices). The descent then runs the base optimizer's own ``step()``, which
takes the sparse gradient as torch defines it.

Supported around the base optimizers that take sparse gradients: ``torch.optim.SGD`` (with or
without momentum), ``Adagrad`` and ``SparseAdam``; with SAM, ASAM, SS-SAM, AE-SAM, Sparse SAM and
ESAM (per-tensor selection). Everything that reads gradients through the fused ops is refused with a
``TypeError`` before any weight changes: descent modifiers (Stable SAM, LookSAM), element-wise
SWP (``ESAM(swp="element")``), telemetry's cosine (``telemetry=True``), AMP (``grad_scaler``) and
``torch.compile``. Telemetry's default ``"norms"`` works: ‖g(w)‖ and ‖g(w + e)‖ count the stored
values as the ascent norm does, ‖e‖ is what was added at the stored indices.
"""
from __future__ import annotations

from typing import Optional

import torch

_TAKE_SPARSE = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.SparseAdam)
_HINT = "use dense gradients (e.g. nn.Embedding(sparse=False))"


def any_sparse(param_groups: list[dict]) -> bool:
    """Whether any param of ``param_groups`` holds a sparse gradient now."""
    return any(g is not None and g.is_sparse for g in [p.grad for group in param_groups for p in group["params"]])


def refuse_unsupported(opt, options: Optional[dict] = None) -> None:
    """``TypeError`` when ``opt`` cannot take the sparse gradients it holds (checked before any write)."""
    owner = type(opt).__name__
    base = opt.base_optimizer
    if type(base) not in _TAKE_SPARSE:
        raise TypeError(f"{owner}: a parameter has a sparse gradient but the base optimizer "
                        f"{type(base).__name__} does not take sparse gradients (torch.optim.SGD, Adagrad and "
                        f"SparseAdam do); {_HINT}")
    if type(base) is torch.optim.SGD and any(g["weight_decay"] for g in opt.param_groups):
        raise TypeError(f"{owner}: a parameter has a sparse gradient, and torch.optim.SGD does not take sparse "
                        f"gradients with weight_decay != 0; set weight_decay=0 for that group or {_HINT}")
    why = None
    if getattr(opt, "mask_kind", None) in ("fisher", "dynamic"):
        why = f"SparseSAM's {opt.mask_kind} mask (it scores dense gradients)"
    elif opt.modifiers:
        why = f"descent modifiers ({', '.join(type(m).__name__ for m in opt.modifiers)})"
    elif opt.amp.active:
        why = "AMP (grad_scaler)"
    elif opt.telemetry.cosine:
        why = "telemetry=True (the cosine of g(w) and g(w + e); telemetry=\"norms\", the default, works)"
    elif torch.compiler.is_compiling():
        why = "torch.compile"
    elif options and options.get("keep_prob") is not None:
        why = "element-wise stochastic weight perturbation (ESAM swp='element')"
    if why is not None:
        raise TypeError(f"{owner}: sparse gradients are supported by the eager SAM step only, not with {why}; "
                        f"{_HINT}")


def refuse_multi_step(opt) -> None:
    """``TypeError`` for a multi-step ascent (``ascent_steps > 1``) over sparse gradients, before any write."""
    raise TypeError(f"{type(opt).__name__}: ascent_steps > 1 with sparse gradients is not supported; "
                    "use ascent_steps=1 or dense gradients")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _weighted(p: torch.Tensor, g: torch.Tensor, eta: Optional[float], mask: Optional[torch.Tensor]):
    """(indices, v, T) of the coalesced ``g``: the stored values (m ⊙ v with a mask) in the compute
    dtype, and T = |w| + eta at the stored indices (None without ASAM)."""
    g = g.coalesce()
    at = tuple(g.indices())
    v = g.values().to(_compute_dtype(p))
    if mask is not None:
        v = v * mask[at]
    t = None if eta is None else p[at].to(v.dtype).abs() + eta
    return at, v, t


def sq_norm(p: torch.Tensor, g: torch.Tensor, eta: Optional[float], mask: Optional[torch.Tensor] = None,
            weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """‖m ⊙ T ⊙ v‖² over the stored values of one sparse gradient (0-dim, compute dtype); ``weight``:
    the w of T (default ``p``)."""
    at, v, t = _weighted(p if weight is None else weight, g, eta, mask)
    return (v if t is None else t * v).square().sum()


def perturb_(p: torch.Tensor, g: torch.Tensor, backup: torch.Tensor, sq: torch.Tensor, rho: float,
             eta: Optional[float], mask: Optional[torch.Tensor], eps: float = 1e-12,
             perturbation_sq: Optional[torch.Tensor] = None) -> None:
    """backup ← p; p += rho·(m ⊙ T² ⊙ v)/(sqrt(sq) + eps) at the stored indices of ``g``; a non-finite
    ``sq`` leaves ``p`` bitwise unchanged (as ``ops.perturb_``). ``perturbation_sq`` (0-dim): gets
    ‖e‖² as applied added, the written weights minus w (as ``ops.perturb_``'s argument of that name)."""
    backup.copy_(p)
    at, v, t = _weighted(p, g, eta, mask)
    cdt = v.dtype
    scale = rho / (sq.to(cdt).sqrt() + eps)
    finite = (torch.isfinite(scale) & torch.isfinite(sq)).to(p.device)
    e = v * scale.to(p.device) if t is None else t * t * v * scale.to(p.device)
    w = p[at]
    keep = finite if mask is None else finite & mask[at]
    new = torch.where(keep, (w.to(cdt) + e).to(p.dtype), w)
    if perturbation_sq is not None:
        applied = (new.to(cdt) - w.to(cdt)).square().sum()
        perturbation_sq.add_(applied.to(device=perturbation_sq.device, dtype=perturbation_sq.dtype))
    p.index_put_(at, new)
