"""Fake (meta) implementations of torch.ops.sam_kernels, so torch.compile can trace the ops.

In-place ops return nothing; reductions return a 0-dim tensor in the contract's dtype; mask ops
return new bool tensors shaped like the scores.
"""
from __future__ import annotations

import torch


def _reduction_result(tensors) -> torch.Tensor:
    dtype = torch.float64 if tensors and all(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tensors[0].new_empty((), dtype=dtype)


def _masks_like(scores) -> list[torch.Tensor]:
    return [torch.empty_like(s, dtype=torch.bool, memory_format=torch.contiguous_format) for s in scores]


def _nothing(*args, **kwargs) -> None:
    return None


def register() -> None:
    """Attach the fake kernels (idempotent per process: called once when _C is imported)."""
    lib = "sam_kernels::"
    torch.library.register_fake(lib + "grad_sq_norm")(lambda grads, params, masks, eta: _reduction_result(grads))
    torch.library.register_fake(lib + "dot")(lambda a, b: _reduction_result(a))
    torch.library.register_fake(lib + "topk_mask")(lambda scores, k: _masks_like(scores))
    torch.library.register_fake(lib + "nm_mask")(lambda scores, n, m: _masks_like(scores))
    for op in ("perturb_", "restore_", "sgd_restore_step_", "adamw_restore_step_", "renormalize_",
               "fisher_accumulate_", "looksam_store_", "looksam_apply_"):
        torch.library.register_fake(lib + op)(_nothing)
