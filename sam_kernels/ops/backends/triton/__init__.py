"""``triton`` backend: multi-tensor Triton kernels, one module per op family.

- ``_tables``: pointer tables (cached per parameter set), the launcher, device-side helpers;
- ``norm``: grad_sq_norm, dot (deterministic two-pass reductions);
- ``perturb``: perturb_, restore_;
- ``optimizer_steps``: sgd_restore_step_, adamw_restore_step_ (restore fused with the base step);
- ``variants``: renormalize_, fisher_accumulate_, looksam_store_, looksam_apply_, mix_, ema_update_,
  centralize_;
- ``masks``: topk_mask, nm_mask;
- ``bsam``: bsam_noise_, bsam_ascent_, bsam_descent_.

Runs natively on CUDA tensors. With ``TRITON_INTERPRET=1`` set before this package is imported,
the kernels run in Triton's interpreter on CPU tensors only (how CI tests them): the interpreter
copies each kernel *argument* to host memory, but these kernels reach their tensors through
pointer tables, so a CUDA address in a table would be dereferenced on the host.
"""
import functools
import inspect
import os
from typing import Callable, Optional

import torch

from ...contract import OpInfo, ops_of

try:
    from . import bsam, masks, norm, optimizer_steps, perturb, variants
except ImportError as exc:  # triton missing (or too old): the backend reports why
    _IMPORT_ERROR: Optional[str] = f"triton not installed ({exc})"
    _FAMILIES: tuple = ()
else:
    _IMPORT_ERROR = None
    _FAMILIES = (norm, perturb, optimizer_steps, variants, masks, bsam)


def _bumping(op: OpInfo, fn: Callable) -> Callable:
    """``fn`` followed by a version bump of every tensor it was handed in an argument the op writes.

    Triton writes through raw pointers, which autograd cannot see (the compiled ops bump the same
    arguments in the dispatcher: csrc/sam_kernels.cpp)."""
    if not op.writes:
        return fn
    names = list(inspect.signature(op.reference).parameters)
    written = [(names.index(name), name) for name in op.writes]

    @functools.wraps(fn)
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        tensors = []
        for i, name in written:
            value = args[i] if i < len(args) else kwargs.get(name)
            for t in (value if isinstance(value, (list, tuple)) else (value,)):
                if isinstance(t, torch.Tensor) and not t.is_inference():
                    tensors.append(t)
        if tensors:
            torch.autograd.graph.increment_version(tensors)
        return out
    return run


def _kernel(name: str) -> Callable:
    found = [getattr(m, name) for m in _FAMILIES if hasattr(m, name)]
    if len(found) != 1:
        raise LookupError(f"the op table lists a triton kernel for {name}; {len(found)} modules define one")
    return found[0]


OPS = {op.name: _bumping(op, _kernel(op.name)) for op in ops_of("triton")} if _FAMILIES else {}

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
