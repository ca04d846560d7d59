"""Optimizer state that follows its parameter's dtype and device (ours, after torch.optim's rule
on ``load_state_dict``): after ``model.double()`` or ``model.to(device)`` mid-run, every state
tensor of a parameter is cast as a fresh optimizer loading the same state dict would cast it, so
the run goes on as if it had been saved and loaded onto the cast model.

The rule (``torch.optim.Optimizer._process_value_according_to_param_policy``): ``step`` stays as
it is; a floating-point tensor takes the parameter's dtype (floating-point parameters) and device;
any other tensor (bool masks, counters) takes the device only. Backups are left to the step
(:mod:`.backups`: a backup keeps w exactly in the dtype it was taken in).

Detection is a comparison of each parameter's (dtype, device) with the last step's, on the host:
no device work unless something changed.
"""
from __future__ import annotations

from typing import Optional

import torch

_KEEP = ("step", "backup")


def signature(params: list[torch.Tensor]) -> tuple:
    """The dtype and device of each param, in order, as two comparable parts: the dtypes, and the
    devices ("cpu" when every param is on the CPU; the CUDA device indices when every param is on a
    CUDA device). Reading ``p.device`` builds a device object per param, several times the cost of
    ``p.dtype`` or ``p.is_cpu``: this runs twice per step over every param."""
    dtypes = [p.dtype for p in params]
    if all(p.is_cpu for p in params):
        return dtypes, "cpu"
    if all(p.is_cuda for p in params):
        return dtypes, "cuda", [p.get_device() for p in params]
    return dtypes, [p.device for p in params]


def one_device(params: list[torch.Tensor]) -> Optional[torch.device]:
    """The device every param of ``params`` (non-empty) is on, None when they are spread over
    several; read as :func:`signature` reads them (no device object per param on CPU or CUDA)."""
    if all(p.is_cpu for p in params):
        return torch.device("cpu")
    if all(p.is_cuda for p in params):
        indices = {p.get_device() for p in params}
        return torch.device("cuda", indices.pop()) if len(indices) == 1 else None
    devices = {p.device for p in params}
    return devices.pop() if len(devices) == 1 else None


def cast_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` as torch.optim's load rule casts a state tensor of ``p`` (itself when nothing changes)."""
    if t.is_floating_point() and p.is_floating_point():
        return t if (t.dtype, t.device) == (p.dtype, p.device) else t.to(dtype=p.dtype, device=p.device)
    return t if t.device == p.device else t.to(device=p.device)


def cast_state(state: dict, params: list[torch.Tensor]) -> None:
    """Cast every tensor of ``state[p]`` (but ``step`` and ``backup``) for each of ``params``."""
    for p in params:
        st = state.get(p)
        if not st:
            continue
        for k, v in st.items():
            if k not in _KEEP and isinstance(v, torch.Tensor):
                st[k] = cast_like(v, p)


def changed(last: Optional[tuple], now: tuple) -> bool:
    """Whether params were cast or moved since ``last`` (None: the first look)."""
    return last is not None and last != now
