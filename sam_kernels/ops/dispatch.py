"""Backend registry and selection: one op name, several implementations behind it.

A backend is a module of :mod:`.backends` exposing ``OPS`` (op name -> group-level function with
the signature of the same function in ``reference.py``; the ops the table :mod:`.contract` lists
for it), ``DEVICES`` (device types it runs on) and ``unavailable_reason() -> str | None``;
``CHECKS_LISTS = True`` where its functions check the lists completely (lengths, shapes, one
device and dtype, one memory order per entry) and reject a call before writing anything, so the
Python layer may hand it whole lists unchecked. Backends are
imported lazily, the first time they are asked for, so a missing toolchain never breaks
``import sam_kernels``.

Resolution order for one call: the ``backend=`` argument, then :func:`set_backend`, then the
``SAM_KERNELS_BACKEND`` environment variable, then ``"auto"``. ``auto`` tries the device's
preference list (CUDA tensors: cuda -> triton -> eager; CPU tensors: cpp -> eager) and falls
back; an explicit name that cannot serve the call raises with the reason.

Every op call leaves a :class:`Record` (which backend ran which part, with element counts) in
:data:`last_call`; :func:`recording` collects the records of every call in a block (the
optimizer's per-step summary). Elements of CUDA tensors that run eagerly although the caller did
not ask for eager warn once per process.

:func:`register_backend` adds a backend module outside the package under a new name (an
implementation of the ops to check through the optimizers, e.g. kernels built for another
device); it is then selected by name like the built-in ones, never by ``auto``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch

from .contract import BACKENDS

BACKEND_MODULES = {name: f"sam_kernels.ops.backends.{name}" for name in BACKENDS}
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "eager"),
    "cpu": ("cpp", "eager"),
}
BACKEND_NAMES = tuple(BACKEND_MODULES)

_global_backend: Optional[str] = None
_modules: dict[str, ModuleType] = {}
_import_errors: dict[str, str] = {}


@dataclass(frozen=True)
class Part:
    """One backend call inside an op call: ``tensors`` entries of the first list handed to ``backend``
    (zero-size ones included when the whole call went to a compiled backend, which skips them),
    ``elements`` their elements (complex entries count real and imaginary parts), on ``device`` (a
    device type) in ``dtype``. ``fallback`` says why a part ran eagerly although the
    caller did not ask for eager: ``"layout"`` (its tensors' lists do not share one dense memory
    order: see ``api``) or ``"unavailable"`` (no compiled backend serves the device); else ""."""
    backend: str
    device: str
    dtype: str
    tensors: int
    elements: int
    fallback: str = ""


@dataclass(frozen=True)
class Record:
    """What one op call ran: its parts in launch order; ``extra_lists``: tensor lists the call read
    or wrote beyond the op's own (telemetry: the descents' ``ascent_grads``, perturb_'s
    ``grad_copies``)."""
    op: str
    parts: tuple[Part, ...]
    extra_lists: int = 0

    def elements(self, backend: Optional[str] = None) -> int:
        """Elements run by ``backend`` (all parts when None)."""
        return sum(p.elements for p in self.parts if backend is None or p.backend == backend)

    @property
    def fused_elements(self) -> int:
        """Elements run by a compiled backend (anything but eager)."""
        return sum(p.elements for p in self.parts if p.backend != "eager")

    @property
    def fallback_elements(self) -> int:
        """Elements that ran eagerly although the caller did not ask for eager."""
        return sum(p.elements for p in self.parts if p.fallback)


last_call: dict[str, Record] = {}
"""op name -> :class:`Record` of its last eager call (a call inside a ``torch.compile`` graph is
recorded in the :func:`recording` blocks only: a graph that stored an op under a new name here would
be specialized on this dict's size, and compiled again once the next op is first used)."""
last_used: dict[str, str] = {}
"""op name -> backend(s) of its last call, "+"-joined in launch order (e.g. ``"cpp+eager"``); kept
for scripts that predate :data:`last_call`."""
fallback_tensors: Counter = Counter()
"""(op, device type, reason) -> tensors that ran eagerly although the caller did not ask for eager,
since the process started (or the counter was cleared)."""
_recorders: list[list[Record]] = []
_warned_cuda = False


@contextmanager
def recording() -> Iterator[list[Record]]:
    """Collect the :class:`Record` of every op call made inside the block (nested blocks each get them)."""
    log: list[Record] = []
    _recorders.append(log)
    try:
        yield log
    finally:
        for i in range(len(_recorders) - 1, -1, -1):
            if _recorders[i] is log:
                del _recorders[i]
                break


def record(op: str, parts: list[Part], extra_lists: int = 0) -> None:
    """Store an op call's parts (:data:`last_call`, :data:`last_used`, active :func:`recording` blocks)."""
    global _warned_cuda
    rec = Record(op, tuple(parts), extra_lists)
    for log in _recorders:
        log.append(rec)
    if torch.compiler.is_compiling():  # see last_call
        return
    last_call[op] = rec
    last_used[op] = "+".join(dict.fromkeys(p.backend for p in parts))
    for p in parts:
        if p.fallback:
            fallback_tensors[(op, p.device, p.fallback)] += p.tensors
            if p.device == "cuda" and not _warned_cuda:
                _warned_cuda = True
                why = ("their parameter/gradient/state tensors do not share one dense memory layout (e.g. a "
                       "gradient in another memory format than its parameter, or an overlapping view)"
                       if p.fallback == "layout" else "no compiled backend (cuda, triton) is available")
                warnings.warn(f"sam_kernels: {p.elements} elements of CUDA tensors in {op} ran on the slow eager "
                              f"path because {why}. sam_kernels.ops.last_call[{op!r}] and the optimizers' "
                              f"dispatch_summary() show which; this warning is shown once.",
                              RuntimeWarning, stacklevel=4)


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + tuple(BACKEND_MODULES)}")
    return name


def register_backend(name: str, module: str) -> None:
    """Add backend ``name``, served by the module at import path ``module`` (the interface in this
    module's docstring), imported on first use. ``auto`` never picks it.

    Raises ValueError if ``name`` is taken or is ``"auto"``."""
    if name == "auto" or name in BACKEND_MODULES:
        raise ValueError(f"backend name {name!r} is already taken")
    BACKEND_MODULES[name] = module


def unregister_backend(name: str) -> None:
    """Remove a backend added by :func:`register_backend` (and a global choice of it).

    Raises ValueError for a built-in or unknown name."""
    if name in BACKENDS or name not in BACKEND_MODULES:
        raise ValueError(f"{name!r} is not a registered backend")
    global _global_backend
    del BACKEND_MODULES[name]
    _modules.pop(name, None)
    _import_errors.pop(name, None)
    if _global_backend == name:
        _global_backend = None


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


def preload(device_types, backend: Optional[str] = None) -> None:
    """Import now every backend a call on ``device_types`` could resolve to (``backend`` or the
    global choice, and ``auto``'s order). Code traced by torch.compile cannot import modules: an
    optimizer calls this at construction so its compiled steps never hit a first import."""
    requested = _check_name(backend) if backend is not None else get_backend()
    for device_type in set(device_types):
        for name in ((requested,) if requested != "auto" else ()) + AUTO_ORDER.get(device_type, ("eager",)):
            _load(name)


def backends() -> dict[str, dict]:
    """Every backend with ``available``, the device types it serves, its ops and, if missing, why."""
    out = {}
    for name in BACKEND_MODULES:
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


def resolve(op: str, device_type: str, backend: Optional[str] = None) -> tuple[str, Callable, str]:
    """(backend name, group-level function, fallback reason) for ``op`` on ``device_type`` tensors.

    The reason is ``"unavailable"`` when ``auto`` found no compiled backend and picked eager, else "".
    """
    requested = _check_name(backend) if backend is not None else get_backend()
    if requested == "auto":
        for name in AUTO_ORDER.get(device_type, ("eager",)):
            module = _load(name)
            if _serves(module, op, device_type):
                return name, module.OPS[op], ("unavailable" if name == "eager" else "")
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
    return requested, module.OPS[op], ""


def eager(op: str, backend: Optional[str] = None) -> tuple[str, Callable, str]:
    """The eager function for tensors the compiled kernels cannot walk as flat storage (layouts that
    differ between the lists, overlapping views), whatever was requested: ``"layout"`` is the
    fallback reason unless eager was asked for."""
    requested = _check_name(backend) if backend is not None else get_backend()
    return "eager", _load("eager").OPS[op], ("" if requested == "eager" else "layout")
