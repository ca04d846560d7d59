"""Parameters over shared memory: exact aliases (weight tying by hand, ``b.weight.data = a.weight.data``)
step as torch.optim steps them (each Parameter's update applied to the shared memory in turn);
partial overlaps are refused before any weight changes. Expected values by hand in float64."""
import pytest
import torch
from torch import nn

import sam_kernels as sk
from tests.utils import backend_available

BACKENDS = [b for b in ("eager", "cpp", "triton") if backend_available(b, "cpu")]
RHO, LR, MOM, WD = 0.5, 0.1, 0.9, 0.01


def _variants():
    """name -> builder(params, backend, **base kwargs) over SGD: every variant of the package."""
    return {
        "SAM": lambda p, be, **kw: sk.SAM(p, torch.optim.SGD, rho=RHO, backend=be, **kw),
        "SSSAM": lambda p, be, **kw: sk.SSSAM(p, torch.optim.SGD, rho=RHO, p=1.0, seed=0, backend=be, **kw),
        "StableSAM": lambda p, be, **kw: sk.StableSAM(p, torch.optim.SGD, rho=RHO, backend=be, **kw),
        "LookSAM": lambda p, be, **kw: sk.LookSAM(p, torch.optim.SGD, rho=RHO, k=2, backend=be, **kw),
        "AESAM": lambda p, be, **kw: sk.AESAM(p, torch.optim.SGD, rho=RHO, total_steps=3, backend=be, **kw),
        "AELookSAM": lambda p, be, **kw: sk.AELookSAM(p, torch.optim.SGD, rho=RHO, total_steps=3, backend=be, **kw),
        "SparseSAM": lambda p, be, **kw: sk.SparseSAM(p, torch.optim.SGD, rho=RHO, mask="random", sparsity=0.5,
                                                      seed=0, backend=be, **kw),
        "ESAM": lambda p, be, **kw: sk.ESAM(p, torch.optim.SGD, rho=RHO, beta=0.6, gamma=1.0, seed=2, backend=be, **kw),
    }


def _tied():
    """Two Linear layers over one weight storage and an untied head: (modules, params, input)."""
    a, b, c = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 2)
    b.weight.data = a.weight.data
    return (a, b, c), [a.weight, b.weight, c.weight, c.bias], torch.randn(5, 4)


def _loss(a, b, c, x):
    return c(torch.tanh(b(torch.tanh(a(x))))).square().sum()


def _f64_grads(wa, wb, wc, bc, x):
    """∂L/∂ of each of the four arguments separately (as autograd gives each Parameter its own)."""
    args = [t.detach().double().clone().requires_grad_(True) for t in (wa, wb, wc, bc)]
    h = torch.tanh(torch.tanh(x.double() @ args[0].T) @ args[1].T)
    (h @ args[2].T + args[3]).square().sum().backward()
    return [t.grad for t in args]


def _hand_sam_sgd(w, wc, bc, x, steps):
    """SAM around torch.optim.SGD(momentum, weight_decay), float64, tied w stepped as two Parameters:
    e = rho·g/‖g‖ over all four gradients, e_a + e_b land on w; torch's SGD then applies a's update
    and b's, in turn, on the shared w (b's weight decay reads w after a's update)."""
    w, wc, bc = w.double().clone(), wc.double().clone(), bc.double().clone()
    bufs = [None] * 4
    for _ in range(steps):
        g = _f64_grads(w, w, wc, bc, x)
        s = RHO / torch.sqrt(sum(t.square().sum() for t in g))
        h = _f64_grads(w + s * (g[0] + g[1]), w + s * (g[0] + g[1]), wc + s * g[2], bc + s * g[3], x)
        for i in range(4):
            cur = (w, w, wc, bc)[i]
            d = h[i] + WD * cur
            bufs[i] = d.clone() if bufs[i] is None else MOM * bufs[i] + d
            new = cur - LR * bufs[i]
            if i < 2:
                w = new
            elif i == 2:
                wc = new
            else:
                bc = new
    return w, wc, bc


def _sam_steps(opt, mods, x, steps):
    for _ in range(steps):
        _loss(*mods, x).backward()
        opt.first_step(zero_grad=True)
        _loss(*mods, x).backward()
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_05_tied_sgd_matches_hand(backend):
    mods, params, x = _tied()
    w0, wc0, bc0 = (t.detach().clone() for t in (params[0], params[2], params[3]))
    opt = sk.SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, backend=backend)
    _sam_steps(opt, mods, x, 3)
    w, wc, bc = _hand_sam_sgd(w0, wc0, bc0, x, 3)
    assert params[0].data_ptr() == params[1].data_ptr()
    torch.testing.assert_close(params[0].detach().double(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(params[2].detach().double(), wc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(params[3].detach().double(), bc, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_05_tied_perturbation_is_sum_and_restores_bitwise(backend):
    mods, params, x = _tied()
    w0 = params[0].detach().clone()
    opt = sk.SAM(params, torch.optim.SGD, rho=RHO, lr=LR, backend=backend)
    _loss(*mods, x).backward()
    g = _f64_grads(params[0], params[1], params[2], params[3], x)
    opt.first_step()
    s = RHO / torch.sqrt(sum(t.square().sum() for t in g))
    torch.testing.assert_close(params[0].detach().double(), w0.double() + s * (g[0] + g[1]), atol=1e-6, rtol=1e-6)
    opt.restore()
    assert torch.equal(params[0].detach(), w0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_variants()))
def test_input_05_tied_every_variant_lr0_keeps_w_bitwise(name, backend):
    """The issue's input: lr = 0, so every step must leave the shared storage exactly at w."""
    mods, params, x = _tied()
    w0 = [p.detach().clone() for p in params]
    opt = _variants()[name](params, backend, lr=0.0)
    for _ in range(3):
        _loss(*mods, x).backward()
        if opt.wants_sam():
            opt.first_step(zero_grad=True)
            _loss(*mods, x).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.base_step(zero_grad=True)
    assert opt.stats()["sam_steps"] >= 1
    for p, w in zip(params, w0):
        assert torch.equal(p.detach(), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_05_tied_adamw_matches_torch_sequential(backend):
    """AdamW, lr > 0: the descent equals torch.optim.AdamW's own step on the tied Parameters taken
    from the restored w with the second-pass gradients (torch steps each Parameter in turn)."""
    mods, params, x = _tied()
    opt = sk.SAM(params, torch.optim.AdamW, rho=RHO, lr=LR, weight_decay=WD, backend=backend)
    twin_mods, twin_params, _ = _tied()
    with torch.no_grad():
        for t, p in zip(twin_params, params):
            t.copy_(p)
    ref = torch.optim.AdamW(twin_params, lr=LR, weight_decay=WD, foreach=False)
    for _ in range(2):
        _loss(*mods, x).backward()
        opt.first_step(zero_grad=True)
        _loss(*mods, x).backward()
        for t, p in zip(twin_params, params):
            t.grad = p.grad.clone()
        opt.second_step(zero_grad=True)
        ref.step()
        ref.zero_grad()
    for t, p in zip(twin_params, params):
        torch.testing.assert_close(p.detach(), t.detach(), atol=1e-6, rtol=1e-6)


def test_input_05_tied_asam_refused_before_writing():
    mods, params, x = _tied()
    w0 = params[0].detach().clone()
    opt = sk.SAM(params, torch.optim.SGD, rho=RHO, adaptive=True, lr=LR)
    _loss(*mods, x).backward()
    with pytest.raises(ValueError, match="ASAM"):
        opt.first_step()
    assert torch.equal(params[0].detach(), w0)
    assert opt.step_state.perturbed is None


def test_input_05_partial_overlap_refused_everywhere():
    flat = nn.Parameter(torch.randn(10))
    a, b = nn.Parameter(flat.data[0:6]), nn.Parameter(flat.data[4:10])
    with pytest.raises(ValueError, match="overlap in memory"):
        sk.SAM([a, b], torch.optim.SGD, lr=0.1)
    opt = sk.SAM([a], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="overlap in memory"):
        opt.add_param_group({"params": [b]})
    # Disjoint slices of one buffer are fine (no aliasing), and step as separate tensors.
    c, d = nn.Parameter(flat.data[0:5]), nn.Parameter(flat.data[5:10])
    assert sk.SAM([c, d], torch.optim.SGD, lr=0.1).step_state.aliases == {}
    # Storage re-pointed after construction: load_state_dict looks again, before loading anything.
    opt = sk.SAM([c, d], torch.optim.SGD, lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    d.data = flat.data[2:7]
    with pytest.raises(ValueError, match="overlap in memory"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1
    # The same bytes seen with another shape overlap too.
    with pytest.raises(ValueError, match="overlap in memory"):
        sk.SAM([nn.Parameter(flat.data), nn.Parameter(flat.data.view(2, 5))], torch.optim.SGD, lr=0.1)


def test_input_05_tied_mid_step_checkpoint_restores_w():
    mods, params, x = _tied()
    w0 = params[0].detach().clone()
    opt = sk.SAM(params, torch.optim.SGD, rho=RHO, lr=LR, backend="cpp" if "cpp" in BACKENDS else "eager")
    _loss(*mods, x).backward()
    opt.first_step(zero_grad=True)
    sd = opt.state_dict()
    mods2, params2, _ = _tied()
    with torch.no_grad():
        params2[0].copy_(params[0])
        for t, p in zip(params2[2:], params[2:]):
            t.copy_(p)
    opt2 = sk.SAM(params2, torch.optim.SGD, rho=RHO, lr=LR, backend=opt.backend)
    opt2.load_state_dict(sd)
    opt2.restore()
    assert torch.equal(params2[0].detach(), w0)


# --------------------------------------------------------------------------- the ops' own check

def _snapshot(lists):
    return [[t.clone() for t in lst] for lst in lists]


def _unchanged(lists, before):
    return all(torch.equal(t, b) for lst, bl in zip(lists, before) for t, b in zip(lst, bl))


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_05_ops_refuse_memory_shared_across_entries(backend):
    w = torch.randn(6)
    other = torch.randn(6)
    g = [torch.randn(6), torch.randn(6)]
    b = [torch.empty(6), torch.empty(6)]
    cases = {
        "perturb_ (a param twice)": (lambda: sk.ops.perturb_([w, w.view(6)], g, b, 0.1, backend=backend),
                                     [[w], b]),
        "restore_ (a param twice)": (lambda: sk.ops.restore_([w, w.view(2, 3).view(6)], [other, other], backend=backend),
                                     [[w]]),
        "sgd (a grad that is a view of another param)":
            (lambda: sk.ops.sgd_restore_step_([w, other], [w, other], [g[0], w.view(6)], None, lr=0.1,
                                              backend=backend), [[w, other]]),
        "sgd (one momentum buffer for two params)":
            (lambda: sk.ops.sgd_restore_step_([w, other], b, g, [g[0], g[0]], lr=0.1, momentum=0.9,
                                              backend=backend), [[w, other], b, g]),
        "perturb_ (a backup over another param)": (lambda: sk.ops.perturb_([w, other], g, [b[0], w], 0.1,
                                                                          backend=backend), [[w, other], b]),
    }
    for what, (call, lists) in cases.items():
        before = _snapshot(lists)
        with pytest.raises(ValueError, match="share memory"):
            call()
        assert _unchanged(lists, before), what


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_05_ops_allow_a_tensor_shared_within_its_entry(backend):
    """A param that is its own backup and whose grad is a view of itself (same entry, same view):
    well defined, as torch's p.add_(p.grad, alpha=-lr) with p.grad = p: w ← w − lr·w."""
    w, v = torch.randn(6), torch.randn(6)
    expected = [(w.double() * (1 - 0.1)).float(), (v.double() * (1 - 0.1)).float()]
    sk.ops.sgd_restore_step_([w, v], [w, v], [w.view(6), v.detach()], None, lr=0.1, backend=backend)
    for t, e in zip((w, v), expected):
        torch.testing.assert_close(t, e, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_05_tied_after_construction_is_refused_until_find_aliases(backend):
    (a, b, c), params, x = _tied()
    b.weight.data = torch.randn(4, 4)  # untied when the optimizer is built ...
    opt = sk.SAM(params, torch.optim.SGD, rho=RHO, lr=0.0, backend=backend)
    b.weight.data = a.weight.data      # ... tied afterwards
    w0 = [p.detach().clone() for p in params]
    _loss(a, b, c, x).backward()
    with pytest.raises(ValueError, match="find_aliases"):
        opt.first_step()
    for p, w in zip(params, w0):
        assert torch.equal(p.detach(), w)
    opt.find_aliases()
    opt.first_step(zero_grad=True)
    _loss(a, b, c, x).backward()
    opt.second_step(zero_grad=True)
    for p, w in zip(params, w0):
        assert torch.equal(p.detach(), w)
