"""The finite check in the fused SGD descent's own pass (``nonfinite`` / ``momentum_out``), by hand:
a finite step equals torch.optim.SGD's; a NaN/Inf gradient anywhere (first tensor, last tensor, deep
inside a large one) leaves params at the backups and momentum_out at the old buffers, bitwise, and
sets the flag, on every backend (CUDA and Triton undo on the device, in a second launch). (The
op-table samples compare every backend with the eager reference: tests/ops/test_descents.py.)"""
from __future__ import annotations

import pytest
import torch

import sam_kernels.ops as ops
from tests.ops.opinfo import ALL, backend_param, require
from tests.utils import DTYPES, assert_close, assert_lists_equal

ROWS = ALL
TOL = {dtype: (atol, rtol) for dtype, atol, rtol in DTYPES}
SHAPES = [(1,), (7,), (100_001,), (13, 17), (4, 6)]  # 100,001: four chunks of the CPU kernel
CONFIGS = {
    "momentum": dict(momentum=0.9, weight_decay=5e-4),
    "nesterov": dict(momentum=0.9, weight_decay=1e-2, nesterov=True),
    "dampening-maximize": dict(momentum=0.8, dampening=0.1, weight_decay=1e-2, maximize=True),
    "plain": dict(momentum=0.0, weight_decay=1e-2),
}
FAULTS = {"first": (0, 0), "middle": (3, 100), "last": (4, 23), "large": (2, 70_000)}


def _inputs(device: str, dtype: torch.dtype, scale: float = 1.0):
    torch.manual_seed(0)
    make = lambda: [torch.randn(s, device=device).to(dtype) for s in SHAPES]  # noqa: E731
    params, backups, grads, old, out = make(), make(), make(), make(), make()
    for g in grads:
        g.mul_(scale)
    return params, backups, grads, old, out


def _torch_sgd(backups, grads, old, cfg, lr, first: bool):
    """torch.optim.SGD's step from w = backups with ``grads`` (unscaled) and ``old`` buffers."""
    ps = [torch.nn.Parameter(b.clone()) for b in backups]
    opt = torch.optim.SGD(ps, lr=lr, **cfg)
    for p, g, o in zip(ps, grads, old):
        p.grad = g.clone()
        if cfg["momentum"] and not first:
            opt.state[p]["momentum_buffer"] = o.clone()
    opt.step()
    bufs = [opt.state[p].get("momentum_buffer") for p in ps]
    return [p.detach() for p in ps], bufs


def _call(backend, params, backups, grads, old, out, cfg, flag, **kw):
    has = cfg["momentum"] != 0
    return backend.call("sgd_restore_step_", (params, backups, grads, old if has else None),
                        dict(lr=0.1, **cfg, nonfinite=flag, momentum_out=out if has and old is not None else None,
                             **kw))


@backend_param(ROWS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_finite_step_is_torch_sgd(backend, config, dtype, scaled):
    require(backend)
    cfg = CONFIGS[config]
    scale = 1024.0 if scaled else 1.0
    params, backups, grads, old, out = _inputs(backend.device, dtype, scale)
    flag = torch.zeros((), device=backend.device)
    amp = dict(grad_scale=torch.tensor(scale, device=backend.device)) if scaled else {}
    old_before = [o.clone() for o in old]
    result = _call(backend, params, backups, grads, old, out, cfg, flag, **amp)
    want_w, want_bufs = _torch_sgd(backups, [g / scale for g in grads], old, cfg, 0.1, first=False)
    atol, rtol = TOL[dtype]
    for i, (p, w) in enumerate(zip(params, want_w)):
        assert_close(p, w, 10 * atol, 10 * rtol, f"params[{i}]")
    assert float(flag) == 0.0
    assert_lists_equal(old, old_before, "old buffers (only read)")
    if cfg["momentum"]:
        assert all(r is o for r, o in zip(result, out)), "the new buffers are momentum_out"
        for i, (o, b) in enumerate(zip(out, want_bufs)):
            assert_close(o, b, 10 * atol, 10 * rtol, f"momentum_out[{i}]")


VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _fault_cases():
    """(backend, fault, value) rows: every place with every value; one value per place on an
    interpreted row (slow)."""
    out = []
    for b in ROWS:
        for i, fault in enumerate(FAULTS):
            for j, value in enumerate(VALUES):
                if not b.interpreted or i % len(VALUES) == j:
                    out.append(pytest.param(b, fault, VALUES[value], id=f"{value}-{fault}-{b.id}"))
    return out


@pytest.mark.parametrize("backend,fault,value", _fault_cases())
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fault_restores_everything(backend, config, fault, value, dtype):
    require(backend)
    cfg = CONFIGS[config]
    params, backups, grads, old, out = _inputs(backend.device, dtype)
    at, index = FAULTS[fault]
    grads[at].view(-1)[index] = value
    flag = torch.zeros((), device=backend.device)
    before = [[t.clone() for t in lst] for lst in (backups, grads, old)]
    _call(backend, params, backups, grads, old, out, cfg, flag)
    assert float(flag) == 1.0
    assert_lists_equal(params, before[0], "params (at the backups)")
    assert_lists_equal(grads, before[1], "grads")
    assert_lists_equal(old, before[2], "old buffers")
    if cfg["momentum"]:
        assert_lists_equal(out, before[2], "momentum_out (the old buffers)")


@backend_param(ROWS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: the Inf tested
def test_scaled_overflow_and_flag_set_before(backend):
    """An element finite as given but Inf once divided by a loss scale < 1 counts; a flag already set
    restores a finite step too (the flag is never cleared)."""
    require(backend)
    cfg = CONFIGS["momentum"]
    params, backups, grads, old, out = _inputs(backend.device, torch.float32)
    grads[1][3] = 3e38
    flag = torch.zeros((), device=backend.device)
    _call(backend, params, backups, grads, old, out, cfg, flag, grad_scale=torch.tensor(0.25, device=backend.device))
    assert float(flag) == 1.0
    assert_lists_equal(params, backups, "params")
    assert_lists_equal(out, old, "momentum_out")
    params, backups, grads, old, out = _inputs(backend.device, torch.float32)
    flag = torch.ones((), device=backend.device)
    _call(backend, params, backups, grads, old, out, cfg, flag)
    assert float(flag) == 1.0
    assert_lists_equal(params, backups, "params")
    assert_lists_equal(out, old, "momentum_out")


@backend_param(ROWS)
@pytest.mark.parametrize("config", ["momentum", "plain"])
@pytest.mark.parametrize("telemetry", [False, True], ids=["check", "check+sums"])
@pytest.mark.parametrize("alias", [False, True], ids=["out", "out-is-grads"])
def test_huge_finite_gradients_are_not_faults(backend, config, telemetry, alias):
    """Finite gradients whose squares overflow fp32 (|g| > 1.8e19: the sum of squares is Inf) are
    not a fault: the step is taken, as float64 maths gives it. ``alias``: momentum_out is the grads
    themselves (SAM's hand-over): the look at a block's elements must see g, not the new buffer."""
    require(backend)
    cfg = CONFIGS[config]
    params, backups, grads, old, out = _inputs(backend.device, torch.float32)
    grads[2].view(-1)[70_000] = 3e30
    grads[4][1, 2] = -1e20
    given = [g.clone() for g in grads]
    if alias:
        out = grads
    flag = torch.zeros((), device=backend.device)
    sums = dict(sums=torch.zeros(2, device=backend.device)) if telemetry else {}
    _call(backend, params, backups, grads, old, out, cfg, flag, **sums)
    assert float(flag) == 0.0
    f64 = lambda lst: [t.double().cpu() for t in lst]  # noqa: E731
    mom, wd = cfg["momentum"], cfg["weight_decay"]
    atol, rtol = TOL[torch.float32]
    for i, (b, g, o) in enumerate(zip(f64(backups), f64(given), f64(old))):
        d = g + wd * b
        v = mom * o + d if mom else d
        assert_close(params[i].double().cpu(), b - 0.1 * v, 10 * atol, 10 * rtol, f"params[{i}]")
        if mom:
            assert_close(out[i].double().cpu(), v, 10 * atol, 10 * rtol, f"momentum_out[{i}]")
    if telemetry:
        assert float(sums["sums"][0]) == float("inf")  # Σ g² in fp32, as the telemetry contract says


@backend_param(ROWS)
@pytest.mark.parametrize("fault", ["first", "large"])
@pytest.mark.parametrize("alias", [False, True], ids=["out", "out-is-grads"])
def test_fault_with_telemetry_sums(backend, fault, alias):
    """With the telemetry sums taken in the same pass a NaN is still a fault: everything restored
    (momentum_out too when it is the grads themselves)."""
    require(backend)
    cfg = CONFIGS["momentum"]
    params, backups, grads, old, out = _inputs(backend.device, torch.float32)
    at, index = FAULTS[fault]
    grads[at].view(-1)[index] = float("nan")
    if alias:
        out = grads
    flag = torch.zeros((), device=backend.device)
    before = [[t.clone() for t in lst] for lst in (backups, old)]
    _call(backend, params, backups, grads, old, out, cfg, flag, sums=torch.zeros(2, device=backend.device))
    assert float(flag) == 1.0
    assert_lists_equal(params, before[0], "params (at the backups)")
    assert_lists_equal(out, before[1], "momentum_out (the old buffers)")


@backend_param(ROWS)
@pytest.mark.parametrize("fault", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("some", [False, True], ids=["all-first", "some-first"])
def test_first_step_buffers(backend, fault, some):
    """First step (no buffer yet): new buffers are torch's buf = d, or zero on a fault; with some
    buffers existing the call takes two launches and a fault in the second undoes the first."""
    require(backend)
    cfg = CONFIGS["nesterov"]
    params, backups, grads, old, out = _inputs(backend.device, torch.float32)
    if fault:
        grads[-1][2, 3] = float("nan")
    olds = [o if some and i % 2 == 0 else None for i, o in enumerate(old)]
    outs = [o if b is not None else None for o, b in zip(out, olds)]
    flag = torch.zeros((), device=backend.device)
    before_old = [o.clone() for o in old]
    bufs = backend.call("sgd_restore_step_", (params, backups, grads, olds),
                        dict(lr=0.1, **cfg, nonfinite=flag, momentum_out=outs if some else None))
    assert float(flag) == float(fault)
    if fault:
        assert_lists_equal(params, backups, "params")
        for i, b in enumerate(bufs):
            want = before_old[i] if olds[i] is not None else torch.zeros_like(b)
            assert_lists_equal([b], [want], f"buffer {i}")
        return
    d = [g + 1e-2 * w for g, w in zip(grads, backups)]
    for i, (b, di) in enumerate(zip(bufs, d)):
        want = di if olds[i] is None else 0.9 * before_old[i] + di
        assert_close(b, want, 1e-6, 1e-5, f"buffer {i}")
        assert_close(params[i], backups[i] - 0.1 * (di + 0.9 * want), 1e-6, 1e-5, f"params[{i}]")


@backend_param(ROWS)
def test_bad_arguments_rejected_before_writing(backend):
    require(backend)
    params, backups, grads, old, out = _inputs(backend.device, torch.float32)
    before = [p.clone() for p in params]
    flag = torch.zeros((), device=backend.device)
    cases = [
        (ValueError, "needs momentum_out", dict(momentum=0.9, nonfinite=flag)),
        (ValueError, "momentum_out needs momentum", dict(momentum=0.0, nonfinite=flag, momentum_out=out)),
        (TypeError, "nonfinite must be a 0-dim float32", dict(momentum=0.9, nonfinite=flag.double(),
                                                              momentum_out=out)),
        (ValueError, "momentum_out", dict(momentum=0.9, nonfinite=flag, momentum_out=out[:-1])),
    ]
    for error, match, kw in cases:
        with pytest.raises(error, match=match):
            backend.call("sgd_restore_step_", (params, backups, grads, old), dict(lr=0.1, **kw))
        assert_lists_equal(params, before, "params after a rejected call")
        assert float(flag) == 0.0


@backend_param(ROWS)
@pytest.mark.parametrize("flag_before", [0.0, 1.0])
@pytest.mark.parametrize("first", [False, True], ids=["kept", "first-step"])
def test_found_inf_skip_sets_nothing(backend, flag_before, first):
    """A step found_inf skips from the start is not looked at: the flag keeps its value, params end at
    the backups, momentum_out at the old buffers, a first step's buffers zero (new ones, as the
    public op makes them under found_inf); the sums are still added (a NaN in them)."""
    require(backend)
    cfg = CONFIGS["nesterov"]
    params, backups, grads, old, out = _inputs(backend.device, torch.float32)
    grads[3][5, 6] = float("nan")
    flag = torch.tensor(flag_before, device=backend.device)
    sums = torch.zeros(2, device=backend.device)
    before = [o.clone() for o in old]
    bufs = backend.call("sgd_restore_step_", (params, backups, grads, None if first else old),
                        dict(lr=0.1, **cfg, nonfinite=flag, momentum_out=None if first else out, sums=sums,
                             found_inf=torch.ones((), device=backend.device)))
    assert float(flag) == flag_before
    assert_lists_equal(params, backups, "params")
    assert_lists_equal(bufs, [torch.zeros_like(o) for o in old] if first else before, "buffers")
    assert_lists_equal(old, before, "old buffers")
    assert torch.isnan(sums[0]) and float(sums[1]) == 0.0


@backend_param(ROWS)
@pytest.mark.parametrize("first", [False, True], ids=["kept", "first-step"])
def test_fault_with_grad_scale_and_sums(backend, first):
    """The loss scale divided out and telemetry on: the flag and the undo as without; the sums (over
    the grads as given) are still added, with the NaN in them."""
    require(backend)
    cfg = CONFIGS["momentum"]
    params, backups, grads, old, out = _inputs(backend.device, torch.float32, 1024.0)
    grads[2][90_000] = float("nan")
    flag = torch.zeros((), device=backend.device)
    sums = torch.zeros(2, device=backend.device)
    before = [o.clone() for o in old]
    bufs = backend.call("sgd_restore_step_", (params, backups, grads, None if first else old),
                        dict(lr=0.1, **cfg, nonfinite=flag, momentum_out=None if first else out, sums=sums,
                             grad_scale=torch.tensor(1024.0, device=backend.device)))
    assert float(flag) == 1.0
    assert_lists_equal(params, backups, "params")
    assert_lists_equal(bufs, [torch.zeros_like(o) for o in old] if first else before, "buffers")
    assert torch.isnan(sums[0])


@backend_param(ROWS)
def test_the_flag_follows_the_gradients_when_out_is_grads(backend):
    """momentum_out over the grads: a finite gradient whose new buffer overflows (0.9·3e38 + 3e38)
    is no fault (the contract looks at the gradients; torch.optim.SGD takes that step too), so a
    look at the block after the update wrote it would be wrong: g is read before it is written."""
    require(backend)
    cfg = CONFIGS["momentum"]
    params, backups, grads, old, _ = _inputs(backend.device, torch.float32)
    grads[2].view(-1)[70_000] = 3e38
    old[2].view(-1)[70_000] = 3e38
    flag = torch.zeros((), device=backend.device)
    _call(backend, params, backups, grads, old, grads, cfg, flag)
    assert float(flag) == 0.0
    assert float(grads[2].view(-1)[70_000]) == float("inf")  # 5.7e38 rounds to Inf in fp32
    assert float(params[2].view(-1)[70_000]) == float("-inf")
