"""Descent modifiers: change the gradients after the restore and before the base step.

A modifier may change the first-pass gradients before the ascent reads them (``before_ascent``),
sees them once the ascent norm is known (``after_ascent``), then the gradients the base step will
use (``before_descent``, on SAM and on plain steps), and may move the weights after the base step
of a SAM step (``after_descent``). Modifiers run on device tensors: no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from . import groups


class Modifier:
    """No-op base class; every hook is optional.

    ``transient_keys``: per-parameter entries of ``sam.state`` that only live from ``first_step``
    to the descent (scratch buffers); ``SAM.state_dict`` leaves them out between steps.
    """

    transient_keys: tuple[str, ...] = ()

    def before_ascent(self, sam, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Called in ``first_step`` before the ascent norm: may change the first-pass ``grads`` in place."""

    def after_ascent(self, sam, params: list[torch.Tensor], grads: list[torch.Tensor], sq_norm: torch.Tensor) -> None:
        """Called in ``first_step`` with the first-pass grads and their (ASAM-weighted) squared norm."""

    def before_descent(self, sam, params: list[torch.Tensor], grads: list[torch.Tensor], sam_step: bool,
                       sq_norm: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Modify ``grads`` in place before the base step; may return the new squared norm."""
        return sq_norm

    def after_descent(self, sam, found_inf: Optional[torch.Tensor]) -> None:
        """Called after the base step of a SAM step (weights at w, updated); ``found_inf``: the AMP
        overflow flag of the step (non-zero: the step was skipped), None without AMP."""

    def first_grads(self, sam, params: list[torch.Tensor]) -> Optional[list[torch.Tensor]]:
        """A copy of g(w) this modifier keeps for ``params`` until the descent (telemetry's cosine
        reads it instead of making its own), or None."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Renormalize(Modifier):
    """Stable SAM: g ← g(w+e)·‖g(w)‖/(‖g(w+e)‖ + eps), both norms global over all parameters.

    ‖g(w)‖ is the norm first_step already computed, ‖g(w+e)‖ the one the descent hands over when it
    has it (the finite check, telemetry). In ASAM mode both norms are of T⊙g (T = |w| + eta at the
    restored w). Cost on SAM steps: one scaling pass, plus one reduction unless ‖g(w+e)‖ was handed
    over (one more in ASAM mode); nothing on plain steps.
    """

    def __init__(self, eps: float = 1e-12):
        self.eps = eps
        self._ascent_sq: Optional[torch.Tensor] = None

    def after_ascent(self, sam, params, grads, sq_norm):
        self._ascent_sq = sq_norm

    def before_descent(self, sam, params, grads, sam_step, sq_norm):
        if not sam_step or self._ascent_sq is None or not grads:
            return sq_norm
        ref = self._ascent_sq  # unscaled ‖g(w)‖²; under AMP the descent grads carry the loss scale S: ref·S²
        scale = sam.loss_scale
        if scale is not None:
            ref = ref * scale.to(ref.device, ref.dtype).square()
        if any(g["adaptive"] for g in sam.param_groups):
            # ASAM: the ratio is ‖T⊙g(w)‖/‖T⊙g(w+e)‖ with T at the restored w. renormalize_ divides by
            # the plain ‖g(w+e)‖, so hand it ref·‖g‖²/‖T⊙g‖² (device maths, no sync; all-zero grads
            # keep ref, the result is 0 either way).
            now = sam.step_state
            weighted = groups.sq_norm([(group, p) for group in sam.param_groups for p in group["params"]
                                       if p.grad is not None], sam.backend,
                                      weights=now.restored)
            if sq_norm is None:
                sq_norm = ops.grad_sq_norm(grads, backend=sam.backend)
            plain = sq_norm.to(weighted.device)
            ref = torch.where(weighted > 0, ref.to(weighted.device) * plain / weighted, ref.to(weighted.device))
        sq = ops.renormalize_(grads, ref, sq_norm=sq_norm, eps=self.eps, backend=sam.backend)
        self._ascent_sq = None
        return sq

    def state_dict(self) -> dict:
        return {"ascent_sq": self._ascent_sq}

    def load_state_dict(self, state: dict) -> None:
        self._ascent_sq = state.get("ascent_sq")


class LookSAMReuse(Modifier):
    """LookSAM: on SAM steps store g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g (global dot and norm); on plain
    steps use g + alpha·(‖g‖/‖g_v‖)·g_v. The stored buffers live in ``sam.state[p]``.
    """

    transient_keys = ("looksam_g",)  # the first-pass g, needed only until second_step stores g_v

    def __init__(self, alpha: float = 0.7, eps: float = 1e-12):
        self.alpha, self.eps = alpha, eps

    def after_ascent(self, sam, params, grads, sq_norm):
        if not grads:  # nothing to keep (a step without gradients is a no-op, as in SAM)
            return
        firsts = []
        for p, g in zip(params, grads):
            st = sam.state[p]
            if "looksam_g" not in st:
                st["looksam_g"] = torch.empty_like(g, memory_format=torch.preserve_format)
            firsts.append(st["looksam_g"])
        ops.restore_(firsts, grads, backend=sam.backend)  # a bitwise list copy that also takes DTensors (FSDP2)

    def first_grads(self, sam, params):
        return [sam.state[p].get("looksam_g") for p in params]

    def before_descent(self, sam, params, grads, sam_step, sq_norm):
        if sam_step:
            pairs = [(p, g) for p, g in zip(params, grads) if "looksam_g" in sam.state[p]]
            if not pairs:
                return sq_norm
            gv = [sam.state[p].setdefault("looksam_gv", torch.zeros_like(g)) for p, g in pairs]
            found = sam.step_state.found  # AMP: an overflowed pass must not replace the stored g_v
            fresh = gv if found is None else [torch.empty_like(v) for v in gv]
            ops.looksam_store_(fresh, [sam.state[p]["looksam_g"] for p, _ in pairs], [g for _, g in pairs],
                               eps=self.eps, backend=sam.backend)
            if found is not None:
                skip = found.ne(0)
                for v, f in zip(gv, fresh):
                    torch.where(skip.to(v.device), v, f, out=v)
            return sq_norm
        pairs = [(g, sam.state[p]["looksam_gv"]) for p, g in zip(params, grads) if "looksam_gv" in sam.state[p]]
        if pairs:  # before the first SAM step there is nothing to reuse: a plain step
            ops.looksam_apply_([g for g, _ in pairs], [v for _, v in pairs], self.alpha, eps=self.eps,
                               backend=sam.backend)
        return None
