"""What makes the step methods compile once and keep running (ours).

Each public step method (``first_step``, ``second_step``, ``base_step``) is an eager shell around
a body: ``torch.compile(opt.first_step, fullgraph=True)`` skips the shell's frame and compiles the
body's. The shell does the host work a graph must not hold, without Dynamo (:data:`call_eagerly`;
the work itself: :mod:`.shells`):

- **Hyperparameters as graph inputs.** A Python float read in a graph is a constant guarded by
  value, so an lr or rho schedule would recompile every step (torch.optim's own SGD does, unless
  its ``lr`` is a tensor). Under compile the shell keeps a float64 tensor per param group
  for each float ``lr`` and ``rho``, on the group's device, and fills it from the group's value
  before each call (:class:`HyperTensors`); the body reads those tensors (:func:`hyper`), so a new
  value is new data, not a new graph. A tensor ``lr`` a user put in a group (torch's recipe for
  compiled optimizers with schedulers) is read as it is. The other hyperparameters
  (momentum, betas, weight decay, eps, eta) stay constants: changing one recompiles once.
- **Work that cannot be traced**: Sparse SAM's mask refresh (Fisher passes, random generators),
  ``zero_grad`` (torch.optim's does not trace).
- **A failed call never leaves w + e**: a body that fails to compile (a graph break under
  ``fullgraph=True``, the recompile limit) runs nothing; the shell of ``second_step`` then
  restores w (``restore``) before the error propagates, as an eager failure does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

HYPERPARAMETERS = ("lr", "rho")  # the ones schedules change


eval_frame_callback = getattr(getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None),
                              "get_eval_frame_callback", None) or (lambda: True)
"""Dynamo's current frame callback (private; a C function: calling it in a shell adds no frame to
trace): not None/False when the shell runs under torch.compile. Where torch lacks it, every call
counts as compiled, which only costs the shells' host work a disabled region and the tensor upkeep."""


def call(fn: Callable[..., Any], *args) -> Any:
    return fn(*args)


call_eagerly = torch.compiler.disable(call)
"""``call`` with torch.compile's frame evaluation off: how a shell runs host work under a compiled
caller (any frame a shell calls directly would be compiled)."""


class HyperTensors:
    """float64 tensors mirroring the float ``lr``/``rho`` of each param group (see the module
    docstring), created the first time a step runs under compile and filled before each call."""

    def __init__(self):
        self.groups: list[dict] = []      # the param groups mirrored, in order
        self.tensors: list[dict] = []     # per group: key -> tensor of shape (1,)
        self.values: list[dict] = []      # per group: key -> the float last written

    def sync(self, param_groups: list[dict]) -> None:
        """Mirror every float ``lr``/``rho`` of ``param_groups`` (host work: call it eagerly)."""
        if [id(g) for g in param_groups] != [id(g) for g in self.groups]:
            self.groups, self.tensors, self.values = list(param_groups), [], []
            for g in param_groups:
                device = next((p.device for p in g["params"]), torch.device("cpu"))
                # shape (1,): Dynamo takes a 0-dim float64 CPU tensor for a Python float, which it specializes
                self.tensors.append({k: torch.tensor([float(g[k])], dtype=torch.float64, device=device)
                                     for k in HYPERPARAMETERS if k in g and not isinstance(g[k], torch.Tensor)})
                self.values.append({k: float(g[k]) for k in self.tensors[-1]})
            return
        for g, tensors, values in zip(self.groups, self.tensors, self.values):
            for k, t in tensors.items():
                v = g[k]
                if isinstance(v, torch.Tensor):  # replaced by a tensor since: read as it is
                    continue
                if v != values[k]:
                    t.fill_(v)
                    values[k] = v

    def of(self, group: dict, key: str) -> Optional[torch.Tensor]:
        """The 0-dim tensor of ``group[key]``, or None when it has none."""
        for g, tensors in zip(self.groups, self.tensors):
            if g is group:
                t = tensors.get(key)
                return None if t is None else t.view(())
        return None


def hyper(sam, group: dict, key: str) -> Any:
    """``group[key]`` as a step should read it: its tensor mirror in a graph (the float is not read
    there: reading it would guard on its value), else the value itself."""
    if torch.compiler.is_compiling():
        mirrors = sam.step_state.hypers
        t = None if mirrors is None else mirrors.of(group, key)
        if t is not None:
            return t
    return group[key]
