"""``step(closure)`` after ``zero_grad(set_to_none=False)`` (issue input 6 and its class): gradients
that no backward wrote since the last step or ``zero_grad`` are not a first pass.

The class: any gradients that exist but are not a first pass (zeros kept by
``zero_grad(set_to_none=False)``, or the last step's g(w + e) when the loop never zeroes) must not
be taken as g(w); the closure gives the first pass. Expected values: a SAM step computed by hand in
float64 plain torch (SAM, ASAM, Stable SAM around SGD with momentum); for the variants with a
policy or mask of their own, the same variant's manual loop (both passes by hand, the protocol the
loop matrix checks against its hand references), which these loops must equal bitwise.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk

LR, MOMENTUM, EPS = 0.1, 0.9, 1e-12
STEPS = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(STEPS)]


def _forward(weights, x):
    w1, b1, w2, b2 = weights
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _grads(weights, x, y):
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    F.cross_entropy(_forward(ws, x), y).backward()
    return [w.grad for w in ws]


def _hand_run(kind, rho):
    """SAM / ASAM (eta 0.01) / Stable SAM around SGD(momentum) by hand, float64."""
    weights = [p.detach().clone() for p in _model().parameters()]
    bufs = None
    for x, y in _data():
        g1 = _grads(weights, x, y)
        if kind == "ASAM":
            t = [w.abs() + 0.01 for w in weights]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g1)))
            e = [rho * ti * ti * gi / (norm + EPS) for ti, gi in zip(t, g1)]
        else:
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g1))
            e = [rho * gi / (norm + EPS) for gi in g1]
        g2 = _grads([w + ei for w, ei in zip(weights, e)], x, y)
        if kind == "StableSAM":
            n2 = torch.sqrt(sum((gi ** 2).sum() for gi in g2))
            g2 = [gi * norm / (n2 + EPS) for gi in g2]
        bufs = [gi.clone() for gi in g2] if bufs is None else [MOMENTUM * b + gi for b, gi in zip(bufs, g2)]
        weights = [w - LR * b for w, b in zip(weights, bufs)]
    return weights


def _make(name, params, backend):
    kw = dict(lr=LR, momentum=MOMENTUM, backend=backend)
    return {
        "SAM": lambda: sk.SAM(params, torch.optim.SGD, rho=0.05, **kw),
        "ASAM": lambda: sk.SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, **kw),
        "StableSAM": lambda: sk.StableSAM(params, torch.optim.SGD, rho=0.05, **kw),
        "SSSAM": lambda: sk.SSSAM(params, torch.optim.SGD, rho=0.05, p=0.5, seed=3, **kw),
        "LookSAM": lambda: sk.LookSAM(params, torch.optim.SGD, rho=0.05, k=2, **kw),
        "AESAM": lambda: sk.AESAM(params, torch.optim.SGD, rho=0.05, total_steps=STEPS, **kw),
        "AELookSAM": lambda: sk.AELookSAM(params, torch.optim.SGD, rho=0.05, total_steps=STEPS, **kw),
        "SparseSAM": lambda: sk.SparseSAM(params, torch.optim.SGD, rho=0.05, sparsity=0.5, mask="random",
                                          update_unit="step", seed=5, **kw),
    }[name]()


def _closure_run(name, backend, loop):
    """The loop under test. ``zeroed``: torch's closure convention with buffers kept
    (``zero_grad(set_to_none=False); step(closure)``, the closure zeroes too); ``never_zeroed``: no
    ``zero_grad`` anywhere, a closure that does not zero (the last step's g(w + e) stays in p.grad)."""
    model = _model()
    opt = _make(name, model.parameters(), backend)
    for x, y in _data():
        def closure():
            if loop == "zeroed":
                opt.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if loop == "zeroed":
            opt.zero_grad(set_to_none=False)
        opt.step(closure)
    return [p.detach() for p in model.parameters()]


def _manual_run(name, backend):
    model = _model()
    opt = _make(name, model.parameters(), backend)
    for x, y in _data():
        F.cross_entropy(model(x), y).backward()
        if opt.wants_sam():
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.base_step(zero_grad=True)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("loop", ["zeroed", "never_zeroed"])
@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("name, rho", [("SAM", 0.05), ("ASAM", 0.5), ("StableSAM", 0.05)])
def test_input_06_closure_after_zeroed_grads_takes_the_sam_step(name, rho, backend, loop):
    got = _closure_run(name, backend, loop)
    want = _hand_run(name, rho)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loop", ["zeroed", "never_zeroed"])
@pytest.mark.parametrize("name", ["SSSAM", "LookSAM", "AESAM", "AELookSAM", "SparseSAM"])
def test_input_06_policy_and_mask_variants_equal_their_manual_loop(name, loop):
    got = _closure_run(name, "cpp", loop)
    want = _manual_run(name, "cpp")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_input_06_triton_interpreted():
    pytest.importorskip("triton")
    got = _closure_run("SAM", "triton", "zeroed")
    want = _hand_run("SAM", 0.05)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_input_06_first_pass_run_by_the_user_is_kept():
    """The README's closure loop: the user's own backward is the first pass (the closure runs once)."""
    model = _model()
    opt = _make("SAM", model.parameters(), "cpp")
    calls = []
    for x, y in _data():
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()

        def closure():
            calls.append(1)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert len(calls) == STEPS
    for a, b in zip(model.parameters(), _hand_run("SAM", 0.05)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12)


def test_input_06_no_host_sync():
    """The decision reads hooks and metadata only: no tensor data is read back (finite_check=False)."""
    model = _model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM, finite_check=False,
                 backend="cpp")
    x, y = _data()[0]

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt.zero_grad(set_to_none=False)
    opt.step(closure)  # warm-up (imports, lazy state)
    reads = []
    item, tolist, to_bool = torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__
    try:
        torch.Tensor.item = lambda t: reads.append("item") or item(t)
        torch.Tensor.tolist = lambda t: reads.append("tolist") or tolist(t)
        torch.Tensor.__bool__ = lambda t: reads.append("bool") or to_bool(t)
        opt.zero_grad(set_to_none=False)
        opt.step(closure)
    finally:
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__ = item, tolist, to_bool
    assert reads == []


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_input_06_esam_zeroed_grads(backend):
    """ESAM's step runs both passes itself: kept zero buffers give the same step as None gradients."""
    def run(set_to_none):
        model = _model()
        opt = sk.ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, seed=2, lr=LR, momentum=MOMENTUM,
                      backend=backend)
        for x, y in _data():
            opt.zero_grad(set_to_none=set_to_none)
            opt.step(lambda idx=None: F.cross_entropy(model(x if idx is None else x[idx]),
                                                       y if idx is None else y[idx], reduction="none"))
        return [p.detach() for p in model.parameters()]
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
