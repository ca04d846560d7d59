"""A checkpoint {model, optimizer, scaler} taken mid-step under fp16 GradScaler (after ``first_step``)
and loaded into fresh objects: the resumed step is the uninterrupted one, a first-pass overflow
included (the step is skipped and the new scaler backs off), every variant, against the float64
hand reference (see ``amp_hand``)."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

import sam_kernels as sk
from tests.loops.amp_hand import (CLIP, VARIANTS, Hand, Overflow, Record, base_state, build, check_step, clip,
                                  hand_clip, loss_of, make_data, make_model, make_scaler, manual_step, norm,
                                  read_choices, weights)

CHECKPOINT_STEP = 2  # a SAM step of every variant (see amp_hand's data)
BACKENDS = ("eager", "cpp")


def step_resumed_mid_way(variant, backend, model, opt, scaler, x, y, t, place, overflow: Overflow):
    """One manual-loop step saved after ``first_step`` and finished by fresh objects loaded from the
    save. ``place``: ``scaler.unscale_`` + clipping of pass 1 (before the save) or of pass 2 (after
    the load, by the new scaler). Returns (record, model, opt, scaler, the new model's Overflow, whether
    it was saved mid-step)."""
    rec = Record()
    overflow.at(t, 1)
    with opt.ascent_pass() if isinstance(opt, sk.ESAM) else contextlib.nullcontext():
        scaler.scale(loss_of(model, x, y)).backward()
    if place == 1:
        scaler.unscale_(opt)
        clip(model)
    if not opt.wants_sam():  # AE-SAM after clipping pass 1: one pass, nothing pending
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return rec, model, opt, scaler, overflow, False
    opt.first_step(zero_grad=True)
    read_choices(opt, rec)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model = make_model(seed=5)
    model.load_state_dict(saved["model"])
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(saved["scaler"])
    opt = build(variant, model.parameters(), scaler, backend)
    opt.load_state_dict(saved["opt"])
    overflow = overflow.on(model)
    overflow.at(t, 2)
    scaler.scale(loss_of(model, x, y)).backward()
    if place == 2:
        scaler.unscale_(opt)
        clip(model)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return rec, model, opt, scaler, overflow, True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("place", [None, 1, 2], ids=["no-unscale", "unscale-before-save", "unscale-after-load"])
@pytest.mark.parametrize("overflow_pass", [None, 1, 2], ids=["no-overflow", "overflow1", "overflow2"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_input_04_mid_step_checkpoint_keeps_the_pending_overflow(variant, overflow_pass, place, backend):
    """The issue: a first-pass overflow, ``first_step``, save, load, second pass, ``scaler.step``: the
    resumed run applied the step and kept the scale. The pending overflow now travels in the state
    dict and reaches the new scaler."""
    model, data = make_model(), make_data()
    scaler = make_scaler()
    opt = build(variant, model.parameters(), scaler, backend)
    hand = Hand(variant, model)
    overflow = Overflow(model, CHECKPOINT_STEP, overflow_pass)
    saved_mid_step = False
    for t, (x, y) in enumerate(data):
        g1 = hand.grads(hand.w, x, y)
        assert norm(g1) > 2 * CLIP, "clipping must change the gradients"
        here = t == CHECKPOINT_STEP
        clip1 = here and place == 1
        g1 = hand_clip(g1) if clip1 else g1
        expected = hand.decides(g1, here and overflow_pass == 1, clip1)
        before = weights(model), base_state(opt), scaler.get_scale()
        if here:
            rec, model, opt, scaler, overflow, saved_mid_step = step_resumed_mid_way(
                variant, backend, model, opt, scaler, x, y, t, place, overflow)
        else:
            rec = manual_step(opt, model, scaler, x, y, t, None, overflow)
        if expected is not None:
            assert rec.sam == expected, f"step {t}: the policy's decision"
        skip = here and (overflow_pass == 1 or (overflow_pass == 2 and rec.sam))
        hand.step(x, y, g1, rec, clip2=here and place == 2, skip=skip)
        check_step(model, opt, scaler, hand, before, skip, f"step {t}")
    # only AE-SAM after clipping pass 1 (a small or NaN norm: its policy says plain) has no mid-step save
    assert saved_mid_step or (variant in ("aesam", "aelooksam") and place == 1)
    assert sk.ops.last_used["sgd_restore_step_"] == backend


def test_state_dict_between_steps_has_no_pending_overflow():
    model, data = make_model(), make_data(1)
    scaler = make_scaler()
    opt = build("sam", model.parameters(), scaler, "cpp")
    manual_step(opt, model, scaler, *data[0], 0, None, Overflow(model, 0, 1))
    assert scaler.get_scale() == make_scaler().get_scale() / 2  # the step overflowed and was skipped
    assert opt.state_dict()["sam"]["found"] is None
