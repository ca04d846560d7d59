"""Telemetry at the memory floor (optim/stats.py): g(w) is held instead of copied, and the fused
descent (``ops.sgd_restore_step_``/``adamw_restore_step_`` with ``ascent_grads``/``sums``) takes
‖g(w+e)‖² and ⟨g(w), g(w+e)⟩ in its own pass. Checked here: the values still equal a hand
computation on every path (fused SGD/AdamW, generic base, AMP, in-place zeroing loops, mid-step
dtype change), telemetry never changes a weight, and which path ran (op records, bytes).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import sam_kernels as sk
from sam_kernels import ops

from .test_telemetry import NORM_RTOL, RHO, assert_norms, closure_step, hand, loss_of, model_and_data, snapshot

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2)),  # no fused descent: telemetry's own reductions
}


def run(base, telemetry, steps=3, **kw):
    model, data = model_and_data()
    cls, hp = BASES[base]
    opt = sk.SAM(model.parameters(), cls, rho=RHO, telemetry=telemetry, **hp, **kw)
    seen = None
    for x, y in data[:steps]:
        seen = closure_step(model, opt, x, y)
    return model, opt, seen


@pytest.mark.parametrize("finite_check", [False, True])
@pytest.mark.parametrize("base", list(BASES))
def test_values_equal_hand_computation_on_every_descent_path(base, finite_check):
    _, opt, seen = run(base, True, finite_check=finite_check)
    st, h = opt.stats(), hand(seen)
    assert_norms(st, h)
    assert st["perturbation_norm"] == pytest.approx(RHO, rel=1e-6)


@pytest.mark.parametrize("base", list(BASES))
def test_telemetry_never_changes_a_weight(base):
    """The fused descent with sums writes exactly what it writes without them (every backend shares
    one update formula; the sums are only read side effects)."""
    m_off, opt_off, _ = run(base, False, steps=4)
    for mode in (True, "norms"):
        m_on, opt_on, _ = run(base, mode, steps=4)
        for a, b in zip(m_off.parameters(), m_on.parameters()):
            assert torch.equal(a, b), (base, mode)
        for a, b in zip(opt_off.base_optimizer.state.values(), opt_on.base_optimizer.state.values()):
            for k in a:
                assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), (base, mode, k)


def test_the_fused_descent_takes_the_sums_and_nothing_else_reads_the_gradients_again():
    """telemetry=True, no finite check, SGD: the ops of one SAM step are exactly grad_sq_norm and
    perturb_ (first_step) and one sgd_restore_step_ that read g(w) as an extra list: no copy of g(w)
    (restore_), no separate dot or norm of g(w+e)."""
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, telemetry=True,
                 finite_check=False)
    x, y = data[0]
    loss1 = loss_of(model, x, y)
    loss1.backward()
    with ops.dispatch.recording() as log:
        opt.first_step(zero_grad=True, loss=loss1)
        loss2 = loss_of(model, x, y)
        loss2.backward()
        opt.second_step(zero_grad=True, loss=loss2)
    assert [(r.op, r.extra_lists) for r in log] == [("grad_sq_norm", 0), ("perturb_", 0),
                                                    ("sgd_restore_step_", 1)]
    assert math.isfinite(opt.stats()["grad_cosine"])


def inplace_zeroing_step(model, opt, x, y):
    """The manual loop with zero_grad(set_to_none=False): p.grad is zeroed and refilled in place."""
    params = list(model.parameters())
    loss1 = loss_of(model, x, y)
    loss1.backward()
    seen = {"g1": snapshot([p.grad for p in params]), "w": snapshot(params), "loss1": loss1.detach()}
    opt.first_step(loss=loss1)
    opt.zero_grad(set_to_none=False)
    loss2 = loss_of(model, x, y)
    loss2.backward()
    seen.update(g2=snapshot([p.grad for p in params]), wp=snapshot(params), loss2=loss2.detach())
    opt.second_step(loss=loss2)
    opt.zero_grad(set_to_none=False)
    return seen


@pytest.mark.parametrize("base", list(BASES))
def test_a_loop_that_zeroes_gradients_in_place_gets_nan_once_then_a_copy(base):
    """A held g(w) that the loop overwrote is never used: that step's cosine is NaN (with one
    warning), every later step copies g(w) and reports the right cosine; the weights equal a run
    without telemetry throughout."""
    cls, hp = BASES[base]
    runs = {}
    for telemetry in (False, True):
        model, data = model_and_data()
        opt = sk.SAM(model.parameters(), cls, rho=RHO, telemetry=telemetry, **hp)
        opt.zero_grad(set_to_none=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen = inplace_zeroing_step(model, opt, *data[0])
            if telemetry:
                st = opt.stats()
                assert math.isnan(st["grad_cosine"])
                assert st["sam_grad_norm"] == pytest.approx(hand(seen)["sam_grad_norm"], rel=NORM_RTOL)
            for x, y in data[1:3]:
                seen = inplace_zeroing_step(model, opt, x, y)
        ours = [w for w in caught if "first-pass gradients" in str(w.message)]
        assert len(ours) == (1 if telemetry else 0)
        if telemetry:
            assert_norms(opt.stats(), hand(seen))
            assert not opt.telemetry.hold_grads
            assert not opt.state_dict()["sam"]["telemetry"]["hold_grads"]
        runs[telemetry] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(runs[False], runs[True]):
        assert torch.equal(a, b)


def test_a_loop_that_never_zeroes_between_the_passes_is_caught():
    """No zero_grad between the passes (a loop bug: the descent uses g(w) + g(w+e)): the held g(w)
    was accumulated into, so the cosine is NaN rather than a value computed from a sum."""
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
    x, y = data[0]
    loss_of(model, x, y).backward()
    opt.first_step()
    loss_of(model, x, y).backward()
    with pytest.warns(RuntimeWarning, match="first-pass gradients"):
        opt.second_step()
    assert math.isnan(opt.stats()["grad_cosine"])


def test_amp_fused_sums_are_unscaled_and_equal_the_unscaled_run():
    """GradScaler: the sums are of the scaled gradients; ‖g(w+e)‖ is divided by the scale and the
    cosine needs no unscaling (both norms and the dot carry S²)."""
    values = {}
    for use_scaler in (False, True):
        model, data = model_and_data()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, grad_scaler=scaler, telemetry=True,
                     finite_check=False)
        x, y = data[0]
        loss1 = loss_of(model, x, y)
        (scaler.scale(loss1) if scaler else loss1).backward()
        opt.first_step(zero_grad=True, loss=loss1)
        loss2 = loss_of(model, x, y)
        (scaler.scale(loss2) if scaler else loss2).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.second_step(zero_grad=True, loss=loss2)
        values[use_scaler] = opt.stats()
    for key in ("grad_norm", "sam_grad_norm", "grad_cosine"):
        assert values[True][key] == pytest.approx(values[False][key], rel=NORM_RTOL), key


def test_a_param_cast_mid_step_keeps_the_step_and_the_norms():
    """model.double() between the passes: g(w) (fp32) no longer matches g(w+e) (fp64), so the fused
    dot is not used (the kernel would reject the lists); the step and ‖g(w+e)‖ still go through."""
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, telemetry=True)
    x, y = data[0]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    model.double()
    loss_of(model, x.double(), y).backward()
    g2 = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    st = opt.stats()
    assert st["sam_grad_norm"] == pytest.approx(math.sqrt(sum(float((g * g).sum()) for g in g2)), rel=NORM_RTOL)
    assert all(p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("variant", ["asam", "sparse"])
def test_the_applied_perturbation_is_summed_by_perturb(variant):
    """ASAM / Sparse SAM: ‖e‖ as applied comes from perturb_'s own pass (perturbation_sq), not from a
    subtraction and a norm over the parameters afterwards; it equals ‖w + e − w‖ of the stored values."""
    model, data = model_and_data()
    params = list(model.parameters())
    if variant == "asam":
        opt = sk.SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, telemetry=True)
    else:
        opt = sk.SparseSAM(params, torch.optim.SGD, rho=RHO, mask="random", sparsity=0.5, seed=0, lr=0.1,
                           telemetry=True)
    x, y = data[0]
    loss_of(model, x, y).backward()
    w = snapshot(params)
    with ops.dispatch.recording() as log:
        opt.first_step(zero_grad=True)
    applied = math.sqrt(sum(float(((p.detach().double() - a) ** 2).sum()) for p, a in zip(params, w)))
    assert "perturb_" in [r.op for r in log]
    # the ascent norm, plus the plain ‖g‖ under ASAM (its ascent norm is ‖T⊙g‖); no norm of w + e − w
    assert [r.op for r in log].count("grad_sq_norm") == (2 if variant == "asam" else 1)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert opt.stats()["perturbation_norm"] == pytest.approx(applied, rel=1e-6)
    assert 0 < applied
