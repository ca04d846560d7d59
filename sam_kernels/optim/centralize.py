"""Gradient centralization of the ascent gradient (GCSAM).

Sources: Hassan, Vakanski, Zhang, Xian, "GCSAM: Gradient Centralized Sharpness Aware Minimization",
arXiv 2501.11584 (2025), eq. of the perturbation e = rho·Φ(g)/‖Φ(g)‖; the operator Φ is gradient
centralization (Yong et al., "Gradient Centralization", ECCV 2020): for every tensor with more
than one dimension, subtract its mean over all dimensions but the first (per output row / filter);
tensors of one dimension (biases, norm scales) are left as they are. The work is the op
:func:`sam_kernels.ops.centralize_` (one multi-tensor kernel per group on every backend).
"""
from __future__ import annotations

from .. import ops
from .descent import Modifier


class CentralizeAscent(Modifier):
    """GCSAM: the first-pass gradients are centralized (:func:`sam_kernels.ops.centralize_`) in place
    before the ascent reads them, so e = rho·Φ(g)/(‖Φ(g)‖ + eps) (ASAM: T²·Φ(g)/‖T·Φ(g)‖) with the norm
    of the centralized gradient, as the paper's equation; pytorch-optimizer's ``SAM(use_gc=True)``
    divides by the norm of the raw gradient instead (‖e‖ < rho there). Descent modifiers that keep
    g(w) (LookSAM, GSAM, WSAM) and telemetry see Φ(g). The descent gradient g(w + e) is not centralized.

    DTensors (FSDP2): centralized on their local shards, which needs each row whole on one rank
    (FSDP2's default ``Shard(0)``); a gradient sharded along another dimension raises ``ValueError``
    before any gradient or weight changes.

    Cost: one fused pass per first step on the compiled backends (:func:`sam_kernels.ops.centralize_`):
    each row is read for its mean and then read again and rewritten, the second read from cache, so
    2 units of the element size per element of the tensors of more than one dimension move to and
    from memory (3 for rows larger than the cache). The ascent norm ‖Φ(g)‖² is then one more read
    (not yet taken in the centralization's write pass). ``SAM(..., use_gc=True)`` adds this modifier.
    """

    def before_ascent(self, sam, params, grads):
        ops.centralize_(grads, backend=sam.backend)
