"""Sparse gradients (nn.Embedding(sparse=True)): the SAM step on the coalesced stored values (norm
over them, e at the stored indices only), the base optimizers that take sparse gradients stepping
them; everything else refused before any weight changes. Expected values by hand in float64 on the
dense equivalent (rows a batch does not touch must stay bitwise unchanged)."""
import pytest
import torch
from torch import nn

import sam_kernels as sk
from tests.utils import backend_available

BACKENDS = [b for b in ("eager", "cpp") if backend_available(b, "cpu")]
RHO, LR, MOM, ETA = 0.2, 0.1, 0.9, 0.01
IDX = torch.tensor([1, 2, 2, 5, 7, 7, 7])  # repeated rows: the sparse gradient has duplicate indices


def _model():
    torch.manual_seed(0)
    return nn.Embedding(50, 8, sparse=True), nn.Linear(8, 1)


def _loss(emb, lin, ws=None):
    if ws is None:
        return lin(emb(IDX)).square().mean()
    e, w, b = ws
    return (e[IDX] @ w.T + b).square().mean()


def _grads(ws):
    ws = [t.detach().clone().requires_grad_(True) for t in ws]
    _loss(None, None, ws).backward()
    return [t.grad for t in ws]


def _hand(emb, lin, steps, base, adaptive=False, masks=None):
    """SAM on the dense float64 equivalent: e = rho·m⊙T²⊙g/‖m?⊙T⊙g‖ (T = |w| + eta with ASAM, else 1;
    the norm unmasked as Sparse SAM's default), then ``base`` ("sgd", "sgd-momentum", "adagrad")."""
    ws = [emb.weight.detach().double().clone(), lin.weight.detach().double().clone(),
          lin.bias.detach().double().clone()]
    state = [None] * 3
    for _ in range(steps):
        g = _grads(ws)
        t = [w.abs() + ETA if adaptive else torch.ones_like(w) for w in ws]
        s = RHO / torch.sqrt(sum((ti * gi).square().sum() for ti, gi in zip(t, g)))
        m = masks or [torch.ones_like(w) for w in ws]
        h = _grads([w + s * mi * ti * ti * gi for w, mi, ti, gi in zip(ws, m, t, g)])
        for i in range(3):
            if base == "sgd":
                ws[i] = ws[i] - LR * h[i]
            elif base == "sgd-momentum":
                state[i] = h[i].clone() if state[i] is None else MOM * state[i] + h[i]
                ws[i] = ws[i] - LR * state[i]
            else:  # adagrad: state_sum += g², w -= lr·g/(sqrt(state_sum) + 1e-10)
                state[i] = (torch.zeros_like(h[i]) if state[i] is None else state[i]) + h[i] * h[i]
                ws[i] = ws[i] - LR * h[i] / (state[i].sqrt() + 1e-10)
    return ws


def _sam_steps(opt, emb, lin, steps):
    for _ in range(steps):
        _loss(emb, lin).backward()
        assert emb.weight.grad.is_sparse
        opt.first_step(zero_grad=True)
        _loss(emb, lin).backward()
        opt.second_step(zero_grad=True)


def _check(emb, lin, expected, w0):
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[IDX] = False
    assert torch.equal(emb.weight.detach()[untouched], w0[untouched])
    for p, e in zip((emb.weight, lin.weight, lin.bias), expected):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=1e-5)


BASES = {
    "sgd": lambda: (torch.optim.SGD, dict(lr=LR)),
    "sgd-momentum": lambda: (torch.optim.SGD, dict(lr=LR, momentum=MOM)),
    "adagrad": lambda: (torch.optim.Adagrad, dict(lr=LR)),
}


@pytest.mark.parametrize("backend", BACKENDS + (["triton"] if backend_available("triton", "cpu") else []))
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("base", list(BASES))
def test_input_08_sparse_embedding_matches_hand(base, adaptive, backend):
    emb, lin = _model()
    w0 = emb.weight.detach().clone()
    expected = _hand(emb, lin, 3, base, adaptive=adaptive)
    cls, kw = BASES[base]()
    opt = sk.SAM([*emb.parameters(), *lin.parameters()], cls, rho=RHO, adaptive=adaptive, eta=ETA, backend=backend,
                 **kw)
    _sam_steps(opt, emb, lin, 3)
    _check(emb, lin, expected, w0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["SSSAM", "AESAM", "SparseSAM", "ESAM"])
def test_input_08_sparse_variants_match_hand(name, backend):
    """The variants whose SAM step reads gradients only through the norm and the ascent: SS-SAM
    (p = 1: every step SAM), AE-SAM (its first step is a SAM step), Sparse SAM (masks), ESAM (beta = 1)."""
    emb, lin = _model()
    w0 = emb.weight.detach().clone()
    params = [*emb.parameters(), *lin.parameters()]
    kw = dict(rho=RHO, lr=LR, momentum=MOM, backend=backend)
    opt = {"SSSAM": lambda: sk.SSSAM(params, torch.optim.SGD, p=1.0, seed=0, **kw),
           "AESAM": lambda: sk.AESAM(params, torch.optim.SGD, total_steps=10, **kw),
           "SparseSAM": lambda: sk.SparseSAM(params, torch.optim.SGD, mask="random", sparsity=0.5, seed=0,
                                             update_freq=100, update_unit="step", **kw),
           "ESAM": lambda: sk.ESAM(params, torch.optim.SGD, beta=1.0, gamma=1.0, seed=2, **kw)}[name]()
    steps = 1 if name == "AESAM" else 2
    masks = None
    if name == "SparseSAM":
        opt.update_mask()
        masks = [m.double() for m in opt.masks]
    expected = _hand(emb, lin, steps, "sgd-momentum", masks=masks)
    _sam_steps(opt, emb, lin, steps)
    _check(emb, lin, expected, w0)


def test_input_08_sparse_adam_matches_hand():
    """SparseAdam (every param sparse): the same rows every step, so its lazy moments equal Adam's there."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, sparse=True)
    w0 = emb.weight.detach().clone()
    target = torch.randn(len(IDX), 8)
    loss = lambda w: (w[IDX] - target).square().mean()  # noqa: E731
    w, m, v = w0.double().clone(), 0, 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in (1, 2):
        a = w.clone().requires_grad_(True)
        loss(a).backward()
        g = a.grad
        a = (w + RHO * g / g.norm()).requires_grad_(True)
        loss(a).backward()
        h = a.grad
        m, v = b1 * m + (1 - b1) * h, b2 * v + (1 - b2) * h * h
        # SparseAdam's form: lr·sqrt(1 - b2^t)/(1 - b1^t) · m/(sqrt(v) + eps)
        upd = LR * (1 - b2 ** step) ** 0.5 / (1 - b1 ** step) * m / (v.sqrt() + eps)
        w = w - torch.where(h != 0, upd, torch.zeros_like(upd))
    opt = sk.SAM(emb.parameters(), torch.optim.SparseAdam, rho=RHO, lr=LR)
    for _ in range(2):
        (emb(IDX) - target).square().mean().backward()
        opt.first_step(zero_grad=True)
        (emb(IDX) - target).square().mean().backward()
        opt.second_step(zero_grad=True)
    torch.testing.assert_close(emb.weight.detach().double(), w, atol=1e-6, rtol=1e-5)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[IDX] = False
    assert torch.equal(emb.weight.detach()[untouched], w0[untouched])


def test_input_08_sparse_plain_steps_are_the_base_optimizers():
    """SS-SAM's plain steps (p = 0) are torch.optim.SGD's own step on the sparse gradient."""
    emb, lin = _model()
    expected = [t.detach().double().clone() for t in (emb.weight, lin.weight, lin.bias)]
    opt = sk.SSSAM([*emb.parameters(), *lin.parameters()], torch.optim.SGD, p=0.0, seed=0, lr=LR)
    for _ in range(2):
        g = _grads(expected)
        expected = [w - LR * gi for w, gi in zip(expected, g)]
        _loss(emb, lin).backward()
        assert not opt.wants_sam()
        opt.base_step(zero_grad=True)
    for p, e in zip((emb.weight, lin.weight, lin.bias), expected):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=1e-5)


REFUSED = {
    "AdamW": lambda ps: sk.SAM(ps, torch.optim.AdamW, lr=LR),
    "Adam": lambda ps: sk.SAM(ps, torch.optim.Adam, lr=LR),
    "StableSAM": lambda ps: sk.StableSAM(ps, torch.optim.SGD, lr=LR),
    "LookSAM": lambda ps: sk.LookSAM(ps, torch.optim.SGD, lr=LR),
    "AELookSAM": lambda ps: sk.AELookSAM(ps, torch.optim.SGD, total_steps=5, lr=LR),
    "telemetry": lambda ps: sk.SAM(ps, torch.optim.SGD, lr=LR, telemetry=True),
    "ESAM-element": lambda ps: sk.ESAM(ps, torch.optim.SGD, beta=0.5, swp="element", seed=0, lr=LR),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_input_08_sparse_refused_before_any_weight_changes(name):
    emb, lin = _model()
    params = [*emb.parameters(), *lin.parameters()]
    w0 = [p.detach().clone() for p in params]
    opt = REFUSED[name](params)
    _loss(emb, lin).backward()
    with pytest.raises(TypeError, match="sparse gradient"):
        opt.first_step()
    for p, w in zip(params, w0):
        assert torch.equal(p.detach(), w)
    assert opt.step_state.perturbed is None


def test_input_08_esam_unchosen_sparse_param_steps_and_restores():
    """ESAM's per-tensor selection leaving the embedding out: it is not perturbed, the step completes
    (no error after the weights moved), and a restore() after first_step gives w back bitwise."""
    emb, lin = _model()
    params = [*emb.parameters(), *lin.parameters()]
    opt = sk.ESAM(params, torch.optim.SGD, rho=RHO, beta=0.5, gamma=1.0, seed=0, lr=LR)
    for _ in range(4):
        w0 = [p.detach().clone() for p in params]
        _loss(emb, lin).backward()  # no ascent_pass: every param has a gradient, the selection is drawn now
        opt.first_step(zero_grad=True)
        chosen = {id(p) for p in (opt.step_state.perturbed or [])}
        for p, w in zip(params, w0):
            if id(p) not in chosen:
                assert torch.equal(p.detach(), w)
        opt.restore()
        for p, w in zip(params, w0):
            assert torch.equal(p.detach(), w)
        _loss(emb, lin).backward()
        opt.first_step(zero_grad=True)
        _loss(emb, lin).backward()
        opt.second_step(zero_grad=True)


def test_input_08_sparse_under_amp_refused_before_any_weight_changes():
    emb, lin = _model()
    params = [*emb.parameters(), *lin.parameters()]
    w0 = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = sk.SAM(params, torch.optim.SGD, lr=LR, grad_scaler=scaler)
    scaler.scale(_loss(emb, lin)).backward()
    with pytest.raises(TypeError, match="AMP"):
        opt.first_step()
    for p, w in zip(params, w0):
        assert torch.equal(p.detach(), w)


def _dense_grads(emb, lin):
    """The gradients at the model's current weights, dense, in float64 (by hand: _loss on copies)."""
    return _grads([emb.weight.detach().double(), lin.weight.detach().double(), lin.bias.detach().double()])


@pytest.mark.parametrize("finite_check", [True, False])
@pytest.mark.parametrize("name", ["SAM", "ASAM", "SparseSAM"])
def test_input_08_sparse_gradients_with_default_telemetry(name, finite_check):
    """The default telemetry ("norms") with a sparse embedding gradient: ‖g(w)‖, ‖g(w + e)‖ over the
    dense equivalent, ‖e‖ as written, the sharpness, all by hand in float64; the cosine stays NaN."""
    emb, lin = _model()
    params = [*emb.parameters(), *lin.parameters()]
    kw = dict(rho=RHO, lr=LR, momentum=MOM, finite_check=finite_check)
    opt = {"SAM": lambda: sk.SAM(params, torch.optim.SGD, **kw),
           "ASAM": lambda: sk.SAM(params, torch.optim.SGD, adaptive=True, eta=ETA, **kw),
           "SparseSAM": lambda: sk.SparseSAM(params, torch.optim.SGD, mask="random", sparsity=0.5, seed=0,
                                             update_freq=100, update_unit="step", **kw)}[name]()
    for _ in range(2):
        w = [p.detach().double().clone() for p in params]
        g1 = _dense_grads(emb, lin)
        loss1 = _loss(emb, lin)
        loss1.backward()
        assert emb.weight.grad.is_sparse
        opt.first_step(zero_grad=True, loss=loss1)
        wp = [p.detach().double().clone() for p in params]
        g2 = _dense_grads(emb, lin)
        loss2 = _loss(emb, lin)
        loss2.backward()
        opt.second_step(zero_grad=True, loss=loss2)
    st = opt.stats()
    norm = lambda ts: float(sum(t.square().sum() for t in ts).sqrt())  # noqa: E731
    assert st["sam_steps"] == 2
    assert st["grad_norm"] == pytest.approx(norm(g1), rel=1e-5)
    assert st["sam_grad_norm"] == pytest.approx(norm(g2), rel=1e-5)
    applied = norm([b - a for a, b in zip(w, wp)])
    assert applied > 0 and st["perturbation_norm"] == pytest.approx(applied, rel=1e-5)
    if name == "SAM":
        assert st["perturbation_norm"] == pytest.approx(RHO, rel=1e-6)
    assert st["sharpness"] == float(loss2.detach() - loss1.detach())
    assert st["grad_cosine"] != st["grad_cosine"]  # NaN: the cosine needs telemetry=True
