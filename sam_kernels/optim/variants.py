"""Presets of the one SAM core, named after their papers. Each is ``SAM`` with a policy and/or
descent modifiers; every other SAM option (``adaptive``, ``renormalize``, ``backend``, ...) still
applies, which is how variants compose (e.g. ``SSSAM(..., renormalize=True)``).
"""
from __future__ import annotations

from typing import Optional

from .descent import LookSAMReuse
from .policy import AdaptivePolicy, PeriodicPolicy, ScheduledPolicy
from .sam import SAM


class SSSAM(SAM):
    """SS-SAM: random SAM/plain steps, SAM with probability p_t from a schedule (see ScheduledPolicy).

    ``schedule``: "constant" (``p``, default 0.6 as in the authors' example), "piecewise"
    (``p_start`` before ``s_switch``, then ``p_end``), "linear", "trigonometric"; non-constant
    schedules need ``total_steps``. ``seed`` makes the draws reproducible.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, schedule: str = "constant", p: float = 0.6,
                 p_start: Optional[float] = None, p_end: Optional[float] = None, s_switch: float = 0.5,
                 total_steps: Optional[int] = None, seed: Optional[int] = None, **kwargs):
        policy = ScheduledPolicy(schedule, p, p_start=p_start, p_end=p_end, s_switch=s_switch,
                                 total_steps=total_steps, seed=seed)
        super().__init__(params, base_optimizer, rho, policy=policy, **kwargs)


class StableSAM(SAM):
    """Stable SAM: SAM whose descent gradient is rescaled to the ascent gradient's norm."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs):
        kwargs["renormalize"] = True
        super().__init__(params, base_optimizer, rho, **kwargs)


class LookSAM(SAM):
    """LookSAM: a SAM step every ``k`` steps storing g_v; in between g + alpha·(‖g‖/‖g_v‖)·g_v."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, k: int = 5, alpha: float = 0.7, **kwargs):
        modifiers = list(kwargs.pop("modifiers", ())) + [LookSAMReuse(alpha)]
        super().__init__(params, base_optimizer, rho, policy=PeriodicPolicy(k), modifiers=modifiers, **kwargs)


class AESAM(SAM):
    """AE-SAM: SAM step only when ‖g‖² is large relative to its running mean and spread.

    ``decay`` (EMA factor), ``l1``/``l2`` (bounds of c_t) are options whose paper defaults were not
    verified; ``total_steps`` sets the progress t/T of c_t. One host sync per step (the decision).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, total_steps: int, decay: float = 0.9,
                 l1: float = -1.0, l2: float = 1.0, **kwargs):
        policy = AdaptivePolicy(total_steps, decay=decay, l1=l1, l2=l2)
        super().__init__(params, base_optimizer, rho, policy=policy, **kwargs)


class AELookSAM(AESAM):
    """AE-LookSAM: AE-SAM's decisions; non-SAM steps reuse LookSAM's stored component."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, total_steps: int, alpha: float = 0.7,
                 **kwargs):
        kwargs["modifiers"] = list(kwargs.pop("modifiers", ())) + [LookSAMReuse(alpha)]
        super().__init__(params, base_optimizer, rho, total_steps=total_steps, **kwargs)
