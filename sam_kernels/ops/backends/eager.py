"""The eager reference as a dispatch backend: runs on every device."""
from __future__ import annotations

from typing import Optional

from ..contract import ops_of

DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")
OPS = {op.name: op.reference for op in ops_of("eager")}


def unavailable_reason() -> Optional[str]:
    return None
