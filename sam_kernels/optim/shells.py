"""The host work around the step bodies (ours): what the public step methods (``first_step``,
``second_step``, ``base_step``) do before and after the body that torch.compile compiles.

Each public step method is an eager shell (``@torch.compiler.disable(recursive=False)``: Dynamo
skips its frame and compiles the frames it calls) that hands its body to :meth:`StepShells._run_body`,
itself a skipped frame. The host work runs through :data:`.compiled.call_eagerly` under a compiled
caller, as any frame a skipped one calls would be compiled (see :mod:`.compiled` for what a graph
must not hold). Variants extend the three hooks (``_host_before``, ``_host_after``, ``_after_failure``).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

from .base_step import fused_kind
from .compiled import HyperTensors, call, call_eagerly, eval_frame_callback
from .contract import mark_stepped


class StepShells:
    """Mixin of :class:`~sam_kernels.optim.sam.SAM`: the run of one step body and the host work around it."""

    @torch.compiler.disable(recursive=False)  # skipped too: the body it calls is what torch.compile compiles
    def _run_body(self, method: str, body: Callable[..., None], zero_grad: bool, descent: bool,
                  count: Optional[Callable[[object], None]] = None, **kwargs) -> None:
        """Host work, ``body(**kwargs)``, host work. ``descent``: a failed body leaves a pending ascent
        to undo (a compiled body that fails to compile runs nothing, see :meth:`_after_failure`).
        ``count(self)``: host bookkeeping of this call that its body must not read (a graph would be
        specialized on it), run after the hooks and before the body."""
        compiled = eval_frame_callback() not in (None, False)  # inline: a call here would be traced
        host = call_eagerly if compiled else call
        host(self._host_before, method, compiled)
        if count is not None:
            host(count, self)
        try:
            self.step_state.zero_grad = zero_grad  # for the body only (.handover)
            body(**kwargs)
        except BaseException as e:
            host(self._after_failure, e, descent)
            raise
        finally:
            self.step_state.zero_grad = False
            self.step_state.scan = None  # a look at the params lasts one call
        host(self._host_after, method, compiled, zero_grad)

    def _host_before(self, method: str, compiled: bool) -> None:
        """Host work before a step body that a graph must not hold (variants extend it): under compile,
        the hyperparameter tensors are filled (:class:`.compiled.HyperTensors`)."""
        if compiled:
            now = self.step_state
            if now.hypers is None:
                now.hypers = HyperTensors()
            now.hypers.sync(self.param_groups)

    def _host_after(self, method: str, compiled: bool, zero_grad: bool) -> None:
        """Host work after a step body succeeded (variants extend it): under compile, what a graph
        drops (``Optimizer.step``'s marks for LR schedulers); then ``zero_grad``."""
        if compiled and method != "first_step":
            mark_stepped(self)
            mark_stepped(self.base_optimizer)
        if zero_grad:
            self.zero_grad()

    def _after_failure(self, error: BaseException, descent: bool) -> None:
        """A step body raised. An eager descent has restored w itself; a compiled one that failed to
        compile ran nothing, so its pending ascent is undone here (``descent``). A graph break of a
        base optimizer without a fused descent under fullgraph is explained (:func:`compiled_refusal`)."""
        if descent and self.step_state.perturbed is not None:
            self.restore()
        refusal = compiled_refusal(self, error)
        if refusal is not None:
            raise refusal from error


def compiled_refusal(sam, error: BaseException, methods: str = "second_step/base_step") -> Optional[TypeError]:
    """The error to raise instead of Dynamo's when a compiled descent broke the graph because the base
    optimizer has no fused SAM descent (torch.optim's ``step()`` breaks the graph on purpose); else None."""
    exc = sys.modules.get("torch._dynamo.exc")
    if exc is None or not isinstance(error, exc.Unsupported) or "graph_break()" not in str(error):
        return None
    base = sam.base_optimizer
    if fused_kind(base) is not None:
        return None
    return TypeError(
        f"{type(sam).__name__}: a compiled {methods} with fullgraph=True needs a fused descent, and "
        f"{type(base).__name__} (with these settings) has none: its own step() runs, which breaks the graph on "
        "purpose (torch.optim). The weights are at w. Compile the step methods without fullgraph=True, or use "
        "torch.optim.SGD or torch.optim.AdamW (not fused, capturable, amsgrad or differentiable) as the base optimizer")
