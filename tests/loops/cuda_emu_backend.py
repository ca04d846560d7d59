"""The ``cuda_emu`` dispatch backend: the CUDA kernels (csrc/cuda, compiled for the CPU by
tests/cuda_emu/build.py) behind the optimizers, on CPU tensors.

The same group-level wrappers as the ``cuda`` backend (generated from the op table by
``backends.extension``), over ``torch.ops.sam_kernels_emu`` instead of ``torch.ops.sam_kernels``:
the optimizer layer runs the unmodified CUDA kernels. Registered by the ``cuda_emu_backend``
fixture (tests/loops/conftest.py) once the emulation library is loaded.
"""
from __future__ import annotations

from typing import Optional

import torch

from sam_kernels.ops.backends.extension import wrapper
from sam_kernels.ops.contract import ops_of

NAME = "cuda_emu"
NAMESPACE = "sam_kernels_emu"
DEVICES = ("cpu",)
CHECKS_LISTS = True  # the CUDA ops check their lists before any write (csrc/common.h), as the cuda backend


def _has_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", "CPU")


OPS = {op.name: wrapper(op.name, NAMESPACE) for op in ops_of("cuda") if _has_kernel(op.name)}


def unavailable_reason() -> Optional[str]:
    return None if OPS else "the CUDA emulation library is not loaded (tests/cuda_emu/build.py)"
