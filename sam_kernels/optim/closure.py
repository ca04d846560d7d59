"""The closure protocol of ``SAM.step(closure)`` (ours, after torch.optim's): which pass the closure
gives, and the step it runs through the public step methods.

The first pass is the gradients a backward wrote since the last optimizer step or ``zero_grad``;
when none did, the gradients are zeroed in place and the closure gives the first pass. Whether a
backward ran is known from post-accumulate-gradient hooks (FSDP2: the gradients' versions;
:mod:`.first_pass`), never from their values (no host sync), so gradients zeroed in place by other
code after a backward (``model.zero_grad(set_to_none=False)``, ``p.grad.zero_()``) still count as a
first pass. Then a SAM step (``first_step``
once per ascent, the closure after each, ``second_step``) or a plain one, as the policy decides.
Without a closure, ``step()`` ends a step begun by hand (how ``GradScaler.step(opt)`` ends the
manual loop).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import amp, groups
from .contract import LIGHTNING_FIX


def run(sam, closure: Optional[Callable[[], torch.Tensor]], first_loss: Optional[torch.Tensor] = None):
    """One ``sam.step(closure)``; returns what :meth:`~sam_kernels.optim.sam.SAM.step` returns."""
    now = sam.step_state
    if closure is None:
        if now.perturbed is not None:
            sam.second_step()
        elif now.decision is False:
            sam.base_step()
        else:
            raise ValueError("SAM.step() without a closure can only end a step begun by hand (after first_step(), "
                             "or after wants_sam() returned False). Pass a closure that re-evaluates the loss and "
                             f"calls backward, or use first_step()/second_step(). {LIGHTNING_FIX}. With a "
                             f"GradScaler:\n{amp.LOOP}")
        return None
    loss = None
    params = groups.all_params(sam.param_groups)
    if not now.backward.ran(params):  # no first pass: no gradient, or only zeros or last step's
        if any(p.grad is not None for p in params):
            sam.zero_grad(set_to_none=False)  # the first pass is the closure's alone (buffers kept)
        sam.amp.next_pass(sam)  # an unscale_ before this call was of no gradient of this step
        with torch.enable_grad():
            loss = first_loss = closure()
    if not sam.wants_sam():
        sam.base_step()
        return loss
    sam.first_step(zero_grad=True, loss=first_loss)
    for _ in range(sam.ascent_steps - 1):  # a multi-step ascent: one closure per gradient
        _evaluate(sam, closure)
        sam.first_step(zero_grad=True)
    loss = _evaluate(sam, closure)
    sam.second_step(loss=loss)
    return loss


def _evaluate(sam, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The closure at the perturbed weights; w is restored if it raises."""
    try:
        with torch.enable_grad():
            return closure()
    except BaseException:
        sam.restore()
        raise
