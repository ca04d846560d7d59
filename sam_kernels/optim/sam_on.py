"""SAM-ON: perturb only the normalization layers (Mueller et al., NeurIPS 2023, "Normalization
Layers Are All That Sharpness-Aware Minimization Needs"; official code github.com/mueller-mp/SAM-ON,
``sam_on.py``, flag ``only_norm``).

Any SAM variant of this package runs SAM-ON through the param-group key ``perturb``: a group with
``perturb=False`` is left out of the ascent (e = 0) AND of its norm, so

    e = rho · g_N / ‖g_N‖        (ASAM: rho · T² ⊙ g_N / ‖T ⊙ g_N‖)

with g_N the gradients of the perturbed groups only; every param still takes the base step with
the gradient at w + e. The skipped groups are simply not in the ascent's tensor lists: no extra
pass. :func:`sam_on_param_groups` builds the two groups from a model.
"""
from __future__ import annotations

from typing import Iterator

import torch

RULES = ("modules", "names")

NORM_MODULES = (torch.nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d, lazy ones
                torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
"""What ``rule="modules"`` takes for a normalization layer (isinstance)."""


def _by_module(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, bool]]:
    seen: set[int] = set()
    for _, module in model.named_modules():
        is_norm = isinstance(module, NORM_MODULES)
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:  # a shared parameter once, as model.parameters() lists it
                seen.add(id(p))
                yield name, p, is_norm


def _by_name(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, bool]]:
    for name, p in model.named_parameters():
        yield name, p, "norm" in name or "bn" in name


def sam_on_param_groups(model: torch.nn.Module, rule: str = "modules", **norm_group: object) -> list[dict]:
    """The param groups of SAM-ON for ``model``: ``[{"params": <normalization params>, **norm_group},
    {"params": <all other params>, "perturb": False}]`` (params that do not require grad left out,
    each param once, in ``model.parameters()`` order within a group).

    Args:
        model: the module whose parameters are split.
        rule: how a normalization parameter is recognized. ``"modules"`` (default): a parameter of a
            ``torch.nn`` normalization module (:data:`NORM_MODULES`: BatchNorm, SyncBatchNorm,
            InstanceNorm, LayerNorm, GroupNorm, RMSNorm; subclasses included). ``"names"``: the official
            code's rule, "norm" or "bn" in the parameter's qualified name (``model.named_parameters()``),
            which misses norm layers named otherwise (e.g. in ``nn.Sequential``: ``"1.weight"``).
        norm_group: options of the perturbed group, e.g. ``rho=...``, ``adaptive=True`` (SAM-ON's paper
            runs ASAM with rho about 10x larger than over all layers).

    Raises ``ValueError`` when no parameter is recognized (every step would silently be a plain one)
    or for an unknown ``rule``.

    Usage: ``sk.SAM(sk.sam_on_param_groups(model), torch.optim.SGD, rho=0.5, lr=0.1)``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    norm, rest = [], []
    for _, p, is_norm in (_by_module(model) if rule == "modules" else _by_name(model)):
        if p.requires_grad:
            (norm if is_norm else rest).append(p)
    if not norm:
        hint = ("no parameter of a torch.nn normalization module" if rule == "modules" else
                "no parameter name contains 'norm' or 'bn'")
        raise ValueError(f"sam_on_param_groups: {hint} in {type(model).__name__}: nothing would be perturbed")
    groups = [{"params": norm, **norm_group}]
    if rest:
        groups.append({"params": rest, "perturb": False})
    return groups
