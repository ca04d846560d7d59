"""The eager reference as a dispatch backend: runs on every device."""
from __future__ import annotations

from typing import Optional

from . import reference

DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")
OPS = {name: getattr(reference, name) for name in (
    "grad_sq_norm", "dot", "perturb_", "restore_", "sgd_restore_step_", "adamw_restore_step_",
    "renormalize_", "fisher_accumulate_", "looksam_store_", "looksam_apply_", "topk_mask", "nm_mask",
)}


def unavailable_reason() -> Optional[str]:
    return None
