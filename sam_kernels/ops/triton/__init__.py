"""``triton`` backend: multi-tensor Triton kernels, one module per op family.

- ``_tables``: pointer tables (cached per parameter set), the launcher, device-side helpers;
- ``norm``: grad_sq_norm, dot (deterministic two-pass reductions);
- ``perturb``: perturb_, restore_;
- ``optimizer_steps``: sgd_restore_step_, adamw_restore_step_ (restore fused with the base step);
- ``variants``: renormalize_, fisher_accumulate_, looksam_store_, looksam_apply_;
- ``masks``: topk_mask, nm_mask.

Runs natively on CUDA tensors. With ``TRITON_INTERPRET=1`` set before this package is imported,
the kernels run in Triton's interpreter on CPU tensors only (how CI tests them): the interpreter
copies each kernel *argument* to host memory, but these kernels reach their tensors through
pointer tables, so a CUDA address in a table would be dereferenced on the host.
"""
import functools
import os
from typing import Callable, Optional

import torch

try:
    from . import masks, norm, optimizer_steps, perturb, variants
except ImportError as exc:  # triton missing (or too old): the backend reports why
    _IMPORT_ERROR: Optional[str] = f"triton not installed ({exc})"
    OPS: dict = {}
else:
    _IMPORT_ERROR = None
    OPS = {
        "grad_sq_norm": norm.grad_sq_norm,
        "dot": norm.dot,
        "perturb_": perturb.perturb_,
        "restore_": perturb.restore_,
        "sgd_restore_step_": optimizer_steps.sgd_restore_step_,
        "adamw_restore_step_": optimizer_steps.adamw_restore_step_,
        "renormalize_": variants.renormalize_,
        "fisher_accumulate_": variants.fisher_accumulate_,
        "looksam_store_": variants.looksam_store_,
        "looksam_apply_": variants.looksam_apply_,
        "topk_mask": masks.topk_mask,
        "nm_mask": masks.nm_mask,
    }

# Triton writes through raw pointers, which autograd cannot see: bump the version counters of the
# lists each op writes, by position (the compiled ops do it in the dispatcher: csrc/sam_kernels.cpp).
WRITES = {"perturb_": (0, 2), "restore_": (0,), "sgd_restore_step_": (0, 3), "adamw_restore_step_": (0, 3, 4),
          "renormalize_": (0,), "fisher_accumulate_": (0,), "looksam_store_": (0,), "looksam_apply_": (0,)}


def _bumping(fn: Callable, positions: tuple[int, ...]) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        written = [t for i in positions if args[i] is not None for t in args[i] if not t.is_inference()]
        if written:
            torch.autograd.graph.increment_version(written)
        return out
    return run


OPS = {name: _bumping(fn, WRITES[name]) if name in WRITES else fn for name, fn in OPS.items()}

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Read once, like Triton itself does when the kernels are defined (at import)."""
DEVICES: tuple[str, ...] = ("cpu",) if INTERPRET else ("cuda",)


def unavailable_reason() -> Optional[str]:
    """None when the kernels can run here, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device and TRITON_INTERPRET is not set"
    return None
