"""The fused descents (restore + torch.optim.SGD / AdamW update): every backend against the eager
reference on the op table's samples, and by hand: the telemetry sums in float64, a skipped AMP
step, the update unchanged by telemetry, bad telemetry arguments rejected before any write."""
from __future__ import annotations

import math

import pytest
import torch

import sam_kernels.ops as ops
from tests.ops.opinfo import (ALL, COMPILED, Inputs, backend_param, check_against_eager, dispatch_rows, require, run,
                              samples)
from tests.utils import assert_lists_equal

STATE = {"sgd_restore_step_": ("momentum_buffers",), "adamw_restore_step_": ("exp_avgs", "exp_avg_sqs")}


@backend_param(COMPILED)
@pytest.mark.parametrize("sample", samples("sgd_restore_step_", "adamw_restore_step_"))
def test_matches_eager(backend, sample):
    check_against_eager(require(backend), sample)


def _state(op: str, args: dict, result) -> list[torch.Tensor]:
    """The optimizer state after the call (SGD's buffers are returned: new ones for a first step)."""
    if op == "sgd_restore_step_":
        return [b for b in result if b is not None]
    return [t for name in STATE[op] for t in args[name]]


@backend_param(ALL)
@pytest.mark.parametrize("sample", samples("sgd_restore_step_", "adamw_restore_step_", extended=False))
def test_descent_by_hand(backend, sample):
    """sums += [Σ g², Σ ⟨ascent_grads, g⟩] over the grads as given (float64 by hand), sums[1] bitwise
    untouched without ascent_grads, also on a skipped step; a skipped step leaves params at the
    backups and the state as it was; params and state bitwise those of the call without telemetry."""
    require(backend)
    torch.manual_seed(0)
    result, after, before = run(backend, sample)
    c = sample.meta
    if c["amp"] == "skip":
        assert_lists_equal(after["params"], before["backups"], "params of a skipped step")
        for name in STATE[sample.op]:
            if before.get(name) is not None:
                kept = [t for t in before[name] if t is not None]
                assert_lists_equal([t for t in after[name] if t is not None], kept, f"{name} of a skipped step")
    sums = after.get("sums")
    if sums is not None:
        grads = before["grads"]
        sq = sum(float((g.double() ** 2).sum()) for g in grads)
        rel = 1e-10 if grads[0].dtype == torch.float64 else 1e-5  # the kernels sum in the compute dtype
        out_eps = 4 * torch.finfo(sums.dtype).eps  # + the output's rounding
        assert abs(float(sums[0]) - (0.5 + sq)) <= rel * sq + out_eps * (0.5 + sq)
        if before.get("ascent_grads") is not None:
            dot = sum(float((a.double() * g.double()).sum()) for a, g in zip(before["ascent_grads"], grads))
            assert abs(float(sums[1]) - dot) <= 10 * rel * abs(dot) + out_eps * abs(dot)
        else:
            assert float(sums[1]) == 0.0 and bool(torch.signbit(sums[1])), "sums[1] was written"
        torch.manual_seed(0)
        _, again, _ = run(backend, sample)
        assert_lists_equal([again["sums"]], [sums], "sums of the same call twice")
        torch.manual_seed(0)
        args, kwargs = sample.make(backend)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("sums", "ascent_grads")}
        plain = backend.call(sample.op, args, kwargs)
        plain_args = dict(zip(("params",), args))
        assert_lists_equal(after["params"], plain_args["params"], "params with telemetry vs without")
        bound = {"momentum_buffers": args[3]} if sample.op == "sgd_restore_step_" else \
            {"exp_avgs": args[3], "exp_avg_sqs": args[4]}
        assert_lists_equal(_state(sample.op, after, result), _state(sample.op, bound, plain),
                           "state with telemetry vs without")


@backend_param(dispatch_rows(ALL))
def test_ascent_grad_in_another_layout(backend):
    """An ascent grad whose memory layout differs from its param's: that entry runs eagerly (the
    others fused) and the sums still cover every entry, once."""
    device = require(backend).device
    x = Inputs([(6, 5), (4, 3, 2, 2), (7,)], torch.float64, device)
    params, backups, grads, ascent = x.randn(), x.randn(), x.randn(), x.randn()
    ascent[0] = ascent[0].t().contiguous().t()  # same values, column-major
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    backend.call("sgd_restore_step_", (params, backups, grads, None), dict(lr=0.1, ascent_grads=ascent, sums=sums))
    rec = ops.last_call["sgd_restore_step_"]
    assert rec.extra_lists == 1 and sum(p.tensors for p in rec.parts) == 3
    if backend.name != "eager":
        assert sorted(p.backend for p in rec.parts) == sorted(["eager", backend.name])
    assert math.isclose(float(sums[0]), sum(float((g * g).sum()) for g in grads), rel_tol=1e-12)
    assert math.isclose(float(sums[1]), sum(float((a * g).sum()) for a, g in zip(ascent, grads)), rel_tol=1e-12)


@backend_param(ALL)
@pytest.mark.parametrize("op", list(STATE))
def test_bad_telemetry_rejected_before_writing(backend, op):
    device = require(backend).device
    x = Inputs([(5,), (3, 4)], torch.float32, device)
    params, backups, grads = x.randn(), x.randn(), x.randn()
    before = [p.clone() for p in params]
    good = torch.zeros(2, device=device)
    bad_calls = [
        (ValueError, dict(ascent_grads=grads)),  # no sums
        (TypeError, dict(sums=torch.zeros(3, device=device))),
        (TypeError, dict(sums=torch.zeros(2, dtype=torch.int64, device=device))),
        (TypeError, dict(sums=torch.zeros(2, 2, device=device)[:, 0])),  # not contiguous
        (ValueError, dict(sums=good, ascent_grads=grads[:1])),
        (TypeError, dict(sums=good, ascent_grads=[g.double() for g in grads])),
        (ValueError, dict(sums=good, ascent_grads=[torch.zeros(4, device=device), grads[1]])),
    ]
    for err, kw in bad_calls:
        with pytest.raises(err):
            if op == "sgd_restore_step_":
                backend.call(op, (params, backups, grads, None), dict(lr=0.1, momentum=0.9, **kw))
            else:
                backend.call(op, (params, backups, grads, x.randn(), x.randn(positive=True), 1), dict(lr=0.1, **kw))
        assert_lists_equal(params, before, f"params after a rejected call ({kw})")
        assert float(good.abs().sum()) == 0.0
