"""Presets of the one SAM core, named after their papers. Each is ``SAM`` with a policy and/or
descent modifiers; every other SAM option (``adaptive``, ``renormalize``, ``backend``, ...) still
applies, which is how variants compose (e.g. ``SSSAM(..., renormalize=True)``).
"""
from __future__ import annotations

from typing import Optional

from .descent import LookSAMReuse
from .mixing import SurrogateGap, WeightedSharpness
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


def _refuse_per_replica(distributed, name: str) -> None:
    if distributed == "m-sam" or type(distributed).__name__ == "PerReplica":
        raise ValueError(f"{name}: distributed='m-sam' is not supported: the descent mixes g(w), which m-SAM leaves "
                         f"different on each replica, into the synchronized g(w + e), so replicas would drift apart; "
                         f"use distributed='global' (both backwards synchronized)")


class GSAM(SAM):
    """GSAM, surrogate gap guided SAM (Zhuang et al., "Surrogate Gap Minimization Improves
    Sharpness-Aware Training", ICLR 2022; official code juntang-zhuang/GSAM, ``gsam/gsam.py``).

    Ascent as SAM: e = rho·g/(‖g‖ + 1e-12); with ``adaptive=True`` e = rho·w²·g/‖|w|·g‖ (the
    official code's form: ``eta`` defaults to 0 here, unlike SAM's 0.01). Descent with
    d = g2 − alpha·v, v = g1 − cos(g1, g2)·‖g1‖·g2/‖g2‖ the component of g1 = g(w) orthogonal to
    g2 = g(w + e) (exact form and epsilons: :class:`~sam_kernels.optim.mixing.SurrogateGap`).
    The paper ties rho to the lr schedule: :class:`~sam_kernels.optim.rho_schedule.ProportionalRho`.

    Args: as :class:`SAM`, plus ``alpha`` (the surrogate-gap weight, 0.4 as the official examples).
    Raises ``ValueError`` for ``distributed="m-sam"`` (g(w) would differ per replica).
    Extra memory: one copy of the gradients (a buffer reused from step to step).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False,
                 *, eta: float = 0.0, **kwargs):
        _refuse_per_replica(kwargs.get("distributed"), type(self).__name__)
        self.alpha = alpha
        kwargs["modifiers"] = list(kwargs.pop("modifiers", ())) + [SurrogateGap(alpha)]
        super().__init__(params, base_optimizer, rho, adaptive, eta=eta, **kwargs)


class WSAM(SAM):
    """WSAM, weighted SAM (Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term", KDD 2023; official code intelligent-machine-learning/dlrover,
    ``atorch/atorch/optimizers/wsam.py``): minimizes L(w) + a·(L(w + e) − L(w)), a = gamma/(1 − gamma).

    ``decouple=True`` (the official default): the base optimizer steps with g(w), then
    w ← w − lr·a·(g(w + e) − g(w)); ``decouple=False``: the base step takes a·g(w + e) + (1 − a)·g(w).
    Details: :class:`~sam_kernels.optim.mixing.WeightedSharpness`. The official class also clips both
    passes at ``max_norm`` (its default 1.0; its README example None): clip in the training loop instead.

    Args: as :class:`SAM`, plus ``gamma`` in [0, 1) (0.9; gamma = 0.5 is SAM) and ``decouple``.
    Raises ``ValueError`` for gamma outside [0, 1) and for ``distributed="m-sam"``.
    Extra memory: one copy of the gradients (a buffer reused from step to step).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, gamma: float = 0.9, *, decouple: bool = True,
                 **kwargs):
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"WSAM: gamma must be in [0, 1), got {gamma}")
        _refuse_per_replica(kwargs.get("distributed"), type(self).__name__)
        self.gamma, self.decouple = gamma, decouple
        kwargs["modifiers"] = list(kwargs.pop("modifiers", ())) + [WeightedSharpness(gamma, decouple)]
        super().__init__(params, base_optimizer, rho, **kwargs)
