"""One SAM optimizer step (first_step + second_step, SGD momentum 0.9, weight decay 5e-4, rho 0.05;
forward and backward excluded), written the ways a user could write it.

Providers (names as on the command line; labels in ``LABELS``):

- ``<backend>``: ``sam_kernels.SAM`` at default settings on a compiled backend (cpp; cuda, triton);
- ``<backend>-nocheck``: the same with ``finite_check=False``;
- ``compile``: ``torch.compile`` of the hand-written foreach step (``baselines.foreach_ascent`` and
  ``foreach_descent``, compiled separately: a forward and backward run between them in training);
- ``foreach``: the same two functions, eager;
- ``loop``: the popular SAM class's per-parameter loop (``baselines.Davda54SAM``) around
  ``torch.optim.SGD``;
- ``pytorch-optimizer``: ``pytorch_optimizer.SAM`` around ``torch.optim.SGD`` (where installed).

Every provider gets its own copy of the same parameters and, each step, fresh copies of the same two
gradient sets as new ``p.grad`` tensors, made before the step and not timed (``Step.prepare``), as
the two backward passes of a ``zero_grad(set_to_none=True)`` loop hand them over; the optimizers
are called as in that loop, ``first_step(zero_grad=True)`` and ``second_step(zero_grad=True)``
(sam_kernels then writes the new momentum over g(w + e): ``sam_kernels.optim.handover``). Before it
is timed, each provider's first step is compared with one SAM step in float64 (``check``).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import baselines
from .cases import Case
from .check import TOLERANCES
from .op_specs import LR, MOMENTUM, RHO, SPECS, WEIGHT_DECAY

EXTERNAL = ("compile", "foreach", "loop", "pytorch-optimizer")
LABELS = {"compile": "torch.compile of the foreach step", "foreach": "foreach step (eager)",
          "loop": "per-parameter loop (popular SAM class)", "pytorch-optimizer": "pytorch-optimizer SAM"}


def label(provider: str) -> str:
    if provider in LABELS:
        return LABELS[provider]
    backend, _, nocheck = provider.partition("-")
    return f"sam_kernels {backend}" + (", finite_check=False" if nocheck else ", defaults")


def floor_bytes(case: Case, dtype: torch.dtype) -> int:
    """Bytes a SAM-SGD step must move at the least (``op_specs``: 10 element passes)."""
    return SPECS["sam_optimizer_step"].floor_bytes(case.numel, torch.empty((), dtype=dtype).element_size())


@dataclass
class Inputs:
    """Initial weights and the two passes' gradients of one case (shared, never written)."""
    weights: list[torch.Tensor]
    grads: list[torch.Tensor]
    sam_grads: list[torch.Tensor]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)

    def fill(scale: float) -> list[torch.Tensor]:
        return [torch.randn(s, dtype=dtype, device=device, generator=gen).mul_(scale) for s in case.shapes]
    return Inputs(fill(1.0), fill(1e-2), fill(1e-2))


@dataclass
class Step:
    """A provider's step, as its two halves (each hands over its gradients first: copies of
    ``inputs``' made by :meth:`prepare`, which the timing leaves out)."""
    params: list[torch.Tensor]
    inputs: Inputs
    first_step: Callable[[], None]
    second_step: Callable[[], None]
    fresh: list = field(default_factory=list)  # the two gradient sets of the next step

    def prepare(self) -> None:
        self.fresh = [[g.clone() for g in self.inputs.grads], [g.clone() for g in self.inputs.sam_grads]]

    def first(self) -> None:
        if not self.fresh:
            self.prepare()
        _hand_over(self.params, self.fresh.pop(0))  # nothing else holds them once handed over
        self.first_step()

    def second(self) -> None:
        _hand_over(self.params, self.fresh.pop(0))
        self.second_step()

    def __call__(self) -> None:
        self.first()
        self.second()


def _hand_over(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def _optimizer_step(params, inputs: Inputs, opt) -> Step:
    return Step(params, inputs, lambda: opt.first_step(zero_grad=True), lambda: opt.second_step(zero_grad=True))


def _foreach_step(params, inputs: Inputs, compiled: bool) -> Step:
    ascent, descent = baselines.foreach_ascent, baselines.foreach_descent
    if compiled:
        ascent, descent = torch.compile(ascent), torch.compile(descent)
    backups = [torch.empty_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    return Step(params, inputs, lambda: ascent(params, [p.grad for p in params], backups, RHO),
                lambda: descent(params, [p.grad for p in params], backups, bufs, LR, MOMENTUM, WEIGHT_DECAY))


def unavailable(provider: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` cannot run on ``device`` (None: it can)."""
    if provider == "pytorch-optimizer":
        if importlib.util.find_spec("pytorch_optimizer") is None:
            return "not installed (pip install pytorch-optimizer)"
        return None
    if provider in EXTERNAL:
        return None
    import sam_kernels
    backend = provider.split("-")[0]
    info = sam_kernels.backends().get(backend)
    if info is None:
        return f"unknown provider {provider!r}"
    if backend == "triton" and device.type == "cpu":
        return "Triton on CPU runs only in its interpreter: far too slow to time"
    if not info["available"]:
        return info["reason"]
    if device.type not in info["devices"]:
        return f"runs on {', '.join(info['devices'])}, not {device.type}"
    return None


def build(provider: str, inputs: Inputs) -> Step:
    """``provider``'s step on its own copy of ``inputs.weights``."""
    params = [w.clone() for w in inputs.weights]
    sgd = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if provider in ("compile", "foreach"):
        return _foreach_step(params, inputs, compiled=provider == "compile")
    if provider == "loop":
        opt = baselines.Davda54SAM(params, torch.optim.SGD, rho=RHO, **sgd)
    elif provider == "pytorch-optimizer":
        import pytorch_optimizer
        opt = pytorch_optimizer.SAM(params, torch.optim.SGD, rho=RHO, **sgd)
    else:
        import sam_kernels
        backend, _, nocheck = provider.partition("-")
        opt = sam_kernels.SAM(params, torch.optim.SGD, rho=RHO, backend=backend, finite_check=not nocheck, **sgd)
    return _optimizer_step(params, inputs, opt)


def expected(inputs: Inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights after first_step and after second_step of the first SAM-SGD step, computed in float64
    and stored in the parameters' dtype: w + rho·g/‖g‖, then w − lr·(g_s + wd·w) (the momentum
    buffer starts as the first update)."""
    norm = torch.sqrt(sum(g.double().square().sum() for g in inputs.grads))
    perturbed = [(w.double() + RHO * g.double() / (norm + 1e-12)).to(w.dtype)
                 for w, g in zip(inputs.weights, inputs.grads)]
    after = [(w.double() - LR * (gs.double() + WEIGHT_DECAY * w.double())).to(w.dtype)
             for w, gs in zip(inputs.weights, inputs.sam_grads)]
    return perturbed, after


def check(step: Step, want: tuple[list[torch.Tensor], list[torch.Tensor]]) -> Optional[str]:
    """Runs ``step``'s first step and compares both halves with ``want`` (``expected``); returns
    where it differs beyond the dtype's tolerance (``check.TOLERANCES``), or None."""
    atol, rtol = TOLERANCES[step.params[0].dtype]
    for half, name, ref in ((step.first, "after first_step", want[0]), (step.second, "after second_step", want[1])):
        half()
        for i, (p, e) in enumerate(zip(step.params, ref)):
            if not torch.allclose(p, e, atol=atol, rtol=rtol):
                err = (p.double() - e.double()).abs().max().item()
                return f"tensor {i} {name}: max abs error {err:.3g}"
    return None
