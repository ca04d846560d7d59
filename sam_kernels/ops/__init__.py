"""``sam_kernels.ops``: the fused per-parameter work of a SAM step, one contract per op.

Each op takes lists of tensors, groups them by (device, dtype, layout agreement) and runs the
backend chosen by :mod:`sam_kernels.ops.dispatch` (see ``backends()``); ``last_call`` /
``recording()`` tell which backend ran which part; ``reference`` holds the eager spec.
"""
from . import api, reference
from .dispatch import backends, get_backend, last_call, last_used, recording, set_backend
from .dtensor import accepts_dtensor

# DTensor arguments (FSDP2) run on their local shards with global reductions (see ops/dtensor.py).
(adamw_restore_step_, dot, fisher_accumulate_, grad_sq_norm, looksam_apply_, looksam_store_, nm_mask, perturb_,
 renormalize_, restore_, sgd_restore_step_, topk_mask) = map(accepts_dtensor, (
    api.adamw_restore_step_, api.dot, api.fisher_accumulate_, api.grad_sq_norm, api.looksam_apply_,
    api.looksam_store_, api.nm_mask, api.perturb_, api.renormalize_, api.restore_, api.sgd_restore_step_,
    api.topk_mask))

__all__ = [
    "grad_sq_norm", "dot", "perturb_", "restore_", "sgd_restore_step_", "adamw_restore_step_", "renormalize_",
    "fisher_accumulate_", "looksam_store_", "looksam_apply_", "topk_mask", "nm_mask",
    "backends", "set_backend", "get_backend", "last_call", "last_used", "recording", "reference",
]
