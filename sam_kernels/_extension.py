"""Loads the compiled extension ``sam_kernels._C`` if it was built; never raises."""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (must be imported before _C: it provides the symbols _C links against)

_error: Optional[str] = None
_host: Optional[ModuleType] = None


def host_helpers() -> Optional[ModuleType]:
    """``sam_kernels._C`` when it is loaded and holds the host helpers (``scan``, ``numel_sum``:
    csrc/host.cpp; an older build has none), else None: the callers' Python fallbacks give the same
    answers. Defined before the loading below, which imports the op layer that asks for them."""
    return _host


try:
    if os.environ.get("SAM_KERNELS_DISABLE_EXTENSION") == "1":
        raise ImportError("disabled by SAM_KERNELS_DISABLE_EXTENSION=1")
    from . import _C  # importing runs the TORCH_LIBRARY registrations
    _host = _C if hasattr(_C, "scan") and hasattr(_C, "numel_sum") else None
    from .ops import fake as _fake

    _fake.register()
except ImportError as exc:
    _error = (f"the compiled extension is not importable ({exc}); build it with "
              f"`pip install --no-build-isolation -e .` (SAM_KERNELS_BUILD=cpu|cuda|none picks what is built)")


def extension_error() -> Optional[str]:
    """Why ``sam_kernels._C`` is unavailable, or None when it is loaded."""
    return _error


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.sam_kernels.<op>`` has a kernel registered for ``dispatch_key`` (CPU, CUDA)."""
    if _error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_kernels::{op}", dispatch_key)
