"""``triton`` backend: multi-tensor Triton kernels (one module per op family).

Runs natively on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before this
package is imported), which is how CI tests it.
"""
from __future__ import annotations

from typing import Optional

DEVICES: tuple[str, ...] = ()
OPS: dict = {}


def unavailable_reason() -> Optional[str]:
    return "the Triton kernels are not written yet"
