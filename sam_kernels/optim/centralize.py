"""Gradient centralization of the ascent gradient (GCSAM).

Sources: Hassan, Vakanski, Zhang, Xian, "GCSAM: Gradient Centralized Sharpness Aware Minimization",
arXiv 2501.11584 (2025), eq. of the perturbation e = rho·Φ(g)/‖Φ(g)‖; the operator Φ is gradient
centralization (Yong et al., "Gradient Centralization", ECCV 2020): for every tensor with more
than one dimension, subtract its mean over all dimensions but the first (per output row / filter);
tensors of one dimension (biases, norm scales) are left as they are.
"""
from __future__ import annotations

import torch

from ..ops.dtensor import is_dtensor
from .descent import Modifier


def centralize_(grads: list[torch.Tensor]) -> None:
    """g ← g − mean(g over dims 1..) for each tensor of ``grads`` with ``g.dim() > 1``, in place.

    DTensors (FSDP2) are centralized on their local shards: with the default ``Shard(0)`` each
    row's mean is local. Raises ``ValueError`` (before changing any gradient) for a DTensor sharded
    along another dimension, whose rows are split across ranks."""
    if any(is_dtensor(g) and g.dim() > 1 and any(getattr(pl, "dim", 0) != 0 for pl in g.placements if pl.is_shard())
           for g in grads):
        raise ValueError("use_gc: gradient centralization needs each row of a weight on one rank; a gradient is "
                         "sharded along a dimension other than 0 (FSDP2's default Shard(0) works)")
    for g in grads:
        if g.dim() > 1:
            t = g.to_local() if is_dtensor(g) else g
            t.sub_(t.mean(dim=tuple(range(1, t.dim())), keepdim=True))


class CentralizeAscent(Modifier):
    """GCSAM: the first-pass gradients are centralized (:func:`centralize_`) in place before the
    ascent reads them, so e = rho·Φ(g)/(‖Φ(g)‖ + eps) (ASAM: T²·Φ(g)/‖T·Φ(g)‖) with the norm of the
    centralized gradient, as the paper's equation; pytorch-optimizer's ``SAM(use_gc=True)`` divides by
    the norm of the raw gradient instead (‖e‖ < rho there). Descent modifiers that keep g(w)
    (LookSAM, GSAM, WSAM) and telemetry see Φ(g). The descent gradient g(w + e) is not centralized.

    Cost: one read for the means and one read + write per first pass (eager, one pair of ops per
    tensor of more than one dimension). ``SAM(..., use_gc=True)`` adds this modifier.
    """

    def before_ascent(self, sam, params, grads):
        centralize_(grads)
