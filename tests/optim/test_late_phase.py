"""LatePhasePolicy: plain steps, then SAM steps in the last ``fraction`` of training (arXiv 2410.10373).

The maths of every loop is the loop matrix's (row "LatePhaseSAM"); here: where the switch falls, that
one base optimizer carries its state over it (by hand), and a checkpoint taken before the switch."""
from __future__ import annotations

import copy

import pytest
import torch

import sam_kernels as sk
from tests.optim.hand_reference import HandSAM
from tests.optim.variants import closure_of, loss_fn, make_batches, make_model


@pytest.mark.parametrize("total,fraction,switch", [(10, 0.3, 7), (10, 0.0, 10), (10, 1.0, 0), (4, 0.5, 2),
                                                   (7, 0.3, 5), (100, 0.29, 71)])
def test_switch_step(total, fraction, switch):
    """n_sam = floor(fraction·T + 1/2) SAM steps at the end: 0.3·7 = 2.1 -> 2; 0.29·100 -> 29."""
    assert sk.LatePhasePolicy(total, fraction).switch_step == switch


@pytest.mark.parametrize("kw", [dict(total_steps=0), dict(total_steps=-3), dict(total_steps=2.5),
                                dict(total_steps=True), dict(total_steps=10, fraction=1.5),
                                dict(total_steps=10, fraction=-0.1), dict(total_steps=10, fraction=float("nan"))])
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        sk.LatePhasePolicy(**kw)


def test_plain_then_sam_with_momentum_carried_over_by_hand():
    """10 steps of step(closure), T = 10, fraction 0.3: steps 0-6 are SGD steps, 7-9 SAM steps, one
    momentum buffer throughout (the hand reference keeps one HandSGD)."""
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                 policy=sk.LatePhasePolicy(10, 0.3))
    ref = HandSAM([p.detach() for p in model.parameters()], base="sgd", base_kwargs=dict(lr=0.1, momentum=0.9),
                  rho=0.05)
    oracle = make_model()
    names = [n for n, _ in oracle.named_parameters()]

    def grads_at(ws, x, y):
        leaves = [w.clone().requires_grad_() for w in ws]
        out = torch.func.functional_call(oracle, dict(zip(names, leaves)), (x,))
        return list(torch.autograd.grad(loss_fn(out, y), leaves))
    sam_steps = []
    for t, (x, y) in enumerate(make_batches(10)):
        before = opt.stats()["sam_steps"]
        opt.zero_grad()
        opt.step(closure_of(model, x, y))
        sam_steps.append(opt.stats()["sam_steps"] > before)
        ref.step(grads_at(ref.ws, x, y), lambda ws: grads_at(ws, x, y), sam=t >= 7)
        for p, w in zip(model.parameters(), ref.ws):
            torch.testing.assert_close(p.detach(), w, atol=1e-12, rtol=1e-10)
    assert sam_steps == [False] * 7 + [True] * 3
    assert opt.stats()["forward_passes"] == 13.0


def test_checkpoint_before_the_switch_resumes_bitwise():
    """state_dict at step 5 (plain phase), loaded into a fresh optimizer with a fresh policy: the
    resumed run switches at the same step and ends bitwise equal to the uninterrupted one."""
    data = make_batches(10)

    def build(model):
        return sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                      policy=sk.LatePhasePolicy(10, 0.5))

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            opt.step(closure_of(model, x, y))

    model = make_model()
    opt = build(model)
    run(model, opt, data)

    model2 = make_model()
    opt2 = build(model2)
    run(model2, opt2, data[:5])
    saved_model, saved_opt = copy.deepcopy(model2.state_dict()), copy.deepcopy(opt2.state_dict())
    model3 = make_model(seed=5)
    model3.load_state_dict(saved_model)
    opt3 = build(model3)
    opt3.load_state_dict(saved_opt)
    run(model3, opt3, data[5:])
    assert opt3.stats()["sam_steps"] == 5.0 and opt3.step_count == 10
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
