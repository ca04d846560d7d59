"""Momentum-SAM and the multi-step ascent in plain float64 torch (nothing here calls ``sam_kernels``).

- Momentum-SAM: github.com/MarlonBecker/MSAM, ``optimizer/msam.py``, ``MSAM.step``, line by line:
  momentum buffers start at zero and ``inverse_norm_buffer`` at 0; per parameter
  ``d = g + wd·p`` (p is the perturbed weight the model holds), ``p += rho·inv·buf`` (back to w),
  ``buf = momentum·buf + d``, ``p -= lr·buf``; then ``inv = 1/(‖buf‖ + 1e-12)`` over all buffers and
  ``p -= rho·inv·buf``. ``ws`` are the weights the model holds (w̃ between steps).
- Multi-step ascent: optax ``contrib/_sam.py`` (``sam`` with ``adv_optimizer = chain(normalize(),
  sgd(rho/k))``, ``sync_period = k + 1``): k adversarial steps w ← w + (rho/k)·g(w)/‖g(w)‖ from w,
  each at the gradient of the point reached, then the outer update from the cached w with the
  gradient at the last point. The epsilon in the norm (1e-12) is SAM's; ASAM uses T at each point.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from tests.optim.hand_reference import EPS, Grads, HandSAM, norm


class HandMomentumSAM:
    def __init__(self, ws: Grads, *, lr: float, momentum: float, rho: float, weight_decay: float = 0.0):
        self.ws = [w.detach().double().clone() for w in ws]
        self.lr, self.momentum, self.rho, self.wd = lr, momentum, rho, weight_decay
        self.buf = [torch.zeros_like(w) for w in self.ws]
        self.inv = 0.0

    def step(self, g1: Grads, g2_at=None, *, sam: bool = False, **inputs) -> None:
        """One MSAM step with the gradient ``g1`` taken at the weights the model holds (``ws``)."""
        for p, g, buf in zip(self.ws, g1, self.buf):
            d = g + self.wd * p
            p.add_(buf, alpha=self.rho * self.inv)
            buf.mul_(self.momentum).add_(d)
            p.add_(buf, alpha=-self.lr)
        self.inv = float(1 / (norm(self.buf) + EPS))
        for p, buf in zip(self.ws, self.buf):
            p.sub_(buf, alpha=self.rho * self.inv)

    def skip(self, g1: Optional[Grads] = None) -> None:
        """An overflowed step under AMP: nothing changes."""


class HandMultiStepSAM(HandSAM):
    """HandSAM whose perturbation is the k-step ascent: e = w_k − w (then HandSAM's descent, with its
    options: Stable SAM's renormalization, LookSAM's g_v from g(w) and g(w_k))."""

    def __init__(self, ws: Grads, *, ascent_steps: int, **kw):
        super().__init__(ws, **kw)
        self.k = ascent_steps
        self._ascent_at: Optional[Callable[[Grads], Grads]] = None

    def step(self, g1: Grads, g2_at: Optional[Callable[[Grads], Grads]], *, sam: bool,
             ascent_at: Optional[Callable[[Grads], Grads]] = None, **inputs) -> None:
        self._ascent_at = ascent_at
        super().step(g1, g2_at, sam=sam, **inputs)

    def perturbation(self, g, masks=None, selected=None):
        w = [x.clone() for x in self.ws]
        for i in range(self.k):
            t = [x.abs() + self.eta if self.adaptive else torch.ones_like(x) for x in w]
            n = norm([ti * gi for ti, gi in zip(t, g)])
            w = [x + (self.rho / self.k) * ti * ti * gi / (n + EPS) for x, ti, gi in zip(w, t, g)]
            if i < self.k - 1:
                g = self._ascent_at(w)
        return [x - x0 for x, x0 in zip(w, self.ws)]
