"""Hyperparameters given as tensors (how a compiled step passes lr and rho, read as graph data): the
ops run their eager reference with them and agree with the same call with Python numbers, and with
the update written out by hand in float64."""
from __future__ import annotations

import torch

from sam_kernels import ops


def _lists(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (7,), (2, 3)][:n]
    return ([torch.randn(s, generator=g) for s in shapes], [torch.randn(s, generator=g) for s in shapes])


def test_perturb_with_a_tensor_rho_is_the_hand_perturbation():
    params, grads = _lists()
    w = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, torch.tensor([0.07], dtype=torch.float64).view(()), backend="cpp")
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    for p, b, w0, g in zip(params, backups, w, grads):
        assert torch.equal(b, w0)
        torch.testing.assert_close(p.double(), w0.double() + 0.07 * g.double() / (norm + 1e-12), rtol=1e-6, atol=1e-7)


def test_sgd_step_with_a_tensor_lr_is_the_hand_step():
    params, grads = _lists(1)
    backups = [p + 0.5 for p in params]
    bufs = [torch.randn_like(p) for p in params]
    want_bufs = [0.9 * b.double() + g.double() + 1e-2 * w.double() for b, g, w in zip(bufs, grads, backups)]
    ops.sgd_restore_step_(params, backups, grads, bufs, lr=torch.tensor(0.3, dtype=torch.float64), momentum=0.9,
                          weight_decay=1e-2, backend="cpp")
    for p, w, b, want in zip(params, backups, bufs, want_bufs):
        torch.testing.assert_close(b.double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p.double(), w.double() - 0.3 * want, rtol=1e-6, atol=1e-6)


def test_adamw_step_with_per_param_step_tensors_is_the_hand_step():
    """Each param's own step count (a param that got no gradient on some steps counts fewer)."""
    params, grads = _lists(2)
    backups = [p.clone() for p in params]
    m = [torch.rand_like(p) * 0.1 for p in params]
    v = [torch.rand_like(p) * 0.1 for p in params]
    m0, v0 = [x.double().clone() for x in m], [x.double().clone() for x in v]
    counts = [3.0, 1.0, 7.0]
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 1e-2
    ops.adamw_restore_step_(params, backups, grads, m, v, [torch.tensor(c) for c in counts],
                            lr=torch.tensor(lr, dtype=torch.float64), beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                            backend="cpp")
    for p, w, g, mi, vi, a, s, c in zip(params, backups, grads, m, v, m0, v0, counts):
        g, w = g.double(), w.double()
        a = b1 * a + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        want = w * (1 - lr * wd) - lr / (1 - b1 ** c) * a / (s.sqrt() / (1 - b2 ** c) ** 0.5 + eps)
        torch.testing.assert_close(mi.double(), a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(vi.double(), s, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=1e-6)


def test_bsam_ascent_with_a_tensor_rho_is_the_hand_ascent():
    params, grads = _lists(3)
    backups = [p + 0.25 for p in params]
    s = [torch.rand_like(p) + 0.5 for p in params]
    s_next = [torch.empty_like(p) for p in params]
    rho, b2, damping, wd = 0.07, 0.999, 0.1, 1e-2
    ops.bsam_ascent_(params, backups, grads, s, s_next, rho=torch.tensor(rho, dtype=torch.float64), beta2=b2,
                     damping=damping, weight_decay=wd, backend="cpp")
    for p, w, g, si, sn in zip(params, backups, grads, s, s_next):
        g, w, si = g.double(), w.double(), si.double()
        torch.testing.assert_close(p.double(), w + rho * g / si, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sn.double(), b2 * si + (1 - b2) * (si.sqrt() * g.abs() + damping + wd),
                                   rtol=1e-6, atol=1e-7)


def test_bsam_descent_with_a_tensor_lr_is_the_hand_descent():
    params, grads = _lists(4)
    backups = [p - 0.25 for p in params]
    m = [torch.randn_like(p) * 0.1 for p in params]
    s = [torch.rand_like(p) + 0.5 for p in params]
    s_next = [torch.rand_like(p) + 0.5 for p in params]
    m0, sn0 = [x.double().clone() for x in m], [x.clone() for x in s_next]
    lr, b1, wd = 0.05, 0.9, 1e-2
    ops.bsam_descent_(params, backups, grads, m, s, s_next, lr=torch.tensor(lr, dtype=torch.float64), beta1=b1,
                      weight_decay=wd, backend="cpp")
    for p, w, g, mi, a, si, sn, sn_before in zip(params, backups, grads, m, m0, s, s_next, sn0):
        g, w = g.double(), w.double()
        a = b1 * a + (1 - b1) * (g + wd * w)
        torch.testing.assert_close(mi.double(), a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.double(), w - lr * a / si.double(), rtol=1e-6, atol=1e-6)
        assert torch.equal(sn, sn_before)  # written on a skipped step only
