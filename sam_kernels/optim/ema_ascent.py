"""SAM variants that perturb along an exponential moving average (EMA) of the first-pass gradients:
Friendly-SAM (Li et al., CVPR 2024) and VaSSO (Li and Giannakis, NeurIPS 2023).

Both keep one EMA buffer per parameter in ``self.state[p]`` (the parameter's dtype, layout and
device; saved by ``state_dict``) and plug into the SAM step through ``SAM.ascent_direction``: the
norm, the perturbation, the backups, AMP, masks, policies and the descent are SAM's own. The EMA
update runs on the device with 0-dim coefficient tensors (no host sync); under AMP it divides the
loss scale out and an overflowed first pass leaves the EMA as it was.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..ops.dtensor import is_dtensor
from .sam import SAM


def _refuse_sparse(name: str, grads: list[torch.Tensor]) -> None:
    if any(g.is_sparse for g in grads):
        raise TypeError(f"{name}: sparse gradients are not supported (its EMA buffer is dense); use dense "
                        "gradients (nn.Embedding(sparse=False)) or SAM")


def _local(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensors (FSDP2): the EMA maths is element-wise, each rank does its shard."""
    return [t.to_local() if is_dtensor(t) else t for t in ts]


def _keep_flag(found: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """1.0 where this pass overflowed (AMP's ``found_inf``), else 0.0: a 0-dim device tensor."""
    if found is None:
        return torch.zeros((), dtype=torch.float32, device=like.device)
    return found.to(like.device, torch.float32).clamp(0, 1)


def _by_device(idx: list[int], tensors: list[torch.Tensor]) -> dict:
    out: dict = {}
    for i in idx:
        out.setdefault((tensors[i].device, tensors[i].dtype), []).append(i)
    return out


def ema_update_(emas: list[torch.Tensor], grads: list[torch.Tensor], new: list[bool], weight: float,
                scale: Optional[torch.Tensor], found: Optional[torch.Tensor]) -> None:
    """m ← (1 − weight)·m + weight·g/S for each EMA m (a new one, all zeros: m ← g/S); unchanged when
    ``found`` (0-dim, non-zero: the pass overflowed). ``scale``: the loss scale S the grads carry."""
    emas, grads = _local(emas), _local(grads)
    if scale is None and found is None:  # one pass per tensor: m ← m + weight·(g − m)
        for is_new in (False, True):
            part = [i for i in range(len(emas)) if new[i] == is_new]
            if part:
                (torch._foreach_copy_ if is_new else functools.partial(torch._foreach_lerp_, weight=weight))(
                    [emas[i] for i in part], [grads[i] for i in part])
        return
    for (device, _), idx in _by_device(list(range(len(emas))), emas).items():
        ref = emas[idx[0]]
        keep = _keep_flag(found, ref)
        inv = torch.ones((), dtype=torch.float32, device=device) if scale is None else \
            scale.to(device, torch.float32).reciprocal()
        for is_new in (False, True):
            part = [i for i in idx if new[i] == is_new]
            if not part:
                continue
            w = 1.0 if is_new else weight
            a = keep + (1 - keep) * (1 - w)   # the old EMA's factor (1 when the pass overflowed)
            b = (1 - keep) * w * inv          # the new gradient's
            ms = [emas[i] for i in part]
            if found is None:  # unscaled here: g/S with S the loss scale
                torch._foreach_mul_(ms, a)
                torch._foreach_add_(ms, torch._foreach_mul([grads[i] for i in part], b))
            else:  # an overflowed g is Inf/NaN: 0·g would be NaN, so the old m is selected, not weighted
                fresh = torch._foreach_add(torch._foreach_mul(ms, a), torch._foreach_mul([grads[i] for i in part], b))
                skip = keep.bool()
                for m, n in zip(ms, fresh):
                    torch.where(skip, m, n, out=m)


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
        # d = g − sigma·S·m (S: the loss scale g carries, so d carries it too); a new m is 0: d = g
        ld, lg, lm = _local(dirs), _local(grads), _local(emas)
        for (device, _), idx in _by_device(list(range(len(params))), ld).items():
            old = [i for i in idx if not new[i]]
            torch._foreach_copy_([ld[i] for i in idx], [lg[i] for i in idx])
            if old and self.sigma and scale is None:
                torch._foreach_add_([ld[i] for i in old], [lm[i] for i in old], alpha=-self.sigma)
            elif old and self.sigma:
                c = scale.to(device, torch.float32) * -self.sigma
                torch._foreach_add_([ld[i] for i in old], torch._foreach_mul([lm[i] for i in old], c))
        ema_update_(emas, grads, new, 1.0 - self.lmbda, scale, self.step_state.found)
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
        ema_update_(emas, grads, new, self.theta, scale, self.step_state.found)
        return emas, None  # the EMA is unscaled
