"""Tensor lists for one (op, case): deterministic from a seed, so every implementation starts equal."""
from __future__ import annotations

import torch

from .cases import Case
from .op_specs import OpSpec, State

# list name -> (distribution, scale, offset): magnitudes like a real step (grads ~1e-2 of
# weights); second moments ~g² and bounded away from 0, so that fp16 loops (torch's own maths in
# the storage dtype) do not divide by an underflowed denominator; Fisher scores positive.
_FILLS = {
    "params": ("normal", 1.0, 0.0),
    "backups": ("normal", 1.0, 0.0),
    "grads": ("normal", 1e-2, 0.0),
    "sam_grads": ("normal", 1e-2, 0.0),
    "g_v": ("normal", 1e-2, 0.0),
    "bufs": ("normal", 1e-2, 0.0),
    "exp_avgs": ("normal", 1e-3, 0.0),
    "exp_avg_sqs": ("uniform", 1e-4, 1e-5),
    "fisher": ("uniform", 1e-4, 0.0),
    "scores": ("uniform", 1.0, 0.0),
    "precisions": ("uniform", 1.0, 0.5),       # bSAM's s > 0
    "precisions_next": ("uniform", 1.0, 0.5),
    "noise": ("normal", 1.0, 0.0),             # bSAM's z ~ N(0, 1)
}


def _fill(shape, kind: str, scale: float, offset: float, dtype: torch.dtype, device: torch.device,
          gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        t = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    else:
        t = torch.rand(shape, dtype=dtype, device=device, generator=gen)
    if scale != 1.0:
        t.mul_(scale)
    return t.add_(offset) if offset else t


def make_state(case: Case, spec: OpSpec, dtype: torch.dtype, device: torch.device, seed: int = 0) -> State:
    """The lists ``spec`` needs for ``case``, plus ``sq_norm`` (‖grads‖²) when the op takes a norm."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state: State = {}
    for name in spec.lists:
        kind, scale, offset = _FILLS[name]
        state[name] = [_fill(shape, kind, scale, offset, dtype, device, gen) for shape in case.shapes]
        if case.channels_last:  # the same values, laid out like a channels_last model's
            state[name] = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                           for t in state[name]]
    if spec.needs_sq_norm:  # in grad_sq_norm's result dtype: fp64 for fp64 grads, else fp32
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        state["sq_norm"] = torch.stack([g.to(acc).square().sum() for g in state["grads"]]).sum()
    return state


def snapshot(state: State, spec: OpSpec) -> dict[str, list[torch.Tensor]]:
    """Copies of the lists the op writes (what the correctness check compares)."""
    return {name: [t.detach().clone() for t in state[name]] for name in spec.outputs}
