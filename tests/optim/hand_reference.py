"""One SAM-family step in plain float64 torch, transcribed from the papers' formulas (DESIGN.md §5).

Nothing here calls ``sam_kernels``: this is the oracle the loop matrix compares every variant,
loop and backend against. Decisions that are random or read from the data (SS-SAM's draw,
AE-SAM's threshold test, LookSAM's period, a mask, ESAM's tensor and sample selection) are
inputs: the test reads them from the optimizer under test and hands them over; the maths that
follows from them is this module's own.

Weights and gradients are lists of float64 tensors (one per parameter, in parameter order).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

EPS = 1e-12  # the denominators' epsilon of SAM (Foret et al.), Stable SAM and LookSAM

Grads = list[torch.Tensor]


def norm(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One global L2 norm over all tensors (0 over none: ESAM's step that selects no tensor)."""
    return torch.sqrt(sum(((t.double() ** 2).sum() for t in ts), torch.zeros((), dtype=torch.float64)))


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def clip(grads: Grads, max_norm: float) -> Grads:
    """torch.nn.utils.clip_grad_norm_'s rule: g·min(1, max_norm/(‖g‖ + 1e-6))."""
    coef = min(1.0, max_norm / (float(norm(grads)) + 1e-6))
    return [g * coef for g in grads]


# --------------------------------------------------------------------------- base optimizers

class HandSGD:
    """torch.optim.SGD: d = g + wd·w; buf = d (first step) else momentum·buf + (1 − dampening)·d; w −= lr·buf."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0):
        self.lr, self.momentum, self.wd, self.dampening = lr, momentum, weight_decay, dampening
        self.buf: Optional[Grads] = None

    def step(self, ws: Grads, grads: Grads) -> None:
        d = [g + self.wd * w for w, g in zip(ws, grads)]
        if self.momentum:
            if self.buf is None:
                self.buf = [x.clone() for x in d]
            else:
                self.buf = [self.momentum * b + (1 - self.dampening) * x for b, x in zip(self.buf, d)]
            d = self.buf
        for w, x in zip(ws, d):
            w.sub_(self.lr * x)


class HandAdamW:
    """Loshchilov & Hutter: w ·= 1 − lr·wd; m, v EMAs; w −= lr·m̂/(√v̂ + eps) with bias corrections."""

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.t, self.m, self.v = 0, None, None

    def step(self, ws: Grads, grads: Grads) -> None:
        if self.m is None:
            self.m = [torch.zeros_like(w) for w in ws]
            self.v = [torch.zeros_like(w) for w in ws]
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for w, g, m, v in zip(ws, grads, self.m, self.v):
            w.mul_(1 - self.lr * self.wd)
            m.mul_(self.b1).add_((1 - self.b1) * g)
            v.mul_(self.b2).add_((1 - self.b2) * g * g)
            w.sub_(self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps))


class HandAdagrad:
    """Duchi et al.: s += g²; w −= lr·g/(√s + eps) (no lr decay, no weight decay)."""

    def __init__(self, lr: float, eps: float = 1e-10):
        self.lr, self.eps, self.s = lr, eps, None

    def step(self, ws: Grads, grads: Grads) -> None:
        if self.s is None:
            self.s = [torch.zeros_like(w) for w in ws]
        for w, g, s in zip(ws, grads, self.s):
            s.add_(g * g)
            w.sub_(self.lr * g / (s.sqrt() + self.eps))


class HandASGD:
    """Polyak-averaged SGD as torch.optim.ASGD moves the weights (its average is not read here):
    w ·= 1 − lambd·eta; w −= eta·g; then eta = lr/(1 + lambd·lr·t)^alpha for the next step t + 1."""

    def __init__(self, lr: float, lambd: float = 1e-4, alpha: float = 0.75):
        self.lr, self.lambd, self.alpha = lr, lambd, alpha
        self.t, self.eta = 0, lr

    def step(self, ws: Grads, grads: Grads) -> None:
        self.t += 1
        for w, g in zip(ws, grads):
            w.mul_(1 - self.lambd * self.eta)
            w.sub_(self.eta * g)
        self.eta = self.lr / (1 + self.lambd * self.lr * self.t) ** self.alpha


BASES = {"sgd": HandSGD, "adamw": HandAdamW, "adagrad": HandAdagrad, "asgd": HandASGD}


# --------------------------------------------------------------------------- the SAM family

class HandSAM:
    """One reference run: weights ``ws`` (float64 copies, updated in place) and the variant's state.

    Options (each a paper's rule):
        rho, adaptive, eta: SAM e = rho·g/(‖g‖ + eps) (Foret et al. 2021); ASAM e = rho·T²·g/(‖T·g‖ + eps),
            T = |w| + eta (Kwon et al. 2021).
        renormalize: Stable SAM, g ← g(w+e)·‖g(w)‖/(‖g(w+e)‖ + eps) before the base step.
        looksam_alpha: LookSAM (Liu et al. 2022): SAM steps store g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g; other
            steps descend with g + alpha·(‖g‖/‖g_v‖)·g_v (plain g before the first SAM step).
        masked_norm: Sparse SAM (Mi et al. 2022) divides by ‖m ⊙ g‖ instead of the full ‖g‖.
        beta: ESAM's SWP (Du et al. 2022): e = rho·g/(‖g_sel‖·beta) on the selected tensors, 0 elsewhere.
        use_gc: GCSAM (Hassan et al. 2025): g(w) centralized (each tensor of more than one dimension
            minus its mean over dims 1..) before everything else reads it; e from the centralized norm.
        gsam_alpha: GSAM (Zhuang et al. 2022; official gsam/gsam.py, gradient_decompose): with
            cos = ⟨g1, g2⟩/(‖g2‖·‖g1‖ + eps), v = g1 − cos·‖g1‖·g2/(‖g2‖ + eps), descend with g2 − alpha·v.
        wsam_gamma, wsam_decouple: WSAM (Yue et al. 2023; official atorch/optimizers/wsam.py, second_step),
            a = gamma/(1 − gamma): coupled, descend with a·g2 + (1 − a)·g1; decoupled, the base step with
            g1, then w −= lr·a·(g2 − g1).
        perturbed: SAM-ON (Mueller et al. 2023, ``only_norm``): per tensor, whether it is perturbed; the
            others get e = 0 and are left out of the norm (as an unselected tensor of ESAM, without 1/beta).
        base: "sgd" | "adamw" | "adagrad" and its keyword arguments.
    """

    def __init__(self, ws: Grads, *, base: str, base_kwargs: dict, rho: float, adaptive: bool = False,
                 eta: float = 0.01, renormalize: bool = False, looksam_alpha: Optional[float] = None,
                 masked_norm: bool = False, beta: Optional[float] = None,
                 perturbed: Optional[Sequence[bool]] = None, use_gc: bool = False,
                 gsam_alpha: Optional[float] = None, wsam_gamma: Optional[float] = None, wsam_decouple: bool = True):
        self.ws = [w.detach().double().clone() for w in ws]
        self.base = BASES[base](**base_kwargs)
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.renormalize, self.alpha, self.masked_norm, self.beta = renormalize, looksam_alpha, masked_norm, beta
        self.gv: Optional[Grads] = None
        self.use_gc, self.gsam_alpha, self.wsam_gamma, self.wsam_decouple = use_gc, gsam_alpha, wsam_gamma, wsam_decouple
        self.perturbed = None if perturbed is None else list(perturbed)

    @property
    def lr(self) -> float:
        return self.base.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.base.lr = value

    def perturbation(self, g: Grads, masks: Optional[Sequence[torch.Tensor]] = None,
                     selected: Optional[Sequence[bool]] = None) -> Grads:
        """e(w) for the current weights and first-pass gradients ``g``."""
        t = [w.abs() + self.eta if self.adaptive else torch.ones_like(w) for w in self.ws]
        sel = [True] * len(g) if selected is None else list(selected)
        if self.perturbed is not None:
            sel = [s and p for s, p in zip(sel, self.perturbed)]
        m = [torch.ones_like(w) for w in self.ws] if masks is None else [mk.double() for mk in masks]
        tg = [ti * gi for ti, gi, s in zip(t, g, sel) if s]
        if self.masked_norm:
            tg = [ti * gi * mi for ti, gi, mi, s in zip(t, g, m, sel) if s]
        n = norm(tg)
        if self.beta is not None:
            n = n * self.beta
        return [self.rho * ti * ti * gi * mi / (n + EPS) if s else torch.zeros_like(gi)
                for ti, gi, mi, s in zip(t, g, m, sel)]

    def step(self, g1: Grads, g2_at: Optional[Callable[[Grads], Grads]], *, sam: bool,
             masks: Optional[Sequence[torch.Tensor]] = None, selected: Optional[Sequence[bool]] = None) -> None:
        """One optimizer step. ``g1``: the first-pass gradients at the current weights; ``g2_at(w + e)``:
        the second-pass gradients at the perturbed weights (called only on SAM steps)."""
        if not sam:
            g = g1
            if self.alpha is not None and self.gv is not None:
                scale = self.alpha * norm(g1) / (norm(self.gv) + EPS)
                g = [a + scale * v for a, v in zip(g1, self.gv)]
            self.base.step(self.ws, g)
            return
        if self.use_gc:
            g1 = [g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g for g in g1]
        e = self.perturbation(g1, masks, selected)
        g2 = g2_at([w + ei for w, ei in zip(self.ws, e)])
        if self.renormalize:
            ratio = norm(g1) / (norm(g2) + EPS)
            g2 = [g * ratio for g in g2]
        if self.alpha is not None:
            proj = dot(g1, g2) / (norm(g1) ** 2 + EPS)
            self.gv = [s - proj * g for g, s in zip(g1, g2)]
        if self.gsam_alpha is not None:
            inner, n1, n2 = dot(g1, g2), norm(g1), norm(g2)
            cosine = inner / (n2 * n1 + EPS)
            vertical = [a - cosine * n1 * b / (n2 + EPS) for a, b in zip(g1, g2)]
            g2 = [b - self.gsam_alpha * v for b, v in zip(g2, vertical)]
        if self.wsam_gamma is not None:
            a = self.wsam_gamma / (1 - self.wsam_gamma)
            if self.wsam_decouple:
                lr = self.lr
                self.base.step(self.ws, g1)
                for w, x, y in zip(self.ws, g1, g2):
                    w.sub_(lr * a * (y - x))
                return
            g2 = [a * y + (1 - a) * x for x, y in zip(g1, g2)]
        self.base.step(self.ws, g2)

    def skip(self, g1: Optional[Grads] = None) -> None:
        """An overflowed step under AMP: nothing changes (weights, base state, LookSAM's g_v). ``g1``: the
        first-pass gradients when only the second pass overflowed (variants whose state observes g(w))."""


def exp_lr(lr0: float, gamma: float, t: int) -> float:
    """ExponentialLR's learning rate after ``t`` scheduler steps."""
    return lr0 * gamma ** t




# --------------------------------------------------------------------------- bSAM

class HandBSAM:
    """bSAM (Moellenhoff and Khan 2023), transcribed from the official ``build_bsam_optimizer``
    (github.com/team-approx-bayes/bayesian-sam, optim.py), one sub-batch (msharpness = 1):

        noisy = w + sqrt(1/(N·s))·z;  g = ∇L(noisy);  e = rho·g/s;  g_e = ∇L(w + e)
        m = beta1·m + (1 − beta1)·(g_e + wd·w);  w = w − lr·m/s;  s = beta2·s + (1 − beta2)·(sqrt(s·g²) + damping + wd)

    z: the optimizer's documented draw, float32 ``torch.randn(shape, generator=...)`` per tensor in
    param-group order from a CPU generator seeded with ``seed`` (``draw_order``: the indices of ``ws``
    in that order, when the groups list them otherwise). ``perturbed``: SAM-ON's per-tensor flags
    (e = 0 where False). The first pass is taken at the noisy sample: ``step`` gets ``g1_at(ws)``.
    """

    first_pass_at_sample = True  # the harness hands ``step`` a gradient function for the first pass

    def __init__(self, ws: Grads, *, lr: float, num_data: float, rho: float, beta1: float = 0.9,
                 beta2: float = 0.999, weight_decay: float, damping: float = 0.1, s_init: float = 1.0, seed: int,
                 perturbed: Optional[Sequence[bool]] = None, draw_order: Optional[Sequence[int]] = None):
        self.ws = [w.detach().double().clone() for w in ws]
        self.order = list(range(len(self.ws))) if draw_order is None else list(draw_order)
        self.lr, self.n, self.rho, self.b1, self.b2 = lr, num_data, rho, beta1, beta2
        self.wd, self.damping = weight_decay, damping
        self.m = [torch.zeros_like(w) for w in self.ws]
        self.s = [torch.full_like(w, s_init) for w in self.ws]
        self.gen = torch.Generator().manual_seed(seed)
        self.perturbed = [True] * len(self.ws) if perturbed is None else list(perturbed)

    def noise(self) -> Grads:
        z = [None] * len(self.ws)
        for i in self.order:
            z[i] = torch.randn(self.ws[i].shape, dtype=torch.float32, generator=self.gen).double()
        return z

    def step(self, g1_at: Callable[[Grads], Grads], g2_at: Callable[[Grads], Grads], *, sam: bool = True) -> None:
        assert sam, "every bSAM step takes both passes"
        z = self.noise()
        g = g1_at([w + torch.sqrt(1.0 / (self.n * s)) * zi for w, s, zi in zip(self.ws, self.s, z)])
        e = [self.rho * gi / s if p else torch.zeros_like(gi) for gi, s, p in zip(g, self.s, self.perturbed)]
        ge = g2_at([w + ei for w, ei in zip(self.ws, e)])
        self.m = [self.b1 * m + (1 - self.b1) * (gi + self.wd * w) for m, gi, w in zip(self.m, ge, self.ws)]
        self.ws = [w - self.lr * m / s for w, m, s in zip(self.ws, self.m, self.s)]
        self.s = [self.b2 * s + (1 - self.b2) * (torch.sqrt(s * gi ** 2) + self.damping + self.wd)
                  for s, gi in zip(self.s, g)]

    def skip(self, g1: Optional[Grads] = None) -> None:
        """An overflowed step: nothing changes, but that step's noise was drawn (``g1``: not read)."""
        self.noise()
