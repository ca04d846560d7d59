"""Descent modifiers that mix the first-pass gradient g(w) into the descent of a SAM step: GSAM's
surrogate-gap term and WSAM's weighted sharpness.

Both keep a copy of g(w) from ``first_step`` to the descent (``sam.state[p]["first_grad"]``, saved
in a mid-step checkpoint) and the loss scale it carried. Under AMP the two passes may carry
different scales (``scaler.unscale_`` on one pass only), so g(w) is brought to the descent
gradient's units with k = S2/S1 before it is mixed in (k = 1 without AMP); norms and dots are
taken in unscaled units, as the papers' code does in fp32. A param with a descent gradient but no
copy (no first-pass gradient) counts as g(w) = 0, as in pytorch-optimizer.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..ops.dtensor import is_dtensor
from . import aliases
from .compiled import hyper
from .descent import Modifier

KEY = "first_grad"


def local(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensors (FSDP2), views that element-wise ops write through; others as they are.
    The global reductions come from ``sam_kernels.ops``, which all-reduce them over the mesh."""
    return [t.to_local() if is_dtensor(t) else t for t in ts]


def _ratio(s1: Optional[torch.Tensor], s2: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """S2/S1 as a 0-dim fp32 tensor on ``device`` (None when both passes are unscaled)."""
    if s1 is None and s2 is None:
        return None
    one = torch.ones((), dtype=torch.float32, device=device)
    num = one if s2 is None else s2.to(device, torch.float32)
    return num / (one if s1 is None else s1.to(device, torch.float32))


def _unpaired(grads: list[torch.Tensor], at: list[int]) -> list[torch.Tensor]:
    """The grads whose position is not in ``at`` (by position: an id() would guard a compiled step)."""
    paired = set(at)
    return [g for i, g in enumerate(grads) if i not in paired]


class KeepsFirstGrad(Modifier):
    """Base of the mixing modifiers: the copy of g(w) and its loss scale S1.

    The copies live in ``sam.state[p]["first_grad"]`` and are reused from step to step (a fresh
    allocation per step costs page faults on the CPU); which of them hold this step's g(w) is kept
    by position in the flat parameter list (``_fresh``, saved with a mid-step checkpoint)."""

    transient_keys = (KEY,)

    def __init__(self):
        self._scale1: Optional[torch.Tensor] = None
        self._fresh: Optional[list[int]] = None

    def after_ascent(self, sam, params, grads, sq_norm):
        self._fresh = None
        if any(not g.get("perturb", True) for g in sam.param_groups):
            # their g(w) would count as 0 in the mix: WSAM's decoupled base step would see no gradient
            raise ValueError(f"{type(sam).__name__}: param groups with perturb=False (SAM-ON) are not supported "
                             f"with {type(self).__name__}: the descent mixes in g(w) of every parameter; perturb "
                             f"all groups, or use SAM for SAM-ON")
        if not grads:
            return
        copies = []
        for p, g in zip(params, grads):
            c = sam.state[p].get(KEY)
            if c is None or c.shape != g.shape or c.dtype != g.dtype or c.device != g.device or c.stride() != g.stride():
                c = sam.state[p][KEY] = torch.empty_like(g, memory_format=torch.preserve_format)
            copies.append(c)
        ops.restore_(copies, grads, backend=sam.backend)  # a bitwise list copy that also takes DTensors
        position = {id(p): i for i, p in enumerate(q for group in sam.param_groups for q in group["params"])}
        self._fresh = [position[id(p)] for p in params]
        scale = sam.loss_scale
        self._scale1 = None if scale is None else scale.detach().clone()

    def first_grads(self, sam, params):
        return [sam.state[p].get(KEY) for p in params] if self._fresh is not None else None

    def _pairs(self, sam, params, grads):
        """(positions in ``grads`` that have this step's copy of g(w), those copies, the grads they pair
        with, k = S2/S1 or None); the copies are this step's no longer."""
        fresh = set(self._fresh or ())
        position = {id(p): i for i, p in enumerate(q for group in sam.param_groups for q in group["params"])}
        at, firsts, seconds = [], [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            c = sam.state[p].get(KEY) if position[id(p)] in fresh else None
            if c is not None and c.shape == g.shape:
                if c.dtype != g.dtype or c.device != g.device:  # the param was cast mid-step
                    c = sam.state[p][KEY] = c.to(dtype=g.dtype, device=g.device)
                at.append(i)
                firsts.append(c)
                seconds.append(g)
        k = _ratio(self._scale1, sam.loss_scale, grads[0].device) if grads else None
        self._scale1, self._fresh = None, None
        return at, firsts, seconds, k

    def state_dict(self) -> dict:
        return {"scale1": self._scale1, "fresh": self._fresh}

    def load_state_dict(self, state: dict) -> None:
        self._scale1, self._fresh = state.get("scale1"), state.get("fresh")


class SurrogateGap(KeepsFirstGrad):
    """GSAM (Zhuang et al., ICLR 2022; official code juntang-zhuang/GSAM, ``gsam/gsam.py``,
    ``gradient_decompose``): with g1 = g(w), g2 = g(w + e), global dot and norms,

        cos = ⟨g1, g2⟩/(‖g2‖·‖g1‖ + eps),  v = g1 − cos·‖g1‖·g2/(‖g2‖ + eps),  d = g2 − alpha·v

    (v: the component of g1 orthogonal to g2; eps 1e-12, the code's ``perturb_eps``). The descent
    uses d. Computed as d = (1 + alpha·c)·g2 − alpha·k·g1 with c = cos·‖g1‖/(‖g2‖ + eps) in unscaled
    units, in one fused pass (``ops.mix_``). Cost per SAM step: the copy of g1 in ``first_step``, one
    reduction ⟨g1, g2⟩ (‖g1‖² is the ascent's own, except with ASAM, whose ascent norm is ‖T⊙g1‖;
    ‖g2‖² the descent's own when the finite check or telemetry took it) and the mix pass; no memory
    beyond the copy of g1.
    """

    def __init__(self, alpha: float = 0.4, eps: float = 1e-12):
        super().__init__()
        self.alpha, self.eps = alpha, eps
        self._sq1: Optional[torch.Tensor] = None  # ‖g1‖² (unscaled) from the ascent, when it is the plain norm
        self._count1 = 0  # the number of tensors it is over

    def after_ascent(self, sam, params, grads, sq_norm):
        super().after_ascent(sam, params, grads, sq_norm)
        # the ascent's norm is ‖g1‖² over exactly these grads unless ASAM weights it (‖T⊙g‖²)
        plain = sq_norm is not None and not any(g["adaptive"] for g in sam.param_groups)
        self._sq1, self._count1 = (sq_norm.detach(), len(grads)) if plain else (None, 0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sq1": self._sq1, "count1": self._count1}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._sq1, self._count1 = state.get("sq1"), state.get("count1", 0)

    def before_descent(self, sam, params, grads, sam_step, sq_norm):
        if not sam_step or not grads:
            return sq_norm
        at, g1, g2, k = self._pairs(sam, params, grads)
        sq1, self._sq1 = (self._sq1 if len(g1) == self._count1 else None), None
        n2 = sq_norm if sq_norm is not None else ops.grad_sq_norm(grads, backend=sam.backend)
        dev = grads[0].device
        n2 = n2.to(dev, torch.float64 if grads[0].dtype == torch.float64 else torch.float32)
        s2 = sam.loss_scale
        if g1:
            dot = ops.dot(g1, g2, backend=sam.backend).to(dev, n2.dtype)
            n1 = ops.grad_sq_norm(g1, backend=sam.backend).to(dev, n2.dtype) if sq1 is None else None
        else:
            dot = n1 = torch.zeros((), dtype=n2.dtype, device=dev)
        # unscaled: g2 = S2·u2, g1 = S1·u1 (k = S2/S1)
        if s2 is not None:
            s2 = s2.to(dev, n2.dtype)
            kk = k.to(n2.dtype)
            dot, n2 = dot / (s2 * s2 / kk), n2 / (s2 * s2)
            if n1 is not None:
                n1 = n1 / ((s2 / kk) * (s2 / kk))
        elif k is not None:  # the second pass was unscaled, the first not: g1 = S1·u1, k = 1/S1
            kk = k.to(n2.dtype)
            dot = dot * kk
            if n1 is not None:
                n1 = n1 * kk * kk
        if n1 is None:  # the ascent's own ‖g1‖², already unscaled: no pass over g1
            n1 = sq1.to(dev, n2.dtype)
        norm1, norm2 = n1.sqrt(), n2.sqrt()
        cos = dot / (norm2 * norm1 + self.eps)
        coef = 1 + self.alpha * cos * norm1 / (norm2 + self.eps)
        if g1:  # one fused pass: g2 ← coef·g2 − alpha·k·g1
            ops.mix_(g2, g1, coef, -self.alpha if k is None else -self.alpha * k, backend=sam.backend)
        rest = _unpaired(grads, at)
        if rest:
            torch._foreach_mul_(local(rest), coef)
        return None


class WeightedSharpness(KeepsFirstGrad):
    """WSAM (Yue et al., KDD 2023; official code intelligent-machine-learning/dlrover,
    ``atorch/atorch/optimizers/wsam.py``, ``WeightedSAM.second_step``): the loss L(w) +
    a·(L(w + e) − L(w)) with a = gamma/(1 − gamma), g1 = g(w), g2 = g(w + e).

    - ``decouple=True`` (the official default): the base step takes g1, then w ← w − lr·a·(g2 − g1)
      (each group's lr; the sharpness term bypasses the base optimizer's momentum and adaptivity);
    - ``decouple=False``: the base step takes a·g2 + (1 − a)·g1.

    Under AMP an overflowed step leaves the weights alone in both forms. Cost per SAM step, beyond
    the copy of g1 in ``first_step``: coupled one fused pass (``ops.mix_``); decoupled two (g1 − g2 is
    formed in the copy of g1, and g2 + (g1 − g2) gives the base step g1 to one rounding) and one pass
    over the weights after the base step; no memory beyond the copy of g1.
    """

    def __init__(self, gamma: float = 0.9, decouple: bool = True):
        super().__init__()
        self.gamma, self.decouple = gamma, decouple
        self.a = gamma / (1 - gamma)
        self._sharpness: Optional[tuple[list, list, Optional[torch.Tensor]]] = None

    def before_descent(self, sam, params, grads, sam_step, sq_norm):
        if not sam_step or not grads:
            return sq_norm
        at, g1, g2, k = self._pairs(sam, params, grads)
        k1 = 1.0 if k is None else k  # g1 in the descent gradient's units: k·g1
        if not self.decouple:
            if g1:  # one fused pass: g2 ← a·g2 + (1 − a)·k·g1
                ops.mix_(g2, g1, self.a, (1 - self.a) * k1, backend=sam.backend)
            rest = _unpaired(grads, at)
            if rest:
                torch._foreach_mul_(local(rest), self.a)
            return None
        # m = k·g1 − g2 = −(the sharpness gradient), in the copies of g1 (no new memory), kept for
        # after_descent; the base step takes g2 + m = k·g1 (to one rounding; 0 where there is no g1)
        if g1:
            ops.mix_(g1, g2, k1, -1.0, backend=sam.backend)
            ops.mix_(g2, g1, 1.0, 1.0, backend=sam.backend)
        # positions, not ids: an id() of a gradient would become a guard of a compiled step
        paired = set(at)
        others = [i for i in range(len(grads)) if i not in paired]
        rest = [grads[i] for i in others]
        minus_rest = list(torch._foreach_neg(local(rest))) if rest else []
        if rest:
            torch._foreach_zero_(local(rest))
        ps = [params[i] for i in at + others]
        scale = sam.loss_scale
        self._sharpness = (ps, local(g1) + minus_rest, None if scale is None else scale.detach().clone())
        return None

    def after_descent(self, sam, found_inf):
        if self._sharpness is None:
            return
        ps, minus, scale = self._sharpness
        self._sharpness = None
        if not ps:
            return
        # by param group (its lr) and alias layer; positions, not lr values: a compiled step reads each
        # lr as a tensor (:func:`.compiled.hyper`), and a float compared here would become a guard
        group_of = {id(p): i for i, g in enumerate(sam.param_groups) for p in g["params"]}
        layer = aliases.layers(ps, sam.step_state.aliases)  # entries over one memory: one after the other
        by_lr: dict = {}
        for i, p in enumerate(ps):
            gi = group_of[id(p)]
            by_lr.setdefault((gi, layer[i] if layer else 0), (hyper(sam, sam.param_groups[gi], "lr"), []))[1].append(i)
        for lr, idx in by_lr.values():
            ws, ss = local([ps[i] for i in idx]), [minus[i] for i in idx]
            if scale is None and found_inf is None and not isinstance(lr, torch.Tensor):
                torch._foreach_add_(ws, ss, alpha=lr * self.a)
                continue
            coef = lr * self.a if not isinstance(lr, torch.Tensor) else lr.detach() * self.a
            coef = torch.as_tensor(coef, dtype=torch.float32, device=ws[0].device)
            if scale is not None:
                coef = coef / scale.to(coef.device, torch.float32)
            torch._foreach_mul_(ss, coef.to(torch.float64) if ss[0].dtype == torch.float64 else coef)
            if found_inf is None:
                torch._foreach_add_(ws, ss)
            else:
                skip = found_inf.to(ws[0].device).ne(0)
                for w, s in zip(ws, ss):  # an overflowed step moves nothing (s may hold Inf: no 0·Inf)
                    w.add_(torch.where(skip, torch.zeros((), dtype=s.dtype, device=s.device), s))
