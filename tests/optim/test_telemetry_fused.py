"""Telemetry at the memory floor (optim/telemetry.py): g(w) is held instead of copied, and the fused
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


def amp_run(read_every_step, injects):
    """SAM + GradScaler over ``injects`` (True: an Inf in the second pass, the step is skipped);
    ``read_every_step``: stats() after every step (a fold per step) or only at the end (one fold)."""
    model, data = model_and_data()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, grad_scaler=scaler, telemetry=True,
                 telemetry_decay=0.7)
    for i, inject in enumerate(injects):
        x, y = data[i % len(data)]
        opt.zero_grad()
        loss1 = loss_of(model, x, y)
        scaler.scale(loss1).backward()

        def closure(inject=inject, x=x, y=y):
            loss = loss_of(model, x, y)
            scaler.scale(loss).backward()
            if inject:
                next(model.parameters()).grad[0, 0] = float("inf")
            return loss

        scaler.step(opt, closure, loss=loss1)
        scaler.update()
        if read_every_step:
            opt.stats()
    return opt


def test_a_batched_fold_equals_a_fold_per_step():
    """The values and averages folded in one batch (records of many steps, AMP overflows among them:
    skipped steps keep the previous values and stay out of the averages) equal the step-by-step fold."""
    injects = [False, True, False, False, True, True, False, False, False, True]
    one, batched = amp_run(True, injects), amp_run(False, injects)
    assert len(batched.telemetry.records) == len(injects)  # nothing folded before the read
    for ema in (False, True):
        a, b = one.stats(ema=ema), batched.stats(ema=ema)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, nan_ok=True), (ema, k)
    assert not batched.telemetry.records


def test_ema_over_a_long_run_equals_the_recurrence():
    """More SAM steps than one fold holds, stats() only at the end: ema_t = d·ema + (1 − d)·v_t from
    the first value, against the per-step values read by a twin optimizer."""
    from sam_kernels.optim.telemetry import FOLD

    steps = FOLD + 7
    model_a, data = model_and_data()
    model_b, _ = model_and_data()
    kw = dict(rho=RHO, lr=0.05, telemetry=True, telemetry_decay=0.8)
    a = sk.SAM(model_a.parameters(), torch.optim.SGD, **kw)
    b = sk.SAM(model_b.parameters(), torch.optim.SGD, **kw)
    values = []
    for i in range(steps):
        x, y = data[i % len(data)]
        closure_step(model_a, a, x, y)
        closure_step(model_b, b, x, y)
        values.append(b.stats()["grad_norm"])
    assert len(a.telemetry.records) == steps - FOLD  # one fold ran without a read
    ema = values[0]
    for v in values[1:]:
        ema = 0.8 * ema + 0.2 * v
    assert a.stats(ema=True)["grad_norm"] == pytest.approx(ema, rel=1e-5)
    assert a.stats()["grad_norm"] == pytest.approx(values[-1], rel=1e-6)


def test_telemetry_adds_at_most_one_device_op_to_a_step():
    """Between folds a SAM step with telemetry=True runs the same kernels as without (one reading
    g(w) as an extra list) plus one fill (the zeroed sums): the per-step scalar maths is batched.
    The default ("norms") with finite_check="pass" adds nothing (the check's norm is ‖g(w + e)‖²), with
    the default check (in the descent's pass) the zeroed sums."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "randn" not in str(func):
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    def step_ops(mode, **kw):
        """The ops the second of two SAM steps dispatches; ``mode="default"``: no telemetry= argument."""
        torch.manual_seed(0)
        params = [torch.randn(50) for _ in range(4)]
        if mode != "default":
            kw["telemetry"] = mode
        opt = sk.SAM(params, torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, **kw)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(50)
            with Count() as c:
                opt.first_step()
                for p in params:
                    p.grad = torch.randn(50)
                opt.second_step()
        assert opt.stats()["sam_steps"] == 2
        return c.ops

    counts = {mode: step_ops(mode, finite_check=False) for mode in (False, True, "norms", "default")}
    assert counts[False] == ["sam_kernels.grad_sq_norm", "sam_kernels.perturb_", "sam_kernels.sgd_restore_step_"]
    for mode in (True, "norms", "default"):
        extra = list(counts[mode])
        for op in counts[False]:
            extra.remove(op)
        assert extra == ["aten.zeros"], (mode, counts[mode])
    passed = step_ops(False, finite_check="pass")  # the check's own read of g(w + e), which "norms" reuses
    assert passed.count("sam_kernels.grad_sq_norm") == 2 and "sam_kernels.sgd_restore_step_" in passed
    assert step_ops("default", finite_check="pass") == passed
    checked = step_ops(False)  # the default check, in the descent's pass: "norms" takes the fused sums
    assert checked.count("sam_kernels.grad_sq_norm") == 1 and "sam_kernels.sgd_restore_step_" in checked
    extra = step_ops("default")
    extra.remove("aten.zeros")
    assert extra == checked


def test_values_of_a_loaded_state_dict_are_not_shown_while_telemetry_is_off():
    """A state dict saved with telemetry=True, loaded into an optimizer with telemetry off: its values
    must not show as if they were live (they never update); "norms" shows no cosine. (Found by a
    new-user trial.)"""
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
    for x, y in data[:2]:
        closure_step(model, opt, x, y)
    sd = opt.state_dict()
    for mode in (False, "norms"):
        other_model, _ = model_and_data()
        other = sk.SAM(other_model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=mode)
        other.load_state_dict(sd)
        closure_step(other_model, other, *data[2])
        for ema in (False, True):
            st = other.stats(ema=ema)
            assert st["steps"] == 3 and math.isnan(st["grad_cosine"]), (mode, ema)
            assert math.isnan(st["grad_norm"]) == (mode is False), (mode, ema)


@pytest.mark.parametrize("bad", [1, 0, "cosine", None])
def test_telemetry_option_is_checked(bad):
    model, _ = model_and_data()
    with pytest.raises(ValueError, match="telemetry must be"):
        sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=bad)


def test_a_batched_fold_with_a_changing_rho():
    """rho changed between steps (a rho schedule) and steps of another kind (ASAM) in one batch:
    each step's ‖e‖ uses its own rho, as a fold per step does."""
    runs = []
    for read_every_step in (True, False):
        model, data = model_and_data()
        opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
        norms = []
        for i, rho in enumerate((0.05, 0.1, 0.2, 0.2)):
            opt.param_groups[0]["rho"] = rho
            opt.param_groups[0]["adaptive"] = i == 2
            closure_step(model, opt, *data[i])
            if read_every_step:
                norms.append(opt.stats()["perturbation_norm"])
        runs.append((opt.stats(), opt.stats(ema=True), norms))
    (a, a_ema, norms), (b, b_ema, _) = runs
    assert norms[0] == pytest.approx(0.05, rel=1e-6) and norms[1] == pytest.approx(0.1, rel=1e-6)
    assert norms[3] == pytest.approx(0.2, rel=1e-6)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, nan_ok=True), k
        assert a_ema[k] == pytest.approx(b_ema[k], rel=1e-5, nan_ok=True), k


def test_the_copy_of_g_w_is_written_by_perturb():
    """Copy mode (a loop that zeroes p.grad in place): perturb_ writes the copy of g(w) in its own pass
    (an extra written list), no separate restore_; the cosine is the hand computation's."""
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True, finite_check=False)
    opt.telemetry.hold_grads = False  # as after a loop was seen writing p.grad in place
    opt.zero_grad(set_to_none=False)
    params = list(model.parameters())
    x, y = data[0]
    loss_of(model, x, y).backward()
    g1 = snapshot([p.grad for p in params])
    with ops.dispatch.recording() as log:
        opt.first_step()
    assert [(r.op, r.extra_lists) for r in log] == [("grad_sq_norm", 0), ("perturb_", 1)]
    opt.zero_grad(set_to_none=False)
    loss_of(model, x, y).backward()
    g2 = snapshot([p.grad for p in params])
    opt.second_step()
    dot = sum(float((a * b).sum()) for a, b in zip(g1, g2))
    norms = math.sqrt(sum(float((a * a).sum()) for a in g1) * sum(float((b * b).sum()) for b in g2))
    assert opt.stats()["grad_cosine"] == pytest.approx(dot / norms, rel=NORM_RTOL)
