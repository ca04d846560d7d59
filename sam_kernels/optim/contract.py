"""The ``torch.optim.Optimizer`` contract for an optimizer whose step is split in two calls.

``SAM.first_step`` / ``second_step`` / ``base_step`` do not go through ``Optimizer.step``, which is
where torch runs step hooks and where LR schedulers notice that a step happened
(``optimizer._opt_called``). The fused descent does not call ``base_optimizer.step()`` either.
This module gives both optimizers the same observable effects as a real ``step()``:
:func:`run_step_hooks` for the pre/post hooks and :func:`mark_stepped` for the scheduler flag.
It also holds the checks of the SAM hyperparameters of every param group and the duplicate
check that ``torch.optim`` only warns about.
"""
from __future__ import annotations

import math
from itertools import chain
from numbers import Real
from typing import Iterable

import torch
from torch.optim import optimizer as _torch_optimizer

SAM_KEYS = ("rho", "adaptive", "eta", "perturb")


def _global_hooks(kind: str) -> Iterable:
    # torch keeps the hooks of register_optimizer_step_{pre,post}_hook in these module dicts; both
    # exist since torch 2.0. Missing ones (a future rename) mean no global hooks, never a crash.
    return getattr(_torch_optimizer, f"_global_optimizer_{kind}_hooks", {}).values()


def run_step_hooks(opt: torch.optim.Optimizer, when: str) -> None:
    """Run ``opt``'s step pre (``when="pre"``) or post hooks as ``Optimizer.step`` would, args ``()``.

    Order as in torch: global pre hooks, then the instance's; the instance's post hooks, then the global ones.
    A pre hook's returned (args, kwargs) cannot apply to a call that takes none; it is ignored.
    """
    if when == "pre":
        hooks = chain(_global_hooks("pre"), opt._optimizer_step_pre_hooks.values())
    else:
        hooks = chain(opt._optimizer_step_post_hooks.values(), _global_hooks("post"))
    for hook in list(hooks):
        hook(opt, (), {})


def has_post_hooks(opt: torch.optim.Optimizer) -> bool:
    """Whether a step of ``opt`` runs post hooks (its own or global ones)."""
    return bool(opt._optimizer_step_post_hooks) or any(True for _ in _global_hooks("post"))


def mark_stepped(opt: torch.optim.Optimizer) -> None:
    """What ``Optimizer.step`` leaves behind for LR schedulers (``_opt_called``) and profilers."""
    opt._opt_called = True
    opt._optimizer_step_code()


def check_group(group: dict, index: int, owner: str = "SAM") -> None:
    """Reject bad SAM hyperparameters of one param group, naming the group and the key.

    rho and eta: real numbers, finite, >= 0 (rho < 0 would ascend downhill; NaN/Inf would silently
    turn every step into a plain one); adaptive and perturb: bools.
    """
    for key in ("rho", "eta"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{owner}: param group {index}: {key} must be a real number, got "
                            f"{type(value).__name__} {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}: param group {index}: {key} must be finite and >= 0, got {value!r}")
    for key in ("adaptive", "perturb"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{owner}: param group {index}: {key} must be a bool, got "
                            f"{type(group[key]).__name__} {group[key]!r}")


def check_no_duplicates(groups: list[dict], owner: str = "SAM") -> None:
    """A tensor listed twice would be perturbed twice and restored once: reject it (torch only warns)."""
    seen: dict[int, int] = {}
    for gi, group in enumerate(groups):
        for p in group["params"]:
            if id(p) in seen:
                where = "the same param group" if seen[id(p)] == gi else f"param groups {seen[id(p)]} and {gi}"
                raise ValueError(f"{owner}: a parameter (shape {tuple(p.shape)}) appears twice, in {where}; "
                                 f"list every tensor once")
            seen[id(p)] = gi


def complete_groups(groups: list[dict], defaults: dict, checked: int, owner: str = "SAM") -> int:
    """Fill missing SAM keys of groups ``checked..`` from ``defaults`` and check them; the new count.

    Groups can appear behind SAM's back (``base_optimizer.add_param_group`` appends to the shared
    list), so the step entry points call this: it costs one ``len`` when nothing is new.
    """
    if len(groups) == checked:
        return checked
    for i in range(checked, len(groups)):
        for key in SAM_KEYS:
            groups[i].setdefault(key, defaults[key])
        check_group(groups[i], i, owner)
    check_no_duplicates(groups, owner)
    return len(groups)


def bind_base_optimizer(param_groups: list[dict], base_optimizer, defaults: dict, kwargs: dict,
                        owner: str) -> torch.optim.Optimizer:
    """The base optimizer of a SAM optimizer whose groups are ``param_groups``: built from a class on
    them with ``kwargs``, or an instance holding exactly their params (its groups then get SAM's keys).
    Raises ``TypeError`` (not an optimizer; keyword arguments with an instance) or ``ValueError``
    (an instance with other params)."""
    if isinstance(base_optimizer, torch.optim.Optimizer):
        if kwargs:
            raise TypeError(f"SAM: base optimizer keyword arguments {sorted(kwargs)} given with an optimizer "
                            f"instance; set them on the instance instead")
        mine = {id(p) for g in param_groups for p in g["params"]}
        theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        if mine != theirs:
            raise ValueError("SAM: the base optimizer instance must hold exactly the parameters given to SAM")
        complete_groups(base_optimizer.param_groups, defaults, 0, owner)
        return base_optimizer
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        return base_optimizer(param_groups, **kwargs)
    raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got {base_optimizer!r}")


def prepare_group(param_group: dict, groups: list[dict], defaults: dict, owner: str) -> None:
    """A group about to join ``groups``: its params as a list, SAM's keys filled from ``defaults``
    and checked, no tensor twice (``ValueError``/``TypeError`` as :func:`check_group`)."""
    params = param_group["params"]
    if not isinstance(params, set):  # torch rejects sets itself, with its message
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
    for key in SAM_KEYS:
        param_group.setdefault(key, defaults[key])
    check_group(param_group, len(groups), owner)
    check_no_duplicates([*groups, param_group], owner)


LIGHTNING_FIX = ("Under PyTorch Lightning's automatic optimization, give the Trainer the SAM precision plugin: "
                 "Trainer(plugins=[sam_kernels.integrations.lightning.sam_precision(precision)]), or use manual "
                 "optimization")
_LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning")


def check_closure(closure, owner: str) -> None:
    """Refuse the closure of a stock Lightning precision plugin (raised before anything changes).

    Lightning's ``Precision.optimizer_step`` hands ``step`` a ``partial`` of its ``_wrap_closure`` while the
    previous step's gradients are still there (the closure zeroes them itself), so ``step`` would take them
    as the first pass: a stale ascent on every step but the first, silently. Recognized by duck typing,
    without importing Lightning: the partial's function is a method named ``_wrap_closure`` of an object
    whose class comes from a Lightning package.
    """
    func = getattr(closure, "func", None)
    plugin = getattr(func, "__self__", None)
    if plugin is None or getattr(func, "__name__", "") != "_wrap_closure":
        return
    if any(c.__module__.split(".")[0] in _LIGHTNING_PACKAGES for c in type(plugin).__mro__):
        raise RuntimeError(f"{owner}.step(closure) was called by Lightning's {type(plugin).__name__} plugin, whose "
                           f"closure would make stale gradients the first SAM pass. {LIGHTNING_FIX}")
