"""bSAM's CUDA ops (bsam.cu), executed by the CPU emulation (docs/verification.md) and compared with
the eager reference: every dtype, AMP off / step / skip, perturb on and off, with and without the
weight-decay term, one-element / empty / multi-chunk tensors with tails, and views off the 16-byte
grid (the scalar path). Copies and skipped steps are compared bitwise; computed values with the
per-dtype tolerances of the GPU tests (tests/utils.py)."""
import pytest
import torch

from sam_kernels.ops import reference as ref
from tests.cuda_emu.cases import SIZES, clone, randn
from tests.utils import DTYPE_IDS, DTYPES, assert_lists_close, assert_lists_equal

pytestmark = pytest.mark.cuda_emu

AMP = ["off", "step", "skip"]
GRAD_SCALE = 1024.0


def _inputs(dtype, amp, misaligned):
    scale = GRAD_SCALE if amp != "off" else 1.0
    p = dict(params=randn(SIZES, dtype, 1, misaligned=misaligned), backups=randn(SIZES, dtype, 2, misaligned=misaligned),
             grads=randn(SIZES, dtype, 3, scale, misaligned=misaligned),
             s=[t.abs_().add_(0.1) for t in randn(SIZES, dtype, 4, misaligned=misaligned)],
             noise=randn(SIZES, dtype, 5, misaligned=misaligned), m=randn(SIZES, dtype, 6, misaligned=misaligned),
             s_next=randn(SIZES, dtype, 7, misaligned=misaligned))
    p["amp"] = {} if amp == "off" else dict(grad_scale=torch.tensor(scale),
                                            found_inf=torch.tensor(1.0 if amp == "skip" else 0.0))
    return p


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_noise_matches_reference(emu, dtype, atol, rtol, misaligned):
    p = _inputs(dtype, "off", misaligned)
    out = {}
    for name, mod in (("emu", emu), ("ref", ref)):
        params, backups = clone(p["params"]), [torch.full_like(t, float("nan")) for t in p["params"]]
        mod.bsam_noise_(params, backups, p["s"], p["noise"], 50.0)
        out[name] = params, backups
    assert_lists_equal(out["emu"][1], p["params"], "backups")
    assert_lists_close(out["emu"][0], out["ref"][0], atol, rtol, "params")


@pytest.mark.parametrize("perturb", [True, False], ids=["perturb", "no-perturb"])
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_ascent_matches_reference(emu, dtype, atol, rtol, amp, perturb):
    p = _inputs(dtype, amp, misaligned=amp == "step")
    out = {}
    for name, mod in (("emu", emu), ("ref", ref)):
        params, s_next = clone(p["params"]), [torch.full_like(t, float("nan")) for t in p["s"]]
        mod.bsam_ascent_(params, p["backups"], p["grads"], p["s"], s_next, rho=0.05, beta2=0.999, damping=0.1,
                         weight_decay=0.25, perturb=perturb, **p["amp"])
        out[name] = params, s_next
    if not perturb or amp == "skip":
        assert_lists_equal(out["emu"][0], p["backups"], "params")
    assert_lists_close(out["emu"][0], out["ref"][0], 10 * atol, 10 * rtol, "params")
    assert_lists_close(out["emu"][1], out["ref"][1], atol, rtol, "s_next")


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_descent_matches_reference(emu, dtype, atol, rtol, amp, weight_decay):
    p = _inputs(dtype, amp, misaligned=amp == "step")
    out = {}
    for name, mod in (("emu", emu), ("ref", ref)):
        params, m, s_next = clone(p["params"]), clone(p["m"]), clone(p["s_next"])
        mod.bsam_descent_(params, p["backups"], p["grads"], m, p["s"], s_next, lr=0.1, beta1=0.9,
                          weight_decay=weight_decay, **p["amp"])
        out[name] = params, m, s_next
    if amp == "skip":  # w at the backups, m kept, s_next <- s: bitwise
        assert_lists_equal(out["emu"][0], p["backups"], "params")
        assert_lists_equal(out["emu"][1], p["m"], "exp_avgs")
        assert_lists_equal(out["emu"][2], p["s"], "s_next")
    else:  # s_next not written
        assert_lists_equal(out["emu"][2], p["s_next"], "s_next")
    assert_lists_close(out["emu"][0], out["ref"][0], 10 * atol, 10 * rtol, "params")
    assert_lists_close(out["emu"][1], out["ref"][1], atol, rtol, "exp_avgs")
