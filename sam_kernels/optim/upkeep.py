"""The params' bookkeeping between steps (ours): SAM's keys in every param group, the params that
share memory, and per-param state that follows its param through a cast or a move."""
from __future__ import annotations

import torch

from . import aliases, follow, groups, param_scan
from .contract import complete_groups, prepare_group


class ParamUpkeep:
    """Mixin of :class:`~sam_kernels.optim.sam.SAM`: param groups, aliases and casts."""

    def _params(self) -> list[torch.Tensor]:
        return groups.all_params(self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim``, plus SAM's keys (defaults filled, checked) and a duplicate check;
        the group is shared with the base optimizer."""
        prepare_group(param_group, self.param_groups, self.defaults, type(self).__name__)
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during __init__: the base optimizer is built on these groups afterwards
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)  # appends to the list both optimizers share
            self.step_state.groups_checked = len(self.param_groups)
            self.find_aliases()

    def find_aliases(self) -> None:
        """Find the params that share memory (exact aliases are stepped as ``torch.optim`` steps them,
        see :mod:`.aliases`; a partial overlap raises ``ValueError``). Runs at construction,
        ``add_param_group`` and ``load_state_dict``; call it after re-tying parameters' storage
        (``p.data = q.data``) on a built optimizer."""
        self.step_state.aliases = aliases.find(self._params(), type(self).__name__)

    def _complete_new_groups(self) -> None:
        """Groups appended to ``param_groups`` behind this optimizer's back get SAM's keys (checked)."""
        now = self.step_state
        checked = now.groups_checked
        now.groups_checked = complete_groups(self.param_groups, self.defaults, checked, type(self).__name__)
        if now.groups_checked != checked:
            self.find_aliases()

    def _follow_casts(self) -> None:
        """After ``model.double()`` / ``model.to(device)`` (between steps or mid-step) every state tensor
        follows its param's dtype and device as after a ``load_state_dict`` onto the cast model (see
        :mod:`.follow`); one host-side comparison of dtypes and devices per call otherwise. The look
        (:func:`.param_scan.scan`) is kept for this step call's first reader of the gradients."""
        now = self.step_state
        compiling = torch.compiler.is_compiling()  # a graph holds no scan object (see .param_scan.take)
        found = None if compiling else param_scan.scan(self.param_groups, now.entry_cache)
        sig = follow.signature(self._params()) if compiling else found.signature
        if follow.changed(now.param_signature, sig):
            self._cast_state(self._params())
        now.param_signature = sig
        now.scan = found

    def _cast_state(self, params: list[torch.Tensor]) -> None:
        """Cast this optimizer's and the base optimizer's per-param state to the params (variants with
        state of their own extend this)."""
        follow.cast_state(self.state, params)
        follow.cast_state(self.base_optimizer.state, params)
