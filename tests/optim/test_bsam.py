"""BSAM: the noise rule, the protocol's errors, reproducibility and checkpoints, and the peer library.

The update itself is checked in every loop of the loop matrix (row "BSAM") against ``HandBSAM``, the
official code transcribed in float64; here the pieces a loop does not isolate."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import sam_kernels as sk
from tests.optim.hand_reference import HandBSAM
from tests.optim.variants import loss_fn, make_batches, make_model

KW = dict(lr=0.05, num_data=100, rho=0.05, weight_decay=1e-2, seed=3)


def _step(opt, model, x, y):
    with opt.ascent_pass():
        loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_noise_is_the_documented_draw_with_std_one_over_sqrt_ns():
    """Inside ascent_pass: w_noisy − w = z / sqrt(N·s), z the float32 randn draws of a CPU generator
    seeded with ``seed``, per param in order; s = s_init before the first step."""
    model = make_model()
    w = _weights(model)
    opt = sk.BSAM(model.parameters(), **{**KW, "s_init": 4.0})
    gen = torch.Generator().manual_seed(KW["seed"])
    with opt.ascent_pass():
        for p, w0 in zip(model.parameters(), w):
            z = torch.randn(p.shape, dtype=torch.float32, generator=gen).double()
            torch.testing.assert_close(p.detach() - w0, z / math.sqrt(100 * 4.0), atol=1e-15, rtol=1e-12)
    opt.restore()
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_one_step_by_hand_with_perturb_false_group():
    """SAM-ON's key with BSAM: the 2-D tensors get no perturbation but keep noise and variance update."""
    model = make_model()
    ws = [p.detach() for p in model.parameters()]
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() == 1]},
              {"params": [p for p in params if p.dim() != 1], "perturb": False}]
    opt = sk.BSAM(groups, **KW)
    one_d = [i for i, w in enumerate(ws) if w.dim() == 1]
    ref = HandBSAM(ws, **KW, perturbed=[w.dim() == 1 for w in ws],
                   draw_order=one_d + [i for i in range(len(ws)) if i not in one_d])  # the groups' order
    oracle = make_model()
    names = [n for n, _ in oracle.named_parameters()]
    for x, y in make_batches(3):
        def grads_at(w):
            leaves = [t.clone().requires_grad_() for t in w]
            out = torch.func.functional_call(oracle, dict(zip(names, leaves)), (x,))
            return list(torch.autograd.grad(loss_fn(out, y), leaves))
        _step(opt, model, x, y)
        ref.step(grads_at, grads_at)
    for p, w in zip(model.parameters(), ref.ws):
        torch.testing.assert_close(p.detach(), w, atol=1e-12, rtol=1e-10)


def test_seed_reproduces_and_another_seed_differs():
    runs = []
    for seed in (3, 3, 4):
        model = make_model()
        opt = sk.BSAM(model.parameters(), **{**KW, "seed": seed})
        for x, y in make_batches(3):
            _step(opt, model, x, y)
        runs.append(_weights(model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_checkpoint_between_steps_resumes_bitwise():
    """The generator's state and s, s_next, m travel in state_dict: a resumed run draws the same noise."""
    data = make_batches(5)
    model = make_model()
    opt = sk.BSAM(model.parameters(), **KW)
    for x, y in data:
        _step(opt, model, x, y)
    model2 = make_model()
    opt2 = sk.BSAM(model2.parameters(), **KW)
    for x, y in data[:2]:
        _step(opt2, model2, x, y)
    saved = copy.deepcopy((model2.state_dict(), opt2.state_dict()))
    model3 = make_model(seed=9)
    model3.load_state_dict(saved[0])
    opt3 = sk.BSAM(model3.parameters(), **{**KW, "seed": 123})
    opt3.load_state_dict(saved[1])
    for x, y in data[2:]:
        _step(opt3, model3, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters()))


def test_weight_decay_defaults_to_prior_precision_over_n():
    model = make_model()
    opt = sk.BSAM(model.parameters(), num_data=200, prior_precision=40.0)
    g = opt.param_groups[0]
    assert g["weight_decay"] == 0.2 and g["lr"] == 0.5 and g["rho"] == 0.01
    assert (g["beta1"], g["beta2"], g["damping"], g["s_init"]) == (0.9, 0.999, 0.1, 1.0)


def test_first_step_without_ascent_pass_raises_before_writing():
    model = make_model()
    opt = sk.BSAM(model.parameters(), **KW)
    w = _weights(model)
    x, y = make_batches(1)[0]
    loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match="ascent_pass"):
        opt.first_step()
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
    with opt.ascent_pass():  # and the optimizer still works
        loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)


def test_error_inside_ascent_pass_restores_w():
    model = make_model()
    opt = sk.BSAM(model.parameters(), **KW)
    w = _weights(model)
    with pytest.raises(ZeroDivisionError):
        with opt.ascent_pass():
            assert not all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
            1 / 0
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_non_finite_noisy_gradient_raises_with_w_restored():
    model = make_model()
    opt = sk.BSAM(model.parameters(), **KW)
    w = _weights(model)
    x, y = make_batches(1)[0]
    with opt.ascent_pass():
        loss_fn(model(x), y).backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.first_step()
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_state_dict_inside_ascent_pass_raises():
    model = make_model()
    opt = sk.BSAM(model.parameters(), **KW)
    with opt.ascent_pass():
        with pytest.raises(RuntimeError, match="noise sample"):
            opt.state_dict()
    opt.restore()
    opt.state_dict()


def test_refusals():
    model = make_model()
    with pytest.raises(RuntimeError, match="no plain step"):
        sk.BSAM(model.parameters(), **KW).base_step()
    with pytest.raises(ValueError, match="adaptive"):
        sk.BSAM([{"params": model.parameters(), "adaptive": True}], **KW)
    with pytest.raises(TypeError):
        sk.BSAM(model.parameters(), policy=sk.LatePhasePolicy(10), **KW)
    for bad in (dict(lr=-1.0), dict(beta1=1.0), dict(beta2=-0.1), dict(s_init=0.0), dict(damping=-1.0)):
        with pytest.raises(ValueError, match="BSAM: keyword arguments: invalid"):
            sk.BSAM(model.parameters(), **{**KW, **bad})
        with pytest.raises(ValueError, match="BSAM: param group 1: invalid"):
            sk.BSAM([{"params": model[0].parameters()}, {"params": model[2].parameters(), **bad}], **KW)
    with pytest.raises(ValueError, match="num_data"):
        sk.BSAM(model.parameters(), **{**KW, "num_data": 0})
    with pytest.raises(RuntimeError, match="already under way"):
        opt = sk.BSAM(model.parameters(), **KW)
        with opt.ascent_pass():
            with opt.ascent_pass():
                pass


def test_step_closure_runs_both_passes_at_the_sample_then_the_perturbation():
    """step(closure) without a first pass: closure at the sample, then at w + e (two calls)."""
    model = make_model()
    opt = sk.BSAM(model.parameters(), **KW)
    ref = copy.deepcopy(model)
    ref_opt = sk.BSAM(ref.parameters(), **KW)
    x, y = make_batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    _step(ref_opt, ref, x, y)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_peer_library_agrees_on_the_first_perturbation():
    """pytorch_optimizer.BSAM (optional: skipped where not installed). With the noise negligible
    (N = 1e30) both first perturbations are w + rho·g/s with s = 1. Its later steps differ by design
    (see sam_kernels.optim.bsam: noise kept, momentum of weight_decay·g, squared variance term)."""
    peer = pytest.importorskip("pytorch_optimizer")
    model = make_model()
    other = copy.deepcopy(model)
    x, y = make_batches(1)[0]
    ours = sk.BSAM(model.parameters(), lr=0.1, num_data=1e30, rho=0.05, weight_decay=0.0, seed=1)
    theirs = peer.BSAM(other.parameters(), num_data=1e30, lr=0.1, rho=0.05, weight_decay=0.0)
    with ours.ascent_pass():
        loss_fn(model(x), y).backward()
    ours.first_step()
    loss_fn(other(x), y).backward()
    theirs.first_step()   # their noise: std 1/(N·s), negligible here
    other.zero_grad()
    loss_fn(other(x), y).backward()
    theirs.second_step()  # w + rho·g/s
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_amp_closure_without_a_prior_backward(backend):
    """scaler.step(opt, closure) with no backward before it: both scaled passes inside, against the
    float64 hand reference; an Inf in either pass of step 1 skips that step (its noise still drawn)
    and halves the scale."""
    from tests.loops.test_amp_loops import SCALE, amp_run
    from tests.optim.variants import variant
    run = amp_run(variant("BSAM"), backend)
    run.train("closure", first_pass=True)
    assert run.scaler.get_scale() == SCALE
    for pass_no in (1, 2):
        run = amp_run(variant("BSAM"), backend)
        for t, (x, y) in enumerate(run.data):
            rec = run.closure([(x, y)], first_pass=True, overflow=pass_no if t == 1 else None)
            if t == 1:
                run.ref.skip()
                assert run.scaler.get_scale() == SCALE / 2
            else:
                run.reference_step(rec, [(x, y)])
            run.check(f"overflow in pass {pass_no}, step {t}")
