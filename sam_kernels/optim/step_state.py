"""What a SAM optimizer keeps during an optimizer step (ours)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .finite import FiniteCheck
from .first_pass import BackwardWatch
from .param_scan import EntryCache


class StepState:
    """The mutable state of one SAM optimizer's step loop (``SAM.step_state``).

    A plain object on purpose: torch.compile keeps attribute stores on it, but drops those on
    ``torch.optim.Optimizer`` instances (torch 2.14, Dynamo's optimizer handling), so everything the
    step writes lives here rather than on the optimizer.
    """

    def __init__(self, telemetry):
        self.step_count = 0
        self.decision: Optional[bool] = None    # the policy's answer for this step, once asked
        self.perturbed: Optional[list[torch.Tensor]] = None  # between first_step and the descent
        self.backups: list[torch.Tensor] = []  # the backups of ``perturbed``, aligned with it
        self.ascents = 0  # ascents taken in this step (a multi-step ascent takes several)
        self._backup_of: Optional[dict] = None
        self.found: Optional[torch.Tensor] = None  # skip flag of this step on the device (AMP overflow, deferred finite check)
        self.finite = FiniteCheck()  # where the finite check reports (.finite)
        self.stepping = False  # inside step(): torch's wrapper runs the step hooks
        self.begun = False     # this optimizer step has run its pre hooks
        self.groups_checked = 0
        self.param_signature: Optional[tuple] = None  # the params' dtypes and devices at the last look (.follow)
        self.aliases: dict = {}  # params over shared memory, per param set (.aliases.find)
        self.dispatch_log: Optional[list] = None  # the dispatch records of the last step
        self.telemetry = telemetry  # sharpness values and cost counters (a .telemetry.Telemetry)
        self.backward = BackwardWatch()  # whether a backward wrote gradients since the last step or zero_grad
        self.hypers = None  # under torch.compile: lr/rho as tensors (a .compiled.HyperTensors)
        self.zero_grad = False  # the zero_grad argument of the step call running now (.handover)
        self.scan = None  # this step call's look at the params, until its first reader (.param_scan.take)
        self.entry_cache = EntryCache()  # the (group, param) entries, kept between steps (.param_scan)

    def set_perturbed(self, params: Optional[list[torch.Tensor]], backups: Sequence[torch.Tensor] = ()) -> None:
        """``params`` are at w + e now, their w in ``backups``; None: no param is perturbed."""
        self.perturbed, self.backups, self._backup_of = params, ([] if params is None else list(backups)), None

    @property
    def backup_of(self) -> dict[torch.Tensor, torch.Tensor]:
        """Perturbed param -> its backup (tensor keys: copyable), built when first asked for in a step."""
        if self._backup_of is None:
            self._backup_of = {} if self.perturbed is None else dict(zip(self.perturbed, self.backups))
        return self._backup_of

    def restored(self, p: torch.Tensor) -> torch.Tensor:
        """The weight ``p`` will have after the restore: its backup while it is perturbed."""
        return self.backup_of.get(p, p)

    def end(self) -> None:
        """Forget what belongs to the step that just ended or was undone (the counters stay)."""
        self.set_perturbed(None)
        self.ascents = 0
        self.decision = None
        self.found = None
        self.begun = False

