"""``cuda`` backend: the extension's CUDA kernels (csrc/cuda), reached through torch.ops.sam_kernels."""
from __future__ import annotations

from typing import Optional

import torch

from ..._extension import extension_error
from .extension import ops_with_kernel

DEVICES = ("cuda",)
CHECKS_LISTS = True  # csrc/common.h check_list, before any write
OPS = ops_with_kernel("CUDA", "cuda")


def unavailable_reason() -> Optional[str]:
    if extension_error() is not None:
        return extension_error()
    if not OPS:
        return ("the extension was built without CUDA kernels (needs nvcc/CUDA_HOME and a CUDA build of torch at "
                "build time; SAM_KERNELS_BUILD=cuda forces it)")
    if not torch.cuda.is_available():
        return "CUDA kernels are built but no CUDA device is visible"
    return None
