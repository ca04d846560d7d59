"""Step policies: when a step is a SAM step (two passes) and when it is a plain step (one pass).

A policy is asked once per step, after the first backward, through ``SAM.wants_sam()``. Its
random draws come from its own CPU ``torch.Generator`` (no device sync) and it carries its state
through ``state_dict`` so a resumed run makes the same decisions. Under ``torch.distributed`` the
generator's seed is rank 0's (:func:`~sam_kernels.optim.distributed.agreed_seed`), so every rank
makes the same decisions and runs the same number of backwards.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from . import amp, groups
from .distributed import agreed_seed


def grad_norm_for(policy: "Policy", sam) -> Optional[Callable[[], torch.Tensor]]:
    """What ``policy`` reads of ``sam``'s first-pass gradients (None when it reads none): a function
    giving their ‖g‖², unscaled and agreed across ranks (:mod:`.distributed`), as a 0-dim device tensor."""
    if not policy.needs_grad_norm:
        return None

    def sq_norm() -> torch.Tensor:
        grads = [p.grad for _, p in groups.with_grads(sam.param_groups)]
        if not grads:  # a step without gradients is a no-op; NaN: the policy learns nothing from it
            return torch.tensor(float("nan"))
        sq = sam.distributed.policy_sq_norm(sam, groups.grads_sq_norm(grads, sam.backend))
        return amp.unscaled(sq, sam.loss_scale)
    return sq_norm


class Policy:
    """Always a SAM step (plain SAM). Subclasses decide otherwise."""

    needs_grad_norm = False
    """True when ``decide`` reads ‖g‖² of the first-pass gradients (a 0-dim device tensor)."""

    def decide(self, step: int, grad_sq_norm: Optional[Callable[[], torch.Tensor]] = None) -> bool:
        return True

    def observe(self, step: int, grad_sq_norm: Optional[Callable[[], torch.Tensor]] = None) -> None:
        """A SAM step was forced (``first_step`` without ``wants_sam``): update statistics, no decision."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Seeded(Policy):
    def __init__(self, seed: Optional[int]):
        self.generator = torch.Generator()
        self.generator.manual_seed(agreed_seed(seed))  # distributed: rank 0's seed on every rank

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


SCHEDULES = ("constant", "piecewise", "linear", "trigonometric")


class ScheduledPolicy(_Seeded):
    """SS-SAM: each step is a SAM step with probability p_t (Bernoulli draw on a CPU generator).

    Schedules over progress s = t / total_steps (ours; the paper's exact formulas were not
    verified): constant p; piecewise p_start while s < s_switch, then p_end; linear
    p_start → p_end; trigonometric p_end + (p_start − p_end)·(1 + cos(pi·s))/2.
    Expected cost: 1 + mean(p_t) forward/backward passes per step.
    """

    def __init__(self, schedule: str = "constant", p: float = 0.6, *, p_start: Optional[float] = None,
                 p_end: Optional[float] = None, s_switch: float = 0.5, total_steps: Optional[int] = None,
                 seed: Optional[int] = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule != "constant" and (total_steps is None or total_steps <= 0):
            raise ValueError(f"schedule {schedule!r} needs total_steps > 0 (progress s = t / total_steps)")
        self.schedule, self.p, self.s_switch, self.total_steps = schedule, p, s_switch, total_steps
        self.p_start = p if p_start is None else p_start
        self.p_end = p if p_end is None else p_end
        for name, value in (("p", self.p), ("p_start", self.p_start), ("p_end", self.p_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        super().__init__(seed)

    def probability(self, step: int) -> float:
        """p_t for step ``step`` (0-based)."""
        if self.schedule == "constant":
            return self.p
        s = min(max(step / self.total_steps, 0.0), 1.0)
        if self.schedule == "piecewise":
            return self.p_start if s < self.s_switch else self.p_end
        if self.schedule == "linear":
            return self.p_start + (self.p_end - self.p_start) * s
        return self.p_end + (self.p_start - self.p_end) * (1 + math.cos(math.pi * s)) / 2

    def decide(self, step: int, grad_sq_norm=None) -> bool:
        return bool(torch.rand((), generator=self.generator) < self.probability(step))


class AdaptivePolicy(Policy):
    """AE-SAM: SAM step iff ‖g‖² ≥ mu + c_t·sqrt(var), with EMAs of ‖g‖² and of its variance.

    mu ← d·mu + (1−d)·‖g‖²;  var ← d·var + (1−d)·(‖g‖² − mu)² (with the new mu);
    c_t = (t/T)·l1 + (1 − t/T)·l2. The defaults d = 0.9, l1 = −1, l2 = 1 are unverified against the
    paper (options). Ours: the EMAs start at the first observation (mu = ‖g‖², var = 0), so the
    first step is a SAM step; a non-finite ‖g‖² is not folded in (one bad batch must not freeze the
    policy). mu and var stay 0-dim device tensors; reading the decision back is the one host sync
    per step this policy needs: it decides whether a second backward runs at all.
    """

    needs_grad_norm = True

    def __init__(self, total_steps: int, *, decay: float = 0.9, l1: float = -1.0, l2: float = 1.0):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.total_steps, self.decay, self.l1, self.l2 = total_steps, decay, l1, l2
        self.mu: Optional[torch.Tensor] = None
        self.var: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None  # count of finite observations

    def threshold_coef(self, step: int) -> float:
        s = min(max(step / self.total_steps, 0.0), 1.0)
        return s * self.l1 + (1 - s) * self.l2

    def update(self, step: int, sq: Union[torch.Tensor, float]) -> torch.Tensor:
        """Fold ‖g‖² = ``sq`` (a 0-dim tensor, or a float taken as float64) into the EMAs.

        Returns the decision as a 0-dim bool tensor on ``sq``'s device (nothing is read back here).
        """
        sq = sq.detach() if isinstance(sq, torch.Tensor) else torch.tensor(float(sq), dtype=torch.float64)
        if self.mu is None:
            self.mu, self.var, self.seen = torch.zeros_like(sq), torch.zeros_like(sq), torch.zeros_like(sq)
        d = self.decay
        first = self.seen == 0  # device-side, so the first FINITE observation starts the EMAs
        mu = torch.where(first, sq, d * self.mu + (1 - d) * sq)
        var = torch.where(first, torch.zeros_like(sq), d * self.var + (1 - d) * (sq - mu) ** 2)
        finite = torch.isfinite(sq)
        self.mu, self.var = torch.where(finite, mu, self.mu), torch.where(finite, var, self.var)
        self.seen = self.seen + finite.to(sq.dtype)
        return sq >= self.mu + self.threshold_coef(step) * self.var.sqrt()

    def observe(self, step: int, grad_sq_norm=None) -> None:
        self.update(step, grad_sq_norm())

    def decide(self, step: int, grad_sq_norm=None) -> bool:
        return bool(self.update(step, grad_sq_norm()))  # the documented host sync

    def state_dict(self) -> dict:
        return {"mu": self.mu, "var": self.var, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.mu, self.var, self.seen = (None if state[k] is None else state[k].clone() for k in ("mu", "var", "seen"))


class PeriodicPolicy(Policy):
    """LookSAM: a SAM step every ``k`` steps (steps 0, k, 2k, ...), plain/reuse steps between."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def decide(self, step: int, grad_sq_norm=None) -> bool:
        return step % self.k == 0


class LatePhasePolicy(Policy):
    """Late-phase SAM: plain base-optimizer steps first, SAM steps in the last ``fraction`` of training
    (Zhou et al., "Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late in Training",
    arXiv 2410.10373: switching from SGD to SAM late reaches the flat minima of full SAM).

    Step t (0-based, ``SAM.step_count``) is a SAM step iff t >= T − n_sam, with T = ``total_steps``
    and n_sam = floor(fraction·T + 1/2) (ours: the nearest whole number of steps); steps past T stay
    SAM steps. Cost: 1 + n_sam/T forward/backward passes per step. The base optimizer is the same
    object on both sides of the switch, so its state (momentum, Adam moments) carries over; the
    policy has no state of its own (the position is the optimizer's step count, which its
    ``state_dict`` keeps). No host sync: the decision reads only the step count.
    """

    def __init__(self, total_steps: int, fraction: float = 0.3):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be an int > 0, got {total_steps!r}")
        if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        self.total_steps, self.fraction = total_steps, float(fraction)
        self.switch_step = total_steps - math.floor(self.fraction * total_steps + 0.5)
        """The first SAM step (0-based)."""

    def decide(self, step: int, grad_sq_norm=None) -> bool:
        return step >= self.switch_step
