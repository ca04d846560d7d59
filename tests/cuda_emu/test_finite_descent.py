"""The finite check in the CUDA SGD descent's pass (``nonfinite`` / ``momentum_out``), executed by
the CPU emulation (docs/verification.md): a finite step matches the eager reference with the flag
left at 0 and the old buffers only read; a NaN/Inf unscaled gradient in any tensor (the first, a
middle one, the last, a later chunk of a multi-chunk one, a later launch of a long list) sets the
flag, and the undo launch puts params bitwise at the backups, momentum_out bitwise at the old
buffers and a first step's buffers at zero, also where earlier blocks had already written. A step
``found_inf`` skips from the start sets nothing and leaves the buffers as given. Expected values
of the faulty steps are the inputs themselves, cloned before the call."""
from __future__ import annotations

import pytest
import torch

from sam_kernels.ops import reference as ref
from tests.cuda_emu.cases import CHUNK, SIZES, clone, randn
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_close, assert_lists_equal

pytestmark = pytest.mark.cuda_emu

CONFIGS = {
    "plain": dict(momentum=0.0, dampening=0.0, weight_decay=1e-4, nesterov=False, maximize=False, init_buffers=False),
    "momentum-maximize": dict(momentum=0.9, dampening=0.1, weight_decay=1e-4, nesterov=False, maximize=True,
                              init_buffers=False),
    "nesterov": dict(momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False,
                     init_buffers=False),
    "init-buffers": dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                         init_buffers=True),
}
# (entry of SIZES, flat index): SIZES = [1, 3, 0, 8, 1000, CHUNK, 2 * CHUNK + 5, 17]
FAULTS = {"first": (0, 0), "middle": (4, 999), "later-chunk": (6, 2 * CHUNK + 1), "last": (7, 16)}
VALUES = [float("nan"), float("inf"), float("-inf")]
SCALE = 1024.0


def _inputs(dtype, scale=1.0, misaligned=False, sizes=SIZES):
    return dict(params=randn(sizes, dtype, 1, misaligned=misaligned), backups=randn(sizes, dtype, 2, misaligned=misaligned),
                grads=randn(sizes, dtype, 3, scale, misaligned=misaligned),
                bufs=randn(sizes, dtype, 4, misaligned=misaligned),
                outs=[torch.full_like(t, float("nan")) for t in randn(sizes, dtype, 5, misaligned=misaligned)],
                ascent=randn(sizes, dtype, 6, scale, misaligned=misaligned))


def _step(mod, x, cfg, flag, amp=None, sums=None):
    """One call on copies of x; returns (params, buffers the state keeps, old buffers after, sums)."""
    params, bufs = clone(x["params"]), clone(x["bufs"])
    out = clone(x["outs"]) if cfg["momentum"] and not cfg["init_buffers"] else None
    tele = {} if sums is None else dict(sums=sums, ascent_grads=x["ascent"])
    mod.sgd_restore_step_(params, x["backups"], x["grads"], bufs, lr=0.1, **cfg, **(amp or {}), **tele,
                          momentum_out=out, nonfinite=flag)
    return params, (out if out is not None else bufs), bufs, sums


def _amp(kind, found=0.0):
    return {} if kind == "off" else dict(grad_scale=torch.tensor(SCALE), found_inf=torch.tensor(found))


@pytest.mark.parametrize("telemetry", [False, True], ids=["no-sums", "sums"])
@pytest.mark.parametrize("amp", ["off", "step"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_finite_step_matches_reference(emu, dtype, atol, rtol, config, amp, telemetry):
    cfg = CONFIGS[config]
    x = _inputs(dtype, SCALE if amp == "step" else 1.0)
    flag = torch.zeros(())
    sums = (lambda: torch.tensor([0.5, -0.25], dtype=torch.float64)) if telemetry else (lambda: None)
    got = _step(emu, x, cfg, flag, _amp(amp), sums())
    want = _step(ref, x, cfg, torch.zeros(()), _amp(amp), sums())
    assert float(flag) == 0.0
    assert_lists_close(got[0], want[0], atol, rtol, "params")
    if cfg["momentum"]:
        assert_lists_close(got[1], want[1], atol, rtol, "new buffers")
    if cfg["momentum"] and not cfg["init_buffers"]:
        assert_lists_equal(got[2], x["bufs"], "old buffers (only read)")
    if telemetry:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert_close(got[3], want[3], 0.0, tol, "sums")


def _assert_undone(got, x, cfg, what=""):
    assert_lists_equal(got[0], x["backups"], f"params (at the backups){what}")
    if cfg["init_buffers"]:
        assert_lists_equal(got[1], [torch.zeros_like(b) for b in x["bufs"]], f"first-step buffers (zero){what}")
    elif cfg["momentum"]:
        assert_lists_equal(got[1], x["bufs"], f"momentum_out (the old buffers){what}")
        assert_lists_equal(got[2], x["bufs"], f"old buffers{what}")


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_fault_is_undone(emu, dtype, atol, rtol, config, fault):
    cfg = CONFIGS[config]
    x = _inputs(dtype)
    at, index = FAULTS[fault]
    x["grads"][at][index] = VALUES[list(FAULTS).index(fault) % len(VALUES)]
    grads = clone(x["grads"])
    flag = torch.zeros(())
    got = _step(emu, x, cfg, flag)
    assert float(flag) == 1.0
    _assert_undone(got, x, cfg)
    assert_lists_equal(x["grads"], grads, "grads")


@pytest.mark.parametrize("value", VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("config", ["nesterov", "init-buffers"])
def test_fault_with_grad_scale_and_sums(emu, config, value):
    """AMP scale divided out and telemetry on: the flag and the undo as without; the sums (over the
    grads as given) are still added, non-finite as the planted value makes them."""
    cfg = CONFIGS[config]
    x = _inputs(torch.float32, SCALE)
    x["grads"][6][CHUNK + 7] = value
    flag = torch.zeros(())
    got = _step(emu, x, cfg, flag, _amp("step"), torch.zeros(2))
    assert float(flag) == 1.0
    _assert_undone(got, x, cfg)
    assert torch.isnan(got[3][0]) if value != value else got[3][0] == float("inf")
    assert not torch.isfinite(got[3][1])


def test_scaled_overflow_counts(emu):
    """An element finite as given but Inf once divided by a loss scale < 1 is a fault."""
    cfg = CONFIGS["momentum-maximize"]
    x = _inputs(torch.float32)
    x["grads"][5][CHUNK - 1] = 3e38
    flag = torch.zeros(())
    got = _step(emu, x, cfg, flag, dict(grad_scale=torch.tensor(0.25)))
    assert float(flag) == 1.0
    _assert_undone(got, x, cfg)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_flag_set_before_undoes_a_finite_step(emu, config):
    cfg = CONFIGS[config]
    x = _inputs(torch.float32)
    flag = torch.ones(())
    got = _step(emu, x, cfg, flag)
    assert float(flag) == 1.0
    _assert_undone(got, x, cfg)


@pytest.mark.parametrize("flag_before", [0.0, 1.0])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_found_inf_skip_sets_nothing(emu, config, flag_before):
    """A step found_inf skips from the start is not looked at: the flag keeps its value, params at the
    backups, momentum_out at the old buffers, a first step's buffers as given (not zeroed)."""
    cfg = CONFIGS[config]
    x = _inputs(torch.float32, SCALE)
    x["grads"][0][0] = float("nan")
    flag = torch.tensor(flag_before)
    got = _step(emu, x, cfg, flag, _amp("step", found=1.0), torch.zeros(2))
    assert float(flag) == flag_before
    assert_lists_equal(got[0], x["backups"], "params")
    if cfg["momentum"]:
        assert_lists_equal(got[1], x["bufs"], "buffers as given")
        assert_lists_equal(got[2], x["bufs"], "old buffers")
    assert torch.isnan(got[3][0])  # the sums do not depend on the skip


@pytest.mark.parametrize("config", ["nesterov", "init-buffers"])
def test_fault_in_a_later_launch_undoes_the_earlier_ones(emu, monkeypatch, config):
    """4 KB tables and 60 tensors: the update takes two launches; a NaN in the last tensor (the
    second launch) puts back what the first launch wrote."""
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", "small")
    cfg = CONFIGS[config]
    x = _inputs(torch.float16, sizes=[33] * 60)
    x["grads"][-1][32] = float("nan")
    flag = torch.zeros(())
    got = _step(emu, x, cfg, flag)
    assert float(flag) == 1.0
    _assert_undone(got, x, cfg)
    flag = torch.zeros(())
    x["grads"][-1][32] = 1.0
    got = _step(emu, x, cfg, flag)  # finite: both launches stepped
    assert float(flag) == 0.0
    want = _step(ref, x, cfg, torch.zeros(()))
    assert_lists_close(got[0], want[0], 1e-3, 1e-3, "params of the finite step")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_misaligned_views(emu, dtype, atol, rtol):
    """Views off the 16-byte grid (the scalar path): a finite step as the reference, a fault undone."""
    cfg = CONFIGS["nesterov"]
    x = _inputs(dtype, misaligned=True)
    flag = torch.zeros(())
    got = _step(emu, x, cfg, flag)
    want = _step(ref, x, cfg, torch.zeros(()))
    assert float(flag) == 0.0
    assert_lists_close(got[0], want[0], atol, rtol, "params")
    assert_lists_close(got[1], want[1], atol, rtol, "momentum_out")
    x["grads"][6][2 * CHUNK + 4] = float("nan")
    got = _step(emu, x, cfg, flag)
    assert float(flag) == 1.0
    _assert_undone(got, x, cfg)


def test_arguments_checked_before_writing(emu):
    x = _inputs(torch.float32)
    params = clone(x["params"])
    flag = torch.zeros(())
    cases = [
        ("needs momentum_out", dict(momentum=0.9, nonfinite=flag)),
        ("momentum_out needs momentum", dict(momentum=0.0, nonfinite=flag, momentum_out=x["outs"])),
        ("momentum_out needs momentum", dict(momentum=0.9, init_buffers=True, momentum_out=x["outs"])),
        ("float32", dict(momentum=0.9, nonfinite=flag.double(), momentum_out=x["outs"])),
        ("momentum_out", dict(momentum=0.9, nonfinite=flag, momentum_out=x["outs"][:-1])),
    ]
    for match, kw in cases:
        kw = dict(dict(dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, init_buffers=False), **kw)
        with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
            emu.sgd_restore_step_(params, x["backups"], x["grads"], x["bufs"], lr=0.1, **kw)
        assert_lists_equal(params, x["params"], f"params after a refused call ({match})")
        assert float(flag) == 0.0
