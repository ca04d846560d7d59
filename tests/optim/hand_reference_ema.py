"""Friendly-SAM and VaSSO in plain float64 torch, transcribed from the official code (nothing here
calls ``sam_kernels``):

- Friendly-SAM: github.com/nblt/F-SAM, ``utils.py``, ``FriendlySAM.first_step``: on a parameter's
  first step ``momentum = grad`` (the ascent uses grad); afterwards ``grad -= momentum·sigma`` then
  ``momentum = momentum·lmbda + grad_before·(1 − lmbda)``; e = rho·grad/(‖grad‖ + 1e-12).
- VaSSO: github.com/BingcongLi/VaSSO, ``solver/vasso.py``, ``VASSO.first_step``: ``ema = grad`` on
  the first step, else ``ema = ema·(1 − theta) + grad·theta``; e = rho·ema/(‖ema‖ + 1e-7).

The descent is SAM's (:class:`HandSAM`). ASAM (T = |w| + eta) follows :meth:`HandSAM.perturbation`.
``skip(g1)``: a step skipped for an overflow in its second pass still folds the finite first-pass
gradient ``g1`` into the EMA (the EMA observes g(w)); ``skip()`` (first pass overflowed): nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from tests.optim.hand_reference import Grads, HandSAM, norm


class HandFriendlySAM(HandSAM):
    def __init__(self, ws: Grads, *, sigma: float, lmbda: float, **kw):
        super().__init__(ws, **kw)
        self.sigma, self.lmbda = sigma, lmbda
        self.momentum: Optional[Grads] = None

    def _observe(self, g: Grads) -> Grads:
        """The official first_step's EMA update; returns the ascent direction."""
        grad = [x.clone() for x in g]
        if self.momentum is None:
            self.momentum = grad
            return [x.clone() for x in g]
        d = [x - m * self.sigma for x, m in zip(g, self.momentum)]
        self.momentum = [m * self.lmbda + x * (1 - self.lmbda) for m, x in zip(self.momentum, grad)]
        return d

    def perturbation(self, g, masks=None, selected=None):
        return super().perturbation(self._observe(g), masks, selected)

    def skip(self, g1: Optional[Grads] = None) -> None:
        if g1 is not None:
            self._observe(g1)


class HandVaSSO(HandSAM):
    def __init__(self, ws: Grads, *, theta: float, eps: float = 1e-7, **kw):
        super().__init__(ws, **kw)
        self.theta, self.eps = theta, eps
        self.ema: Optional[Grads] = None

    def _observe(self, g: Grads) -> None:
        if self.ema is None:
            self.ema = [x.clone() for x in g]
        else:
            self.ema = [m * (1 - self.theta) + x * self.theta for m, x in zip(self.ema, g)]

    def perturbation(self, g, masks=None, selected=None):
        self._observe(g)
        t = [w.abs() + self.eta if self.adaptive else torch.ones_like(w) for w in self.ws]
        n = norm([ti * m for ti, m in zip(t, self.ema)])
        return [self.rho * ti * ti * m / (n + self.eps) for ti, m in zip(t, self.ema)]

    def skip(self, g1: Optional[Grads] = None) -> None:
        if g1 is not None:
            self._observe(g1)
