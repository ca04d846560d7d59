"""Saving and loading a SAM optimizer: its state dict (base optimizer, SAM state, a variant's own
entries), torch.optim's state-dict hooks around the whole dict, and what a copy or pickle keeps (ours)."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Iterator

import torch

from . import amp
from .contract import check_group
from .finite import SPARE_KEY
from .telemetry import SCRATCH_KEY

_Optimizer = torch.optim.Optimizer


def pop_saved(state_dict: dict, key: str, owner: str):
    """``state_dict.pop(key)``, or a ValueError saying the dict was not saved by ``owner.state_dict()``."""
    try:
        return state_dict.pop(key)
    except KeyError:
        raise ValueError(f"{owner}.load_state_dict: no {key!r} entry; the state dict was not saved by "
                         f"sam_kernels.{owner}.state_dict()") from None


@contextlib.contextmanager
def hooks_silenced(opt: _Optimizer, *names: str) -> Iterator[None]:
    """Run torch's own ``state_dict``/``load_state_dict`` without their hooks: SAM runs them itself
    around the WHOLE dict (base optimizer and SAM state included)."""
    saved = [getattr(opt, n) for n in names]
    try:
        for n in names:
            setattr(opt, n, OrderedDict())
        yield
    finally:
        for n, hooks in zip(names, saved):
            setattr(opt, n, hooks)


def save(opt, variant_state: dict) -> dict:
    """``opt.state_dict()``: torch's dict of ``opt`` + ``"sam"`` (step count, decision, perturbed
    params, the pending step's AMP overflow flag, policy, modifiers, telemetry) + ``"base_optimizer"`` + ``variant_state``'s entries.
    Backups and first-pass copies are scratch between steps: saved only mid-step."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    with hooks_silenced(opt, "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
        sd = _Optimizer.state_dict(opt)
    now = opt.step_state
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    scratch = {SPARE_KEY}  # the finite check's spare momentum buffers: recreated when needed
    if now.perturbed is None:
        scratch |= {"backup", "ascent_scratch", SCRATCH_KEY, *opt.transient_state_keys,
                    *(k for m in opt.modifiers for k in m.transient_keys)}
    # entries that are not a param's state dict (a hook's ``state["test"] = 1``) are kept as they are
    sd["state"] = {k: {n: v for n, v in st.items() if n not in scratch} if isinstance(st, dict) else st
                   for k, st in sd["state"].items()}
    sd["sam"] = {
        "step_count": now.step_count,
        "decision": now.decision,
        "perturbed": None if now.perturbed is None else [index[id(p)] for p in now.perturbed],
        "ascents": now.ascents,
        "found": now.found,  # AMP: the pending step's overflow flag (device tensor), so a resumed step skips too
        "policy_kind": type(opt.policy).__name__,
        "policy": opt.policy.state_dict(),
        "modifier_kinds": [type(m).__name__ for m in opt.modifiers],
        "modifiers": [m.state_dict() for m in opt.modifiers],
        "telemetry": now.telemetry.state_dict(),
    }
    sd["base_optimizer"] = opt.base_optimizer.state_dict()
    sd.update(variant_state)
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, sd)
        if result is not None:
            sd = result
    return sd


def load(opt, state_dict: dict, variant_keys: tuple[str, ...], load_variant: Callable[[dict], None]) -> None:
    """``opt.load_state_dict(state_dict)``; ``variant_keys``' entries go to ``load_variant`` last.
    Every check runs before anything is loaded, so a rejected state dict leaves ``opt`` as it was."""
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    state_dict = dict(state_dict)
    owner = type(opt).__name__
    sam_state = pop_saved(state_dict, "sam", "SAM")
    base_state = pop_saved(state_dict, "base_optimizer", "SAM")
    variant = {k: pop_saved(state_dict, k, owner) for k in variant_keys}
    kinds = [type(m).__name__ for m in opt.modifiers]
    saved_kinds = sam_state.get("modifier_kinds", kinds)
    if len(sam_state["modifiers"]) != len(opt.modifiers) or saved_kinds != kinds:
        raise ValueError(f"SAM.load_state_dict: saved with descent modifiers {saved_kinds}, this optimizer has "
                         f"{kinds}; build it with the same options")
    policy_kind = sam_state.get("policy_kind", type(opt.policy).__name__)
    if policy_kind != type(opt.policy).__name__:
        raise ValueError(f"SAM.load_state_dict: saved with a {policy_kind}, this optimizer uses a "
                         f"{type(opt.policy).__name__}; build it with the same variant")
    perturbed = sam_state["perturbed"]
    if perturbed is not None and any("backup" not in state_dict["state"].get(i, {}) for i in perturbed):
        raise ValueError("SAM.load_state_dict: saved mid-step but the backups are missing")
    groups = [dict(g) for g in state_dict["param_groups"]]
    for i, g in enumerate(groups):  # groups saved by an older version get the current defaults (as torch.optim)
        for key, value in opt.defaults.items():
            g.setdefault(key, value)
        check_group(g, i, f"{owner}.load_state_dict")
    state_dict["param_groups"] = groups
    opt.find_aliases()  # a partial overlap raises here, before anything is loaded
    opt.base_optimizer.load_state_dict(base_state)
    with hooks_silenced(opt, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
        _Optimizer.load_state_dict(opt, state_dict)
    opt.base_optimizer.param_groups = opt.param_groups  # share the groups again (LR schedulers)
    now = opt.step_state
    now.groups_checked = len(opt.param_groups)
    params = [p for g in opt.param_groups for p in g["params"]]
    mid = [] if perturbed is None else [params[i] for i in perturbed]
    now.set_perturbed(None if perturbed is None else mid, [opt.state[p]["backup"] for p in mid])
    now.step_count = sam_state["step_count"]
    now.decision = sam_state["decision"]
    found = sam_state.get("found")  # absent in state dicts saved before it was kept
    now.found = None if found is None or not mid else found.to(mid[0].device, copy=True)
    now.ascents = sam_state.get("ascents", 0 if perturbed is None else 1)  # absent before multi-step ascents
    now.begun = perturbed is not None
    opt.policy.load_state_dict(sam_state["policy"])
    for m, st in zip(opt.modifiers, sam_state["modifiers"]):
        m.load_state_dict(st)
    if "telemetry" in sam_state:  # state dicts saved before telemetry existed: counters start at 0
        now.telemetry.load_state_dict(sam_state["telemetry"])
    load_variant(variant)
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


class Checkpointing:
    """``state_dict``, ``load_state_dict`` and copying of :class:`~sam_kernels.optim.sam.SAM` (a mixin).
    A variant with state of its own names its entries in ``_variant_keys`` and overrides the two
    ``_variant`` methods."""

    _variant_keys: tuple[str, ...] = ()
    transient_state_keys: tuple[str, ...] = ()
    """Per-param state entries of a variant that are scratch between steps (left out of boundary saves)."""
    """Top-level state-dict entries a variant adds beside "sam" (filled by ``_variant_state``)."""

    def _variant_state(self) -> dict:
        """A variant's own state, ``{key: state}`` for each of ``_variant_keys``. Override."""
        return {}

    def _load_variant_state(self, saved: dict) -> None:
        """Load what ``_variant_state`` saved (called after the SAM state is loaded). Override."""

    def state_dict(self) -> dict:
        """Base optimizer state + SAM state (policy, modifiers, step count; backups only mid-step).

        State-dict hooks registered on this optimizer see the whole dict.
        """
        return save(self, self._variant_state())

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a run saved by :meth:`state_dict` (mid-step saves included).

        Groups saved by an older version get the current defaults for keys they lack (as
        torch.optim does); every group's SAM hyperparameters are checked before anything is loaded.
        Raises ``ValueError`` for a dict not saved by this class or by one built with other options.
        """
        load(self, state_dict, self._variant_keys, self._load_variant_state)

    def __getstate__(self) -> dict:
        """Everything but hooks (as torch.optim) and the GradScaler (the user's object: attach it
        again to a copy with ``opt.grad_scaler = scaler``); mid-step copies keep their backups."""
        state = {k: v for k, v in self.__dict__.items() if not (k.startswith("_optimizer_") and k.endswith("_hooks"))}
        state["amp"] = amp.make(None)
        return state
