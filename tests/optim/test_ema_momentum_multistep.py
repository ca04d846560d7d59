"""Friendly-SAM, VaSSO, Momentum-SAM and the multi-step ascent beyond the loop matrix: their
refusals, protocols (which weights the model holds, how many passes a step takes), forms the
matrix's rows do not take (ASAM, an AdamW base), and a cross-check against the peer library
(pytorch_optimizer, optional). Expected values come from the hand references (plain float64 torch,
transcribed from the official code), never from the package's own maths."""
from __future__ import annotations

import functools
import io

import pytest
import torch

import sam_kernels as sk
from tests.loops.harness import Run
from tests.optim.hand_reference import EPS, HandAdamW, norm
from tests.optim.hand_reference_ema import HandFriendlySAM, HandVaSSO
from tests.optim.hand_reference_momentum import HandMomentumSAM, HandMultiStepSAM
from tests.optim.variants import RHO, SGD, VariantInfo, _sam, loss_fn, make_batches, make_model, variant

BACKENDS = ("eager", "cpp")


def params():
    return make_model().parameters()


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("build,match", [
    (lambda: sk.FriendlySAM(params(), torch.optim.SGD, sigma=-1.0, lr=0.1), "sigma"),
    (lambda: sk.FriendlySAM(params(), torch.optim.SGD, lmbda=1.0, lr=0.1), "lmbda"),
    (lambda: sk.FriendlySAM(params(), torch.optim.SGD, ascent_steps=2, lr=0.1), "ascent_steps"),
    (lambda: sk.VaSSO(params(), torch.optim.SGD, theta=0.0, lr=0.1), "theta"),
    (lambda: sk.VaSSO(params(), torch.optim.SGD, ascent_steps=2, lr=0.1), "ascent_steps"),
    (lambda: sk.ESAM(params(), torch.optim.SGD, beta=0.6, ascent_steps=2, lr=0.1), "ascent_steps"),
    (lambda: sk.SparseSAM(params(), torch.optim.SGD, mask="random", ascent_steps=2, lr=0.1), "ascent_steps"),
    (lambda: sk.VaSSO(params(), torch.optim.SGD, theta=1.5, lr=0.1), "theta"),
    (lambda: sk.VaSSO(params(), torch.optim.SGD, eps=float("nan"), lr=0.1), "eps"),
    (lambda: sk.SAM(params(), torch.optim.SGD, ascent_steps=0, lr=0.1), "ascent_steps"),
    (lambda: sk.SAM(params(), torch.optim.SGD, ascent_steps=2.0, lr=0.1), "ascent_steps"),
    (lambda: sk.SAM(params(), torch.optim.SGD, ascent_steps=True, lr=0.1), "ascent_steps"),
    (lambda: sk.MomentumSAM(params(), torch.optim.SGD, lr=0.1), "momentum > 0"),
    (lambda: sk.MomentumSAM(params(), torch.optim.SGD, adaptive=True, **SGD), "adaptive"),
    (lambda: sk.MomentumSAM(params(), torch.optim.SGD, renormalize=True, **SGD), "renormalize"),
    (lambda: sk.MomentumSAM(params(), torch.optim.SGD, policy=sk.PeriodicPolicy(2), **SGD), "policy"),
    (lambda: sk.MomentumSAM(params(), torch.optim.SGD, ascent_steps=2, **SGD), "ascent_steps"),
    (lambda: sk.MomentumSAM(params(), torch.optim.Adagrad, lr=0.1), "direction_key"),
    (lambda: sk.MomentumSAM(params(), torch.optim.AdamW, decay_at="perturbed", lr=0.1), "decay_at"),
    (lambda: sk.MomentumSAM(params(), torch.optim.SGD, decay_at="both", **SGD), "decay_at"),
])
def test_bad_options_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_momentum_sam_refuses_the_two_pass_methods():
    model = make_model()
    opt = sk.MomentumSAM(model.parameters(), torch.optim.SGD, **SGD)
    (x, y), = make_batches(1)
    loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    for call in (opt.first_step, opt.second_step, opt.base_step, opt.wants_sam):
        with pytest.raises(TypeError, match="one forward/backward per step"):
            call()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


# ----------------------------------------------------------------------------- multi-step ascent

def _backward(model, x, y):
    loss_fn(model(x), y).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistep_second_step_too_early_restores_w(backend):
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, ascent_steps=3, backend=backend, **SGD)
    (x, y), = make_batches(1)
    w = [p.detach().clone() for p in model.parameters()]
    _backward(model, x, y)
    opt.first_step(zero_grad=True)
    _backward(model, x, y)
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, v) for p, v in zip(model.parameters(), w))
    _backward(model, x, y)
    with pytest.raises(RuntimeError, match="after 2 of ascent_steps=3"):
        opt.second_step()
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), w))
    assert opt.step_state.perturbed is None  # the next step starts afresh


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistep_first_step_once_too_often_raises(backend):
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, ascent_steps=2, backend=backend, **SGD)
    (x, y), = make_batches(1)
    for _ in range(2):
        _backward(model, x, y)
        opt.first_step(zero_grad=True)
    _backward(model, x, y)
    with pytest.raises(RuntimeError, match="called 3 times with ascent_steps=2"):
        opt.first_step()


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("prior_backward", [False, True])
def test_multistep_closure_runs_once_per_gradient(k, prior_backward):
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, ascent_steps=k, **SGD)
    calls = []
    for x, y in make_batches(3):
        if prior_backward:
            _backward(model, x, y)

        def closure():
            calls.append(1)
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        opt.zero_grad()
    assert len(calls) == 3 * (k if prior_backward else k + 1)
    stats = opt.stats()
    assert stats["forward_passes"] == stats["backward_passes"] == 3 * (k + 1)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistep_checkpoint_between_ascents(backend):
    """Saved after 2 of 3 ascents and resumed in fresh objects: the same weights as the run that went on
    (bitwise: the same ops on the same values)."""
    runs = []
    for reload in (False, True):
        model = make_model()
        opt = sk.SAM(model.parameters(), torch.optim.SGD, ascent_steps=3, backend=backend, **SGD)
        for t, (x, y) in enumerate(make_batches(3)):
            _backward(model, x, y)
            opt.first_step(zero_grad=True)
            _backward(model, x, y)
            opt.first_step(zero_grad=True)
            if reload and t == 1:
                saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
                model = make_model(seed=5)
                model.load_state_dict(saved["model"])
                opt = sk.SAM(model.parameters(), torch.optim.SGD, ascent_steps=3, backend=backend, **SGD)
                opt.load_state_dict(saved["opt"])
            _backward(model, x, y)
            opt.first_step(zero_grad=True)
            _backward(model, x, y)
            opt.second_step(zero_grad=True)
        assert "ascent_scratch" not in opt.state_dict()["state"][0]  # scratch is not saved between steps
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["FriendlySAM", "VaSSO", "SAM-3-step"])
def test_telemetry_reads_g_of_w_and_the_applied_perturbation(name):
    """grad_norm is ‖g(w)‖ (not of the ascent direction); perturbation_norm is ‖e‖ as applied
    (rho for a one-step ascent along any direction; not measured, NaN, for a multi-step one)."""
    model = make_model()
    opt = variant(name).build(model, telemetry="norms")
    for x, y in make_batches(2):
        _backward(model, x, y)
        g = norm([p.grad for p in model.parameters()])
        opt.step(lambda: _backward(model, x, y))
        opt.zero_grad()
        stats = opt.stats()
        assert stats["grad_norm"] == pytest.approx(float(g), rel=1e-6)
        if name == "SAM-3-step":
            assert stats["perturbation_norm"] != stats["perturbation_norm"]  # NaN: not measured
        else:
            assert stats["perturbation_norm"] == pytest.approx(RHO, rel=1e-6)


# ----------------------------------------------------------------------------- Momentum-SAM protocol

def _msam_run(backend, **kw):
    model = make_model()
    opt = sk.MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, weight_decay=1e-3, backend=backend, **SGD, **kw)
    ref = HandMomentumSAM([p.detach() for p in model.parameters()], rho=RHO, weight_decay=1e-3, **SGD)
    return model, opt, ref


def _grads_at(ws, x, y):
    model = make_model()
    with torch.no_grad():
        for p, w in zip(model.parameters(), ws):
            p.copy_(w)
    loss_fn(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _ref_w(ref: HandMomentumSAM):
    """The hand reference's unperturbed w: the held weights plus rho·v/‖v‖ (MSAM's move back)."""
    return [p + RHO * ref.inv * b for p, b in zip(ref.ws, ref.buf)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_sam_holds_the_perturbed_weights_and_evaluates_at_w(backend):
    model, opt, ref = _msam_run(backend)
    for x, y in make_batches(3):
        g = _grads_at(ref.ws, x, y)
        _backward(model, x, y)
        opt.step()
        opt.zero_grad()
        ref.step(g)
    held = [p.detach().clone() for p in model.parameters()]
    for p, w in zip(model.parameters(), ref.ws):
        torch.testing.assert_close(p.detach(), w, atol=1e-10, rtol=1e-9)
    with opt.unperturbed():
        for p, w in zip(model.parameters(), _ref_w(ref)):
            torch.testing.assert_close(p.detach(), w, atol=1e-10, rtol=1e-9)
    assert all(torch.equal(p, h) for p, h in zip(model.parameters(), held))  # w̃ again, bitwise
    opt.move_back_from_momentum_ascent()
    at_w = [p.detach().clone() for p in model.parameters()]
    opt.move_up_to_momentum_ascent()
    assert all(torch.equal(p, h) for p, h in zip(model.parameters(), held))
    opt.move_back_from_momentum_ascent()
    assert all(torch.equal(p, h) for p, h in zip(model.parameters(), at_w))
    stats = opt.stats()
    assert stats["forward_passes"] == stats["backward_passes"] == stats["steps"] == 3


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_momentum_sam_hooks_and_schedulers_see_one_step_per_step(base):
    import warnings
    model = make_model()
    opt = (sk.MomentumSAM(model.parameters(), torch.optim.SGD, **SGD) if base == "sgd" else
           sk.MomentumSAM(model.parameters(), torch.optim.AdamW, lr=1e-2))
    seen, base_seen = [], []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.base_optimizer.register_step_pre_hook(lambda o, a, k: base_seen.append("pre"))
    opt.base_optimizer.register_step_post_hook(lambda o, a, k: base_seen.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" must not appear
        for x, y in make_batches(3):
            _backward(model, x, y)
            opt.step()
            opt.zero_grad()
            sched.step()
    assert seen == ["pre", "post"] * 3
    assert base_seen == ["pre", "post"] * 3
    assert opt.param_groups[0]["lr"] == pytest.approx((0.1 if base == "sgd" else 1e-2) * 0.5 ** 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_sam_error_in_step_leaves_w(backend):
    model, opt, ref = _msam_run(backend)
    data = make_batches(3)
    for x, y in data[:2]:
        g = _grads_at(ref.ws, x, y)
        _backward(model, x, y)
        opt.step()
        opt.zero_grad()
        ref.step(g)
    x, y = data[2]
    _backward(model, x, y)
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    for p, w in zip(model.parameters(), _ref_w(ref)):
        torch.testing.assert_close(p.detach(), w, atol=1e-10, rtol=1e-9)


def test_momentum_sam_closure_is_the_one_pass():
    model, opt, ref = _msam_run(None)
    calls = []
    for t, (x, y) in enumerate(make_batches(4)):
        g = _grads_at(ref.ws, x, y)
        if t % 2:  # a backward before step(closure): the closure is not needed
            _backward(model, x, y)

        def closure():
            calls.append(t)
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert (loss is None) == bool(t % 2)
        opt.zero_grad()
        ref.step(g)
    assert calls == [0, 2]
    for p, w in zip(model.parameters(), ref.ws):
        torch.testing.assert_close(p.detach(), w, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_sam_adamw_by_hand(backend):
    """AdamW base: torch's AdamW at w with the gradient at w̃, then w̃ = w − rho·m/(‖m‖ + 1e-12), m its
    first moment (official AdamW_MSAM's direction and norm)."""
    kw = dict(lr=1e-2, weight_decay=1e-2)
    model = make_model()
    opt = sk.MomentumSAM(model.parameters(), torch.optim.AdamW, rho=RHO, backend=backend, **kw)
    w = [p.detach().clone() for p in model.parameters()]
    base = HandAdamW(**kw)
    held = w
    for x, y in make_batches(3):
        g = _grads_at(held, x, y)
        _backward(model, x, y)
        opt.step()
        opt.zero_grad()
        base.step(w, g)
        n = norm(base.m)
        held = [wi - RHO * m / (n + EPS) for wi, m in zip(w, base.m)]
        for p, h in zip(model.parameters(), held):
            torch.testing.assert_close(p.detach(), h, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_sam_checkpoint_between_steps(backend):
    """The model's state dict holds w̃, the optimizer's the backups of w: a resumed run continues."""
    model, opt, ref = _msam_run(backend)
    for t, (x, y) in enumerate(make_batches(4)):
        if t == 2:
            saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
            model = make_model(seed=5)
            model.load_state_dict(saved["model"])
            opt = sk.MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, weight_decay=1e-3, backend=backend,
                                 **SGD)
            opt.load_state_dict(saved["opt"])
            with opt.unperturbed():
                for p, w in zip(model.parameters(), _ref_w(ref)):
                    torch.testing.assert_close(p.detach(), w, atol=1e-10, rtol=1e-9)
        g = _grads_at(ref.ws, x, y)
        _backward(model, x, y)
        opt.step()
        opt.zero_grad()
        ref.step(g)
        for p, w in zip(model.parameters(), ref.ws):
            torch.testing.assert_close(p.detach(), w, atol=1e-10, rtol=1e-9)


# ----------------------------------------------------------------------------- forms the rows do not take

ROWS = [
    VariantInfo("FriendlySAM-ASAM", _sam(sk.FriendlySAM, base_optimizer=torch.optim.SGD, rho=0.5, adaptive=True,
                                         sigma=0.5, lmbda=0.8, **SGD), False,
                functools.partial(HandFriendlySAM, base="sgd", base_kwargs=SGD, rho=0.5, adaptive=True, sigma=0.5,
                                  lmbda=0.8)),
    VariantInfo("VaSSO-ASAM", _sam(sk.VaSSO, base_optimizer=torch.optim.SGD, rho=0.5, adaptive=True, theta=0.9,
                                   **SGD), False,
                functools.partial(HandVaSSO, base="sgd", base_kwargs=SGD, rho=0.5, adaptive=True, theta=0.9)),
    VariantInfo("SAM-2-step-ASAM", _sam(sk.SAM, base_optimizer=torch.optim.SGD, rho=0.5, adaptive=True,
                                        ascent_steps=2, **SGD), False,
                functools.partial(HandMultiStepSAM, base="sgd", base_kwargs=SGD, rho=0.5, adaptive=True,
                                  ascent_steps=2),
                ascent_steps=2),
    VariantInfo("LookSAM-2-step", _sam(sk.LookSAM, base_optimizer=torch.optim.SGD, rho=RHO, k=2, alpha=0.7,
                                       ascent_steps=2, **SGD), True,
                functools.partial(HandMultiStepSAM, base="sgd", base_kwargs=SGD, rho=RHO, looksam_alpha=0.7,
                                  ascent_steps=2),
                ascent_steps=2),
    VariantInfo("StableSAM-2-step", _sam(sk.StableSAM, base_optimizer=torch.optim.SGD, rho=RHO, ascent_steps=2,
                                         **SGD), False,
                functools.partial(HandMultiStepSAM, base="sgd", base_kwargs=SGD, rho=RHO, renormalize=True,
                                  ascent_steps=2),
                ascent_steps=2),
]


@pytest.mark.parametrize("info", ROWS, ids=[r.name for r in ROWS])
@pytest.mark.parametrize("loop", ["manual", "closure"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_forms_against_hand_reference(info, loop, backend):
    """ASAM forms, and the multi-step ascent composed with LookSAM's policy and reuse and with Stable SAM."""
    Run(info, backend).train(loop)


@pytest.mark.parametrize("name", ["FriendlySAM", "VaSSO"])
def test_ema_state_is_saved_and_cast(name):
    model = make_model(dtype=torch.float32)
    opt = variant(name).build(model)
    for x, y in make_batches(2, dtype=torch.float32):
        _backward(model, x, y)
        opt.first_step(zero_grad=True)
        _backward(model, x, y)
        opt.second_step(zero_grad=True)
    key = "fsam_ema" if name == "FriendlySAM" else "vasso_ema"
    sd = opt.state_dict()
    assert all(key in st for st in sd["state"].values())
    assert not any("fsam_direction" in st for st in sd["state"].values())  # scratch between steps
    model.double()
    (x, y), = make_batches(1)
    _backward(model, x.double(), y)
    opt.first_step(zero_grad=True)
    assert all(opt.state[p][key].dtype == torch.float64 for p in model.parameters())


# ----------------------------------------------------------------------------- the peer library

@pytest.mark.parametrize("backend", BACKENDS)
def test_friendly_sam_matches_pytorch_optimizer(backend):
    po = pytest.importorskip("pytorch_optimizer")
    # float32: the peer library takes the ascent norm in float32 whatever the dtype (its
    # get_global_gradient_norm), so a float64 run differs from ours by float32 rounding of ‖d‖
    kw = dict(rho=RHO, sigma=1.0, lmbda=0.6, **SGD)
    ours_model, theirs_model = make_model(torch.float32), make_model(torch.float32)
    ours = sk.FriendlySAM(ours_model.parameters(), torch.optim.SGD, backend=backend, **kw)
    theirs = po.FriendlySAM(theirs_model.parameters(), torch.optim.SGD, foreach=False, **kw)
    for x, y in make_batches(4, dtype=torch.float32):
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            _backward(model, x, y)
            opt.first_step(zero_grad=True)
            _backward(model, x, y)
            opt.second_step(zero_grad=True)
        for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), atol=2e-6, rtol=2e-5)  # the matrix's float32 tolerance


@pytest.mark.parametrize("name,directions", [("FriendlySAM", 1), ("VaSSO", 0)])
def test_ema_runs_as_one_fused_op(name, directions):
    """The EMA (and Friendly-SAM's direction) is one ema_update_ launch on the fused backend per step
    after the first, with the direction list counted as its extra list (the bytes it moves)."""
    model = make_model(dtype=torch.float32)
    opt = variant(name).build(model, backend="cpp")
    for x, y in make_batches(2, dtype=torch.float32):
        with sk.ops.recording() as log:
            opt.step(lambda: _backward(model, x, y))
        opt.zero_grad()
    calls = [r for r in log if r.op == "ema_update_"]
    assert len(calls) == 1 and [p.backend for p in calls[0].parts] == ["cpp"]
    assert calls[0].extra_lists == directions
