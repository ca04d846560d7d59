"""bSAM's ops (bsam_noise_, bsam_ascent_, bsam_descent_): every backend against the eager reference on
the op table's samples, and the reference against the formulas in float64 by hand."""
from __future__ import annotations

import pytest
import torch

import sam_kernels.ops as ops
from tests.ops.opinfo import COMPILED, backend_param, check_against_eager, require, samples


@backend_param(COMPILED)
@pytest.mark.parametrize("sample", samples("bsam_noise_", "bsam_ascent_", "bsam_descent_"))
def test_matches_eager(backend, sample):
    check_against_eager(require(backend), sample)


def _lists(n: int = 3):
    return [torch.randn(5, 3, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_noise_by_hand(backend):
    w, z = _lists(), _lists()
    s = [x.abs() + 0.5 for x in _lists()]
    want = [a + b / torch.sqrt(40.0 * c) for a, b, c in zip(w, z, s)]
    params, backups = [x.clone() for x in w], [torch.zeros_like(x) for x in w]
    ops.bsam_noise_(params, backups, s, z, num_data=40.0, backend=backend)
    for p, b, a, x in zip(params, backups, w, want):
        assert torch.equal(b, a)
        torch.testing.assert_close(p, x, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("amp", ["off", "step", "skip"])
@pytest.mark.parametrize("perturb", [True, False])
def test_ascent_by_hand(backend, amp, perturb):
    b, g = _lists(), _lists()
    s = [x.abs() + 0.5 for x in _lists()]
    rho, beta2, damping, delta = 0.05, 0.99, 0.1, 0.25
    kw = {}
    grads = g
    if amp != "off":
        grads = [x * 8.0 for x in g]
        kw = dict(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(float(amp == "skip")))
    params, s_next = [torch.full_like(x, float("nan")) for x in b], [torch.full_like(x, float("nan")) for x in b]
    ops.bsam_ascent_(params, b, grads, s, s_next, rho=rho, beta2=beta2, damping=damping, weight_decay=delta,
                     perturb=perturb, backend=backend, **kw)
    for p, sn, bi, gi, si in zip(params, s_next, b, g, s):
        if perturb and amp != "skip":
            torch.testing.assert_close(p, bi + rho * gi / si, rtol=1e-13, atol=1e-15)
        else:
            assert torch.equal(p, bi)
        torch.testing.assert_close(sn, beta2 * si + (1 - beta2) * (si.sqrt() * gi.abs() + damping + delta),
                                   rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("amp", ["off", "step", "skip"])
@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_descent_by_hand(backend, amp, delta):
    b, g, m = _lists(), _lists(), _lists()
    s, s_next = [x.abs() + 0.5 for x in _lists()], _lists()
    lr, beta1 = 0.1, 0.8
    kw = {}
    grads = g
    if amp != "off":
        grads = [x * 8.0 for x in g]
        kw = dict(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(float(amp == "skip")))
    params = [torch.full_like(x, float("nan")) for x in b]
    exp_avgs, s_next_out = [x.clone() for x in m], [x.clone() for x in s_next]
    ops.bsam_descent_(params, b, grads, exp_avgs, s, s_next_out, lr=lr, beta1=beta1, weight_decay=delta,
                      backend=backend, **kw)
    for p, mo, so, bi, gi, mi, si, sni in zip(params, exp_avgs, s_next_out, b, g, m, s, s_next):
        if amp == "skip":
            assert torch.equal(p, bi) and torch.equal(mo, mi) and torch.equal(so, si)
            continue
        m_new = beta1 * mi + (1 - beta1) * (gi + delta * bi)
        torch.testing.assert_close(mo, m_new, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(p, bi - lr * m_new / si, rtol=1e-13, atol=1e-15)
        assert torch.equal(so, sni)  # not written when the step runs


@pytest.mark.parametrize("op", ["bsam_noise_", "bsam_ascent_", "bsam_descent_"])
def test_complex_refused_before_writing(op):
    w = [torch.randn(4, dtype=torch.complex64)]
    before = w[0].clone()
    args = {"bsam_noise_": lambda: ops.bsam_noise_(w, [torch.empty_like(w[0])], [w[0].abs()], [w[0]], num_data=1.0),
            "bsam_ascent_": lambda: ops.bsam_ascent_(w, [w[0].clone()], [w[0]], [w[0]], [torch.empty_like(w[0])],
                                                     rho=0.1, beta2=0.9, damping=0.1, weight_decay=0.0),
            "bsam_descent_": lambda: ops.bsam_descent_(w, [w[0].clone()], [w[0]], [w[0].clone()], [w[0]],
                                                       [w[0].clone()], lr=0.1, beta1=0.9, weight_decay=0.0)}[op]
    with pytest.raises(TypeError, match="complex"):
        args()
    assert torch.equal(w[0], before)
