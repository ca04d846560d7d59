"""``cpp`` backend: the extension's CPU kernels (csrc/cpu), reached through torch.ops.sam_kernels."""
from __future__ import annotations

from typing import Optional

from ..._extension import extension_error
from .extension import ops_with_kernel

DEVICES = ("cpu",)
CHECKS_LISTS = True  # csrc/common.h check_list, before any write
OPS = ops_with_kernel("CPU", "cpp")


def unavailable_reason() -> Optional[str]:
    if extension_error() is not None:
        return extension_error()
    return None if OPS else "the extension was built without CPU kernels"
