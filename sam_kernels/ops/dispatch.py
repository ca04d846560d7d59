"""Backend registry and selection: one op name, several implementations behind it.

A backend is a module exposing ``OPS`` (op name -> group-level function with the signature of
the same function in ``reference.py``), ``DEVICES`` (device types it runs on) and
``unavailable_reason() -> str | None``; ``CHECKS_LISTS = True`` where its functions check the
lists completely (lengths, shapes, one device and dtype, dense, contiguous) and reject a call
before writing anything, so the Python layer may hand it whole lists unchecked. Backends are imported lazily, the first time they are
asked for, so a missing toolchain never breaks ``import sam_kernels``.

Resolution order for one call: the ``backend=`` argument, then :func:`set_backend`, then the
``SAM_KERNELS_BACKEND`` environment variable, then ``"auto"``. ``auto`` tries the device's
preference list (CUDA tensors: cuda -> triton -> eager; CPU tensors: cpp -> eager) and silently
falls back; an explicit name that cannot serve the call raises with the reason.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Optional

BACKEND_MODULES = {
    "eager": "sam_kernels.ops.reference_backend",
    "cpp": "sam_kernels.ops.cpp",
    "cuda": "sam_kernels.ops.cuda",
    "triton": "sam_kernels.ops.triton",
}
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "eager"),
    "cpu": ("cpp", "eager"),
}
BACKEND_NAMES = tuple(BACKEND_MODULES)

_global_backend: Optional[str] = None
_modules: dict[str, ModuleType] = {}
_import_errors: dict[str, str] = {}
last_used: dict[str, str] = {}
"""op name -> name of the backend that ran it last (for benchmarks and bug reports)."""


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every later op call (``None`` or ``"auto"``: automatic choice)."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend requested globally: :func:`set_backend`, else ``SAM_KERNELS_BACKEND``, else ``"auto"``."""
    if _global_backend is not None:
        return _global_backend
    return _check_name(os.environ.get("SAM_KERNELS_BACKEND", "auto") or "auto")


def _load(name: str) -> Optional[ModuleType]:
    if name in _modules:
        return _modules[name]
    if name in _import_errors:
        return None
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except Exception as exc:  # a broken optional backend must not break the package
        _import_errors[name] = f"import failed: {type(exc).__name__}: {exc}"
        return None
    reason = module.unavailable_reason()
    if reason is not None:
        _import_errors[name] = reason
        return None
    _modules[name] = module
    return module


def backends() -> dict[str, dict]:
    """Every backend with ``available``, the device types it serves, its ops and, if missing, why."""
    out = {}
    for name in BACKEND_NAMES:
        module = _load(name)
        out[name] = {
            "available": module is not None,
            "devices": list(module.DEVICES) if module else [],
            "ops": sorted(module.OPS) if module else [],
            "reason": None if module else _import_errors.get(name),
        }
    return out


def checks_lists(name: str) -> bool:
    """Whether backend ``name`` checks its tensor lists itself (see the module docstring)."""
    return bool(getattr(_modules.get(name), "CHECKS_LISTS", False))


def _serves(module: Optional[ModuleType], op: str, device_type: str) -> bool:
    return module is not None and device_type in module.DEVICES and op in module.OPS


def resolve(op: str, device_type: str, backend: Optional[str] = None, contiguous: bool = True) -> tuple[str, Callable]:
    """(backend name, group-level function) for ``op`` on ``device_type`` tensors.

    Non-contiguous groups always run eagerly: kernels index flat storage.
    """
    requested = _check_name(backend) if backend is not None else get_backend()
    if requested == "auto" or not contiguous:
        order = AUTO_ORDER.get(device_type, ("eager",)) if contiguous else ("eager",)
        for name in order:
            module = _load(name)
            if _serves(module, op, device_type):
                return name, module.OPS[op]
        raise RuntimeError(f"no backend serves {op} on {device_type}")  # eager always does
    module = _load(requested)
    if not _serves(module, op, device_type):
        if module is None:
            why = _import_errors.get(requested, "not available")
        elif device_type not in module.DEVICES:
            why = f"it runs on {list(module.DEVICES)}, not {device_type}"
        else:
            why = f"it does not implement {op}"
        raise RuntimeError(f"backend {requested!r} cannot run {op} on {device_type} tensors: {why}. "
                           f"Use backend='auto' (or set_backend(None)) to fall back automatically.")
    return requested, module.OPS[op]
