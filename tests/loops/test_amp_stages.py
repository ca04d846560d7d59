"""fp16 GradScaler loops with ``scaler.unscale_`` at every place torch allows it and an overflow in
either pass, every variant, against the float64 hand reference (see ``amp_hand``).

- The manual loop (``first_step`` by hand, ``scaler.step(opt)`` or ``opt.second_step()`` at the end)
  and README's closure loop (``scaler.step(opt, closure)``), ``unscale_`` + clipping after the first
  pass, after the second (inside the closure), after both, or never.
- ESAM's per-sample closure under ``scaler.step(opt, closure)``, and ESAM's manual protocol.
- An Inf in a gradient of the first or the second pass skips the whole step (weights and state
  bitwise as they were, the scale halved); also when clipping hid it after ``unscale_``.
"""
from __future__ import annotations

import pytest
import torch

import sam_kernels as sk
from tests.loops.amp_hand import (CLIP, SCALE, STEPS, VARIANTS, Hand, Overflow, Record, assert_bitwise,
                                  assert_follows, base_state, build, check_step, closure_step, esam_closure_step, hand_clip, make_data,
                                  make_model, make_scaler, manual_step, norm, weights)

OVERFLOW_STEP = 2  # a SAM step for every variant with a decision rule (LookSAM: steps 0 and 2)
PLACES = (None, 1, 2, "both")
BACKENDS = ("eager", "cpp")


def train(variant, backend, loop, place, overflow_pass, steps=STEPS, **opt_kw):
    """Run ``loop`` for ``steps`` steps, checking every step against the hand reference. ``loop``:
    "manual", "manual-second_step", "closure" or "esam-closure" (ESAM's per-sample closure)."""
    model, data = make_model(), make_data(steps)
    scaler = make_scaler()
    opt = build(variant, model.parameters(), scaler, backend, **opt_kw)
    hand = Hand(variant, model)
    overflow = Overflow(model, OVERFLOW_STEP, overflow_pass)
    sam_steps = 0
    for t, (x, y) in enumerate(data):
        clip1 = place in (1, "both")
        g1 = hand.grads(hand.w, x, y)
        assert norm(g1) > 2 * CLIP, "clipping must change the gradients"
        g1 = hand_clip(g1) if clip1 else g1
        hits = overflow_pass is not None and t == OVERFLOW_STEP
        expected = hand.decides(g1, hits and overflow_pass == 1, clip1)
        before = weights(model), base_state(opt), scaler.get_scale()
        if loop == "esam-closure":
            rec = esam_closure_step(opt, model, scaler, x, y, t, overflow)
        elif loop == "closure":
            rec = closure_step(opt, model, scaler, x, y, t, place, overflow)
        else:
            finish = "second_step" if loop == "manual-second_step" else "scaler"
            rec = manual_step(opt, model, scaler, x, y, t, place, overflow, finish)
        if expected is not None:
            assert rec.sam == expected, f"step {t}: the policy's decision"
        sam_steps += rec.sam
        assert rec.sam or not (hits and overflow_pass == 2), "the overflow step must have a second pass"
        skip = hits and (overflow_pass == 1 or rec.sam)
        hand.step(x, y, g1, rec, clip2=place in (2, "both"), skip=skip)
        check_step(model, opt, scaler, hand, before, skip, f"step {t}")
    assert sam_steps > 0
    assert sk.ops.last_used["sgd_restore_step_"] == backend  # no silent fallback to another backend
    return opt, scaler


def loops_of(variant):
    # ESAM.step's closure is per-sample and runs both passes: ESAM's closure loop is its own test.
    return ("manual", "manual-second_step") if variant == "esam" else ("manual", "manual-second_step", "closure")


CASES = [pytest.param(v, loop, id=f"{v}-{loop}") for v in VARIANTS for loop in loops_of(v)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overflow_pass", [None, 1, 2], ids=["no-overflow", "overflow1", "overflow2"])
@pytest.mark.parametrize("place", PLACES, ids=[f"unscale{p}" for p in PLACES])
@pytest.mark.parametrize("variant,loop", CASES)
def test_input_02_unscale_at_any_pass(variant, loop, place, overflow_pass, backend):
    """``scaler.unscale_(opt)`` (then clip_grad_norm_) after pass 1, pass 2 (inside the closure),
    both or neither: each pass is unscaled exactly once (the issue: pass 1 unscaled made the descent
    use the still-scaled pass 2, 1024x too large; unscale_ inside the closure made it 1/1024)."""
    train(variant, backend, loop, place, overflow_pass)


TRITON_CASES = [pytest.param(v, loop, place, o, id=f"{v}-{loop}-unscale{place}-overflow{o}")
                for v, loop in (("sam", "manual"), ("stable", "closure"), ("esam", "manual"))
                for place, o in ((1, None), (2, 2), ("both", 1))]


@pytest.mark.parametrize("variant,loop,place,overflow_pass", TRITON_CASES)
def test_input_02_unscale_at_any_pass_triton(variant, loop, place, overflow_pass):
    train(variant, "triton", loop, place, overflow_pass, steps=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overflow_pass", [None, 1, 2], ids=["no-overflow", "overflow1", "overflow2"])
@pytest.mark.parametrize("gamma", [1.0, 0.5], ids=["swp", "swp+sds"])
def test_input_03_esam_per_sample_closure_under_scaler_step(gamma, overflow_pass, backend):
    """``scaler.step(opt, closure)`` with ESAM's per-sample closure, from the very first iteration
    (the scaler has scaled nothing before it: attaching it created its scale)."""
    train("esam", backend, "esam-closure", None, overflow_pass, gamma=gamma)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("finish", ["manual", "manual-second_step"])
def test_input_03_esam_manual_loop(finish, backend):
    """README's manual fp16 loop with ESAM: ``scaler.step(opt)`` ends the step ``first_step`` began."""
    train("esam", backend, finish, None, None)


@pytest.mark.parametrize("variant", ["sam", "sssam", "looksam"])
def test_closure_giving_the_first_pass_too_runs_from_the_first_iteration(variant):
    """``scaler.step(opt, closure)`` on an optimizer without gradients: the closure gives both passes,
    and the scaler has scaled no loss before the first call (it has no scale of its own yet)."""
    model, data = make_model(), make_data()
    scaler = make_scaler()
    opt = build(variant, model.parameters(), scaler, "cpp")
    hand = Hand(variant, model)
    for t, (x, y) in enumerate(data):
        calls = []

        def closure():
            calls.append(1)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss

        g1 = hand.grads(hand.w, x, y)
        expected = hand.decides(g1, False, False)
        scaler.step(opt, closure)
        scaler.update()
        opt.zero_grad()
        rec = Record(sam=len(calls) == 2)
        if expected is not None:
            assert rec.sam == expected
        hand.step(x, y, g1, rec, clip2=False, skip=False)
        assert_follows(model, hand, f"step {t}")
    assert scaler.get_scale() == SCALE


@pytest.mark.parametrize("loop", ["manual", "manual-second_step", "closure"])
@pytest.mark.parametrize("pass_no", [1, 2])
def test_input_02_overflow_hidden_by_clipping_after_unscale_still_skips(loop, pass_no):
    """An Inf that ``clip_grad_value_`` turns finite after ``scaler.unscale_`` was still an overflow:
    ``unscale_`` recorded it, and torch's own optimizers skip the step for it; so does SAM."""
    model, data = make_model(), make_data(2)
    scaler = make_scaler()
    opt = build("sam", model.parameters(), scaler, "cpp")
    manual_step(opt, model, scaler, *data[0], 0, None, Overflow(model, None, None))  # state exists
    w0, state0 = weights(model), base_state(opt)
    x, y = data[1]

    def backward(p):
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if p == pass_no:
            with torch.no_grad():
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    backward(1)
    if loop == "closure":
        scaler.step(opt, lambda: backward(2))
    else:
        opt.first_step(zero_grad=True)
        backward(2)
        scaler.step(opt) if loop == "manual" else opt.second_step()
    scaler.update()
    assert_bitwise(weights(model), w0, "weights after the skipped step")
    assert_bitwise(base_state(opt), state0, "base state after the skipped step")
    assert scaler.get_scale() == SCALE / 2


def test_unscale_twice_in_one_pass_is_torchs_error_and_the_step_restores():
    """Two ``unscale_`` calls in one pass (inside the closure) are GradScaler's own error; raised
    inside ``step``, it leaves the weights at w."""
    model, data = make_model(), make_data(1)
    scaler = make_scaler()
    opt = build("sam", model.parameters(), scaler, "cpp")
    x, y = data[0]
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    w0 = weights(model)

    def closure():
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        scaler.unscale_(opt)

    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        scaler.step(opt, closure)
    assert_bitwise(weights(model), w0, "weights after the error")
    assert opt.step_state.perturbed is None


@pytest.mark.parametrize("loop", ["manual", "closure"])
@pytest.mark.parametrize("place", [1, 2], ids=["unscale1", "unscale2"])
def test_telemetry_norms_are_unscaled_whichever_pass_was_unscaled(loop, place):
    """‖g(w)‖ and ‖g(w + e)‖ of telemetry when one pass carries the scale and the other does not."""
    model, data = make_model(), make_data(1)
    scaler = make_scaler()
    opt = build("sam", model.parameters(), scaler, "cpp", telemetry="norms")
    hand = Hand("sam", model)
    x, y = data[0]
    g1 = hand.grads(hand.w, x, y)
    g1 = hand_clip(g1) if place == 1 else g1
    e = hand.perturbation(g1, Record(sam=True))
    g2 = hand.grads([a + b for a, b in zip(hand.w, e)], x, y)
    g2 = hand_clip(g2) if place == 2 else g2
    step = manual_step if loop == "manual" else closure_step
    step(opt, model, scaler, x, y, 0, place, Overflow(model, None, None))
    stats = opt.stats()
    assert stats["grad_norm"] == pytest.approx(norm(g1), rel=1e-5)
    assert stats["sam_grad_norm"] == pytest.approx(norm(g2), rel=1e-5)
