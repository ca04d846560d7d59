"""The optimizers on real layouts (issue 13): a channels_last convnet takes the fused kernels for
every element, its state keeps the params' layout, the result equals the contiguous model's; complex
parameters step like the per-parameter reference; dispatch_summary() tells what ran where."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from sam_kernels.optim.sparse import SparseSAM
from tests.utils import require_backend

BACKENDS = [("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
}


def convnet(memory_format, device, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, groups=8),  # depthwise: (8, 1, 3, 3), one channel per filter
        torch.nn.Conv2d(8, 6, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5),
    ).to(device, torch.float64)  # fp64: the conv bias before BatchNorm has a ~0 gradient that AdamW would amplify
    return net.to(memory_format=memory_format)


def data(memory_format, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64).to(device).contiguous(memory_format=memory_format)
    return x, torch.randint(0, 5, (6,), generator=g).to(device)


def run(opt, net, x, y, steps=3):
    for _ in range(steps):
        F.cross_entropy(net(x), y).backward()
        opt.step(lambda: F.cross_entropy(net(x), y).backward())
        opt.zero_grad()


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend, device", BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])
def test_channels_last_model_runs_fully_fused(backend, device, base, adaptive):
    require_backend(backend, device)
    cls, kw = BASES[base]
    results = {}
    for fmt in (torch.channels_last, torch.contiguous_format):
        net = convnet(fmt, device)
        x, y = data(fmt, device)
        opt = sk.SAM(net.parameters(), cls, rho=0.5 if adaptive else 0.05, adaptive=adaptive, backend=backend, **kw)
        run(opt, net, x, y)
        summary = opt.dispatch_summary()
        total = sum(p.numel() for p in net.parameters())
        assert summary.fused_share == 1.0 and summary.fallback_elements == 0, str(summary)
        assert set(summary.elements()) == {backend}
        assert summary.by_op()["perturb_"] == {backend: total}
        for p in net.parameters():  # every state tensor in the param's layout
            state = [opt.state[p].get("backup")] + [v for v in opt.base_optimizer.state[p].values() if v.dim()]
            assert all(s.stride() == p.stride() for s in state if s is not None), (p.shape, p.stride())
        if fmt is torch.channels_last:
            assert not net[0].weight.is_contiguous()
        results[fmt] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(results[torch.channels_last], results[torch.contiguous_format]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)  # convolutions sum in another order per layout


def test_summary_counts_a_gradient_in_another_layout():
    """A contiguous gradient for a channels_last weight (set by hand; autograd keeps the param's layout):
    that weight, and only it, runs eagerly, and the summary says so."""
    require_backend("cpp", "cpu")
    net = convnet(torch.channels_last, "cpu")
    x, y = data(torch.channels_last, "cpu")
    opt = sk.SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    w = net[0].weight
    F.cross_entropy(net(x), y).backward()
    w.grad = w.grad.contiguous()
    opt.first_step(zero_grad=True)
    F.cross_entropy(net(x), y).backward()
    w.grad = w.grad.contiguous()
    opt.second_step(zero_grad=True)
    s = opt.dispatch_summary()
    n = net[0].weight.numel()
    total = sum(p.numel() for p in net.parameters())
    assert s.by_op()["perturb_"] == {"cpp": total - n, "eager": n}
    assert s.fallback_elements > 0 and s.fused_share < 1.0
    assert "fallback" in str(s) and "fused share" in str(s)


def test_sparse_sam_masks_follow_the_params_layout():
    require_backend("cpp", "cpu")
    net = convnet(torch.channels_last, "cpu")
    x, y = data(torch.channels_last, "cpu")
    opt = SparseSAM(net.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, mask="random", seed=0, lr=0.1)
    run(opt, net, x, y, steps=2)
    assert opt.dispatch_summary().fused_share == 1.0, str(opt.dispatch_summary())


def real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def naive_complex_step(params, base, x_fn, rho, adaptive, eta=0.01):
    """Per-parameter SAM on real views (torch's convention for complex params): one global norm."""
    x_fn().backward()
    with torch.no_grad():
        sq = 0.0
        for p in params:
            w, g = real(p), real(p.grad)
            t = (w.abs() + eta) if adaptive else 1.0
            sq = sq + ((t * g) ** 2).sum()
        norm = torch.sqrt(sq)
        backups = []
        for p in params:
            w, g = real(p), real(p.grad)
            t2 = (w.abs() + eta) ** 2 if adaptive else 1.0
            backups.append((p, p.clone()))
            w.add_(rho * t2 * g / (norm + 1e-12))
    for p in params:
        p.grad = None
    x_fn().backward()
    with torch.no_grad():
        for p, b in backups:
            p.copy_(b)
    base.step()
    for p in params:
        p.grad = None


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend, device", BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])
def test_complex_params_match_the_per_parameter_reference(backend, device, base, adaptive):
    require_backend(backend, device)
    cls, kw = BASES[base]
    torch.manual_seed(0)
    init = [torch.randn(4, 3, dtype=torch.complex128), torch.randn(5, dtype=torch.complex128),
            torch.randn(3, dtype=torch.float64)]
    a = torch.randn(6, 4, dtype=torch.complex128)

    def loss(ps):  # a real loss of complex weights
        h = a @ ps[0]
        return (h.abs() ** 2).sum() + (ps[1].abs() ** 2 * ps[1].real).sum() + (ps[2] ** 2).sum() * h.real.sum()

    mine = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    theirs = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    a = a.to(device)
    rho = 0.5 if adaptive else 0.05
    opt = sk.SAM(mine, cls, rho=rho, adaptive=adaptive, backend=backend, **kw)
    base_opt = cls(theirs, **kw)
    for _ in range(3):
        loss(mine).backward()
        opt.step(lambda: loss(mine).backward())
        opt.zero_grad()
        naive_complex_step(theirs, base_opt, lambda: loss(theirs), rho, adaptive)
    assert opt.dispatch_summary().fused_share == 1.0
    for m, t in zip(mine, theirs):
        torch.testing.assert_close(m, t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_state_follows_a_model_converted_to_channels_last(base):
    """Backups and base state made in the contiguous layout, then model.to(channels_last): one step
    falls back per tensor (counted), after which the state has the params' layout and runs fused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    kw = dict(lr=0.1, momentum=0.9) if base is torch.optim.SGD else dict(lr=1e-3)
    opt = sk.SAM(model.parameters(), base, **kw)
    x = torch.randn(2, 3, 9, 9)

    def step():
        model(x).square().mean().backward()
        opt.first_step(zero_grad=True)
        model(x).square().mean().backward()
        opt.second_step(zero_grad=True)
    step()
    model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    step()
    assert opt.dispatch_summary().fused_share < 1.0  # the stale state was seen
    step()
    step()
    assert opt.dispatch_summary().fused_share == 1.0
    for p in model.parameters():
        for t in (*opt.state[p].values(), *opt.base_optimizer.state[p].values()):
            if isinstance(t, torch.Tensor) and t.shape == p.shape:
                assert t.stride() == p.stride()
