"""The finite check (``finite_check=True``): non-finite gradients raise ``FloatingPointError`` with the
weights at w, without a blocking read of device memory inside a step (ours; the device-side skip is
GradScaler's ``found_inf`` protocol, see :mod:`.amp`).

Both SAM passes compute a squared gradient norm that is non-finite exactly when some gradient is (or
when the squares overflow their fp32 sum): the first pass's ‖g(w)‖², which the ascent needs anyway,
and the descent's ‖g(w + e)‖² (one read of the gradients; telemetry and Stable SAM reuse it). What
happens with a non-finite norm depends on where the gradients live:

- **Host memory (CPU parameters).** Reading the norm is no synchronization: the error is raised in
  the call that computed it, before anything is written. ``first_step`` raises with the weights
  unperturbed (no step begun), ``second_step`` with the weights restored to w, ``base_step`` with
  them unchanged; the optimizer state is untouched.
- **Device memory (CUDA and other accelerators).** Nothing is read back during the step. The norm
  becomes a 0-dim flag on the device: the perturbation is not applied (a non-finite norm leaves
  every weight unchanged) and the fused descent reads the flag and skips: the weights end at w
  bitwise and the base optimizer's state is left as it was (AdamW's step count too). At the end of
  the step the flag is copied into pinned host memory without blocking; the error is raised at the
  start of the next ``first_step``, ``base_step`` or ``step`` of this optimizer once the device has
  finished the skipped step (it has, in practice: the next step's forward and backward ran behind
  it), or by ``stats()`` and ``check_finite()``, which wait for it. The call that raises does
  nothing else: call it again to take that step. Host syncs that remain: AdamW with a skip flag
  takes back the skipped step's count on the host (torch keeps it there, one sync per step, as
  under AMP), and optimizers without a fused descent are stepped only when the flag reads zero.

Under ``torch.compile`` the check stays in the call (the read graph-breaks). With an active
``GradScaler`` an overflow is expected and handled by :mod:`.amp` instead (no error).

``finite_check="fused"`` (what True means where it applies: ``torch.optim.SGD`` with its parameters
on one device; see :func:`.base_step.in_pass_check`) drops the read of g(w + e): the fused SGD
descent checks each gradient element in the pass that reads it for the update and writes the new
momentum into a spare buffer, so a fault is undone bitwise at the end of the call
(:class:`.base_step.InPassCheck`; on a GPU by a second launch that reads the flag on the device).
The error is then raised as above: by ``second_step`` in host memory, at the next step in device
memory (the descent's flag joins the step's skip flag). ``"pass"`` keeps the read (no spare
buffers).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


SPARE_KEY = "momentum_spare"
"""``sam.state[p]`` entry: the spare momentum buffer the finite check in the update's pass writes into."""
MODES = (True, False, "pass", "fused")


def check_mode(value) -> object:
    """``value`` if it is one of :data:`MODES`, else ValueError."""
    if isinstance(value, bool) or (isinstance(value, str) and value in ("pass", "fused")):
        return value
    raise ValueError(f"finite_check must be True, False, 'pass' or 'fused', got {value!r}")


def message(where: str, detail: str) -> str:
    return (f"SAM.{where}: the gradients contain NaN or Inf ({detail}); the weights were left at w (unperturbed, "
            f"not updated) and the optimizer state unchanged. Skip this batch (zero_grad) or lower the learning "
            f"rate; finite_check=False disables this check")


class FiniteCheck:
    """Where a non-finite norm is reported (``SAM.step_state.finite``): in the call (host memory) or,
    deferred, at the next step (device memory). ``deferred``: None chooses by the norm's device."""

    def __init__(self):
        self.deferred: Optional[bool] = None
        # (host flag, event or None, step number) per finished step whose flag was not looked at yet, oldest
        # first: the device may run several steps behind the host
        self._pending: list[tuple] = []

    def __getstate__(self) -> dict:
        return {"deferred": self.deferred}  # a copy starts with nothing pending (events do not copy)

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.deferred = state["deferred"]

    def defers(self, sq_norm: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():
            return False
        return self.deferred if self.deferred is not None else sq_norm.device.type != "cpu"

    def screen(self, now, sq_norm: torch.Tensor, where: str) -> None:
        """Raise now (host memory), or fold ``sq_norm``'s finiteness into the step's device flag ``now.found``."""
        if not self.defers(sq_norm):
            value = float(sq_norm)  # host memory (or a compiled step's documented read)
            if not math.isfinite(value):
                raise FloatingPointError(message(where, f"squared norm {value}"))
            return
        found = (~torch.isfinite(sq_norm)).float()
        now.found = found if now.found is None else torch.maximum(now.found, found.to(now.found.device))

    def finish(self, now) -> None:
        """End of a step whose flag lives on the device: copy it to the host without blocking."""
        found = now.found
        if found is None:
            return
        if found.device.type == "cpu":
            self._pending.append((found.clone(), None, now.step_count))
            return
        host = torch.empty((), dtype=found.dtype, pin_memory=True)
        host.copy_(found, non_blocking=True)
        event = torch.Event(device=found.device)
        event.record()
        self._pending.append((host, event, now.step_count))

    def surface(self, wait: bool = False) -> None:
        """Raise the deferred error of the oldest skipped step whose flag has reached the host (``wait``:
        wait for the flags, one sync). Each skipped step raises once; flags still on their way stay
        for the next look."""
        while self._pending:
            host, event, step = self._pending[0]
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    return  # not there yet: the next look
            self._pending.pop(0)
            if bool(host):  # host memory the copy has finished writing: no sync
                raise FloatingPointError(message("step", f"found in optimizer step {step}, which was skipped; "
                                                         f"raised at the first look after it"))
