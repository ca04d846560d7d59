"""Tensor lists for one (op, case): deterministic from a seed, so every implementation starts equal."""
from __future__ import annotations

import torch

from .cases import Case
from .op_specs import OpSpec, State

# list name -> (distribution, scale): magnitudes like a real step (grads ~1e-2 of weights),
# second moments and Fisher scores positive.
_FILLS = {
    "params": ("normal", 1.0),
    "backups": ("normal", 1.0),
    "grads": ("normal", 1e-2),
    "sam_grads": ("normal", 1e-2),
    "g_v": ("normal", 1e-2),
    "bufs": ("normal", 1e-2),
    "exp_avgs": ("normal", 1e-3),
    "exp_avg_sqs": ("uniform", 1e-6),
    "fisher": ("uniform", 1e-4),
    "scores": ("uniform", 1.0),
}


def _fill(shape, kind: str, scale: float, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    if kind == "normal":
        t = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    else:
        t = torch.rand(shape, dtype=dtype, device=device, generator=gen)
    return t.mul_(scale) if scale != 1.0 else t


def make_state(case: Case, spec: OpSpec, dtype: torch.dtype, device: torch.device, seed: int = 0) -> State:
    """The lists ``spec`` needs for ``case``, plus ``sq_norm`` (‖grads‖², fp32) when the op takes a norm."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state: State = {}
    for name in spec.lists:
        kind, scale = _FILLS[name]
        state[name] = [_fill(shape, kind, scale, dtype, device, gen) for shape in case.shapes]
    if spec.needs_sq_norm:
        state["sq_norm"] = torch.stack([g.float().square().sum() for g in state["grads"]]).sum()
    return state


def snapshot(state: State, spec: OpSpec) -> dict[str, list[torch.Tensor]]:
    """Copies of the lists the op writes (what the correctness check compares)."""
    return {name: [t.detach().clone() for t in state[name]] for name in spec.outputs}
