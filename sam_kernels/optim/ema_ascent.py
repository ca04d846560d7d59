"""SAM variants that perturb along an exponential moving average (EMA) of the first-pass gradients:
Friendly-SAM (Li et al., CVPR 2024) and VaSSO (Li and Giannakis, NeurIPS 2023).

Both keep one EMA buffer per parameter in ``self.state[p]`` (the parameter's dtype, layout and
device; saved by ``state_dict``) and plug into the SAM step through ``SAM.ascent_direction``: the
norm, the perturbation, the backups, AMP, masks, policies and the descent are SAM's own. The EMA
update (and Friendly-SAM's direction) is one fused pass, ``ops.ema_update_`` (no host sync); under
AMP it divides the loss scale out and an overflowed first pass leaves the EMA as it was.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .sam import SAM


def _refuse_sparse(name: str, grads: list[torch.Tensor]) -> None:
    if any(g.is_sparse for g in grads):
        raise TypeError(f"{name}: sparse gradients are not supported (its EMA buffer is dense); use dense "
                        "gradients (nn.Embedding(sparse=False)) or SAM")


def _update(sam: SAM, emas: list[torch.Tensor], grads: list[torch.Tensor], new: list[bool], weight: float,
            sigma: float, directions: Optional[list[torch.Tensor]], scale: Optional[torch.Tensor]) -> None:
    """``ops.ema_update_`` over the params' EMAs: a new (zero) one takes its first observation
    (weight 1, sigma 0: m ← g/S, d ← g), the others ``weight`` and ``sigma``."""
    for first in (False, True):
        idx = [i for i, n in enumerate(new) if n == first]
        if not idx:
            continue
        pick = (lambda xs: xs) if len(idx) == len(new) else (lambda xs: [xs[i] for i in idx])
        ops.ema_update_(pick(emas), pick(grads), weight=1.0 if first else weight, sigma=0.0 if first else sigma,
                        directions=None if directions is None else pick(directions), grad_scale=scale,
                        found_inf=sam.step_state.found, backend=sam.backend)


class FriendlySAM(SAM):
    """Friendly-SAM (F-SAM; Li, Zhou, Zhang, Zhou, Liu, Huang and Huang, "Friendly Sharpness-Aware
    Minimization", CVPR 2024; official code github.com/nblt/F-SAM, ``utils.py``, class FriendlySAM).

    The ascent removes the full-batch component of the gradient, estimated by an EMA m of past
    first-pass gradients g(w), and keeps its batch-specific noise:

        d = g − sigma·m ;   m ← lmbda·m + (1 − lmbda)·g ;   e = rho·d/(‖d‖ + 1e-12)

    with m taken before its update (as the official code: use, then update), one global norm over
    all parameters (ASAM: e = rho·T²·d/‖T⊙d‖, T = |w| + eta; the official code has eta = 0). A
    parameter's first SAM step sets m ← g and ascends along g itself (official). The descent is
    SAM's (base step at w with g(w + e)); plain steps of a policy do not touch m.

    Args: as :class:`~sam_kernels.optim.sam.SAM`, plus ``sigma`` (>= 0, default 1.0) and ``lmbda``
    (in [0, 1), default 0.9; the authors' CIFAR runs use 0.6–0.95). Costs (ours): one buffer m and
    one scratch buffer d per parameter (fp32 params: 8 bytes per weight); the EMA pass reads g and m
    and writes d and m. Under AMP an overflowed first pass leaves m unchanged (ours; after an
    overflow on a parameter's very first step its m starts from zeros). Raises ``ValueError`` for
    a sigma/lmbda out of range or ``ascent_steps`` > 1.
    """

    transient_state_keys = ("fsam_direction",)

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, sigma: float = 1.0, lmbda: float = 0.9,
                 **kwargs):
        if not (isinstance(sigma, (int, float)) and 0.0 <= sigma < float("inf")):
            raise ValueError(f"FriendlySAM: sigma must be a finite number >= 0, got {sigma!r}")
        if not (isinstance(lmbda, (int, float)) and 0.0 <= lmbda < 1.0):
            raise ValueError(f"FriendlySAM: lmbda must be in [0, 1), got {lmbda!r}")
        self.sigma, self.lmbda = float(sigma), float(lmbda)
        super().__init__(params, base_optimizer, rho, **kwargs)

    def ascent_direction(self, params, grads, scale):
        _refuse_sparse("FriendlySAM", grads)
        new = ["fsam_ema" not in self.state[p] for p in params]
        emas, dirs = [], []
        for p, g, is_new in zip(params, grads, new):
            st = self.state[p]
            if is_new:
                st["fsam_ema"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            d = st.get("fsam_direction")
            if d is None or d.shape != g.shape or d.dtype != g.dtype or d.device != g.device:
                d = st["fsam_direction"] = torch.empty_like(g, memory_format=torch.preserve_format)
            emas.append(st["fsam_ema"])
            dirs.append(d)
        # d = g − sigma·S·m carries the loss scale S of g; m stores g/S
        _update(self, emas, grads, new, 1.0 - self.lmbda, self.sigma, dirs, scale)
        return dirs, scale


class VaSSO(SAM):
    """VaSSO (variance suppressed sharpness-aware optimization; Li and Giannakis, "Enhancing
    Sharpness-Aware Optimization Through Variance Suppression", NeurIPS 2023; official code
    github.com/BingcongLi/VaSSO, ``solver/vasso.py``, class VASSO).

    The ascent follows an EMA d of the first-pass gradients g(w), updated before it is used:

        d ← (1 − theta)·d + theta·g ;   e = rho·d/(‖d‖ + eps)

    (the first SAM step sets d ← g), one global norm over all parameters (ASAM: T²·d/‖T⊙d‖, ours:
    the official code has no ASAM form). ``eps`` defaults to the official code's 1e-7. The descent
    is SAM's, from the backup of w (the official code subtracts e again, which is not bitwise).

    Args: as :class:`~sam_kernels.optim.sam.SAM`, plus ``theta`` in (0, 1] (default 0.4; the
    authors' script and argparse default use 0.9) and ``eps``. Costs (ours): one buffer d per
    parameter; the EMA pass reads g and d and writes d. Under AMP an overflowed first pass leaves d
    unchanged (ours). Raises ``ValueError`` for theta or eps out of range or ``ascent_steps`` > 1.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, theta: float = 0.4, eps: float = 1e-7,
                 **kwargs):
        if not (isinstance(theta, (int, float)) and 0.0 < theta <= 1.0):
            raise ValueError(f"VaSSO: theta must be in (0, 1], got {theta!r}")
        if not (isinstance(eps, (int, float)) and 0.0 <= eps < float("inf")):
            raise ValueError(f"VaSSO: eps must be a finite number >= 0, got {eps!r}")
        self.theta, self.eps = float(theta), float(eps)
        super().__init__(params, base_optimizer, rho, **kwargs)

    def perturbation_options(self, params, grads):
        return {"eps": self.eps}

    def ascent_direction(self, params, grads, scale):
        _refuse_sparse("VaSSO", grads)
        new = ["vasso_ema" not in self.state[p] for p in params]
        for p, g, is_new in zip(params, grads, new):
            if is_new:
                self.state[p]["vasso_ema"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        emas = [self.state[p]["vasso_ema"] for p in params]
        _update(self, emas, grads, new, self.theta, 0.0, None, scale)
        return emas, None  # the EMA is unscaled
