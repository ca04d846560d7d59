"""The element-wise CUDA ops (perturb.cu, optimizer_steps.cu, variants.cu), executed by the CPU
emulation (docs/verification.md) and compared with the eager reference: every dtype, masks,
ASAM, keep-probability, AMP, telemetry outputs, one-element / empty / multi-chunk tensors with
tails, and views off the 16-byte grid (the scalar path). Copies are compared bitwise; computed
values with the per-dtype tolerances of the GPU tests (tests/utils.py)."""
import pytest
import torch

from sam_kernels.ops import reference as ref
from tests.cuda_emu.cases import SIZES, clone, keys, masks_for, nonempty, randn, reduce_rtol
from tests.utils import DTYPE_IDS, DTYPES, assert_close, assert_lists_close, assert_lists_equal

pytestmark = pytest.mark.cuda_emu

PERTURB_VARIANTS = ["plain", "masked", "adaptive", "keep", "all"]
# (perturbation_sq dtype or None, with grad_copies)
PERTURB_TELEMETRY = [(None, False), (torch.float32, False), (None, True), (torch.float64, True)]
PERTURB_TELEMETRY_IDS = ["none", "sq32", "copies", "sq64-copies"]


def _perturb_inputs(dtype, variant, misaligned=False, sq_norm=None):
    params = randn(SIZES, dtype, 1, misaligned=misaligned)
    grads = randn(SIZES, dtype, 2, misaligned=misaligned)
    masks = masks_for(SIZES, 3, misaligned) if variant in ("masked", "all") else None
    adaptive = variant in ("adaptive", "all")
    keep_prob = 0.7 if variant in ("keep", "all") else 1.0
    if sq_norm is None:
        sq_norm = ref.grad_sq_norm(grads, params if adaptive else None, masks, 0.01)
    return params, grads, masks, adaptive, keep_prob, sq_norm


def _perturb(mod, inputs, telemetry, misaligned=False, into_backups=False):
    params, grads, masks, adaptive, keep_prob, sq_norm = inputs
    sq_dtype, copies = telemetry
    params = clone(params)
    backups = [torch.full_like(p, float("nan")) for p in params]
    sq = None if sq_dtype is None else torch.tensor([0.25], dtype=sq_dtype)
    gc = [torch.full_like(g, float("nan")) for g in grads] if copies else None
    mod.perturb_(params, grads, backups, sq_norm, 0.05, 1e-12, masks, adaptive, 0.01, keep_prob, keys(len(params)),
                 sq, gc, into_backups)
    return params, backups, sq, gc


@pytest.mark.parametrize("telemetry", PERTURB_TELEMETRY, ids=PERTURB_TELEMETRY_IDS)
@pytest.mark.parametrize("variant", PERTURB_VARIANTS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_perturb_matches_reference(emu, dtype, atol, rtol, variant, telemetry):
    inputs = _perturb_inputs(dtype, variant)
    got = _perturb(emu, inputs, telemetry)
    want = _perturb(ref, inputs, telemetry)
    assert_lists_close(got[0], want[0], atol, rtol, "params")
    assert_lists_equal(got[1], inputs[0], "backups")
    if telemetry[1]:
        assert_lists_equal(got[3], inputs[1], "grad_copies")
    if telemetry[0] is not None:
        # fp16/bf16: a param one ulp apart changes its stored (w_new - w)^2 by about rtol.
        tol = max(reduce_rtol(dtype), rtol) if dtype in (torch.float16, torch.bfloat16) else reduce_rtol(dtype)
        assert_close(got[2], want[2], 0.0, tol, "perturbation_sq")
    # Entries the masks or the keep mask leave alone keep their bits.
    if variant != "plain" and variant != "adaptive":
        changed_ref = [p.view(-1).ne(w.view(-1)) for p, w in zip(want[0], inputs[0])]
        for i, (g, w, c) in enumerate(zip(got[0], inputs[0], changed_ref)):
            assert_lists_equal([g.view(-1)[~c]], [w.view(-1)[~c]], f"unselected entries of params[{i}]")


@pytest.mark.parametrize("telemetry", [PERTURB_TELEMETRY[0], PERTURB_TELEMETRY[3]], ids=["none", "sq64-copies"])
@pytest.mark.parametrize("variant", ["plain", "all"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_perturb_into_backups_is_the_in_place_ascent(emu, dtype, atol, rtol, variant, telemetry):
    """into_backups=True: the backups get, bitwise, what the in-place ascent leaves in the params (and
    the same perturbation_sq and grad_copies); the params are not written."""
    inputs = _perturb_inputs(dtype, variant)
    in_place = _perturb(emu, inputs, telemetry)
    into = _perturb(emu, inputs, telemetry, into_backups=True)
    assert_lists_equal(into[0], inputs[0], "params (only read)")
    assert_lists_equal(into[1], in_place[0], "backups = the in-place ascent's params")
    if telemetry[0] is not None:
        assert torch.equal(into[2], in_place[2]), "perturbation_sq"
        assert_lists_equal(into[3], inputs[1], "grad_copies")


@pytest.mark.parametrize("sq_norm", [float("inf"), float("nan")])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_perturb_non_finite_norm_leaves_params_bitwise(emu, dtype, atol, rtol, sq_norm):
    inputs = _perturb_inputs(dtype, "all", sq_norm=torch.tensor(sq_norm))
    got = _perturb(emu, inputs, PERTURB_TELEMETRY[3])
    assert_lists_equal(got[0], inputs[0], "params")
    assert_lists_equal(got[1], inputs[0], "backups")
    assert_lists_equal(got[3], inputs[1], "grad_copies")
    assert got[2].item() == 0.25  # unselected entries add exactly +0


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_perturb_misaligned_views(emu, dtype, atol, rtol):
    inputs = _perturb_inputs(dtype, "all", misaligned=True)
    got = _perturb(emu, inputs, PERTURB_TELEMETRY[3])
    want = _perturb(ref, inputs, PERTURB_TELEMETRY[3])
    assert_lists_close(got[0], want[0], atol, rtol, "params")
    assert_lists_equal(got[1], inputs[0], "backups")
    assert_lists_equal(got[3], inputs[1], "grad_copies")
    tol = max(reduce_rtol(dtype), rtol) if dtype in (torch.float16, torch.bfloat16) else reduce_rtol(dtype)
    assert_close(got[2], want[2], 0.0, tol, "perturbation_sq")


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_restore_bitwise(emu, dtype, atol, rtol, misaligned):
    backups = randn(SIZES, dtype, 1, misaligned=misaligned)
    backups[1].view(-1)[0] = float("nan")
    backups[4].view(-1)[:3] = torch.tensor([-0.0, float("inf"), -float("inf")], dtype=dtype)
    params = randn(SIZES, dtype, 2, misaligned=misaligned)
    emu.restore_(params, backups)
    assert_lists_equal(params, backups, "params")


# --------------------------------------------------------------------------- fused descents

GRAD_SCALE = 1024.0
AMP = ["off", "step", "skip"]
# (sums dtype, with ascent_grads); None: the kernels without the reduction.
DESCENT_TELEMETRY = [None, (torch.float32, True), (torch.float64, False)]
DESCENT_TELEMETRY_IDS = ["none", "f32-ascent", "f64"]
SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, init_buffers=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-4, nesterov=False, maximize=True, init_buffers=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False, init_buffers=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, init_buffers=True),
]
ADAMW_CONFIGS = [
    dict(step=1, beta1=0.9, weight_decay=0.01, maximize=False),
    dict(step=3, beta1=0.3, weight_decay=0.0, maximize=True),  # lerp weight >= 0.5: the other formula
]


def _descent_inputs(dtype, amp, telemetry, misaligned=False):
    scale = GRAD_SCALE if amp != "off" else 1.0
    p = dict(params=randn(SIZES, dtype, 1, misaligned=misaligned), backups=randn(SIZES, dtype, 2, misaligned=misaligned),
             grads=randn(SIZES, dtype, 3, scale, misaligned=misaligned),
             bufs=randn(SIZES, dtype, 4, misaligned=misaligned), exp_avgs=randn(SIZES, dtype, 5, misaligned=misaligned),
             exp_avg_sqs=[t.abs() for t in randn(SIZES, dtype, 6, misaligned=misaligned)])
    p["ascent_grads"] = [(0.5 * g.double() + n.double()).to(dtype)
                         for g, n in zip(p["grads"], randn(SIZES, dtype, 7, scale, misaligned=misaligned))]
    p["amp"] = {} if amp == "off" else dict(grad_scale=torch.tensor(scale),
                                            found_inf=torch.tensor(1.0 if amp == "skip" else 0.0))
    p["tele"] = None
    if telemetry is not None:
        sums_dtype, with_ascent = telemetry
        base = 2.0 ** 20 * scale * scale  # comparable with the sums: a store instead of an add fails
        p["tele"] = (torch.tensor([base, -base if with_ascent else -0.0], dtype=sums_dtype), with_ascent)
    return p


def _descend(mod, op, p, config):
    params = clone(p["params"])
    tele = {}
    if p["tele"] is not None:
        sums, with_ascent = p["tele"]
        tele = dict(sums=sums.clone(), ascent_grads=p["ascent_grads"] if with_ascent else None)
    if op == "sgd":
        state = [clone(p["bufs"])]
        mod.sgd_restore_step_(params, p["backups"], p["grads"], state[0], lr=0.1, **config, **p["amp"], **tele)
    else:
        state = [clone(p["exp_avgs"]), clone(p["exp_avg_sqs"])]
        mod.adamw_restore_step_(params, p["backups"], p["grads"], state[0], state[1], lr=1e-3, beta2=0.999, eps=1e-8,
                                **config, **p["amp"], **tele)
    return params, state, tele.get("sums")


def _check_descent(emu, op, config, dtype, atol, rtol, amp, telemetry, misaligned=False):
    p = _descent_inputs(dtype, amp, telemetry, misaligned)
    got = _descend(emu, op, p, config)
    want = _descend(ref, op, p, config)
    if amp == "skip":  # params at the backups, state untouched, bitwise
        assert_lists_equal(got[0], p["backups"], "params")
        assert_lists_equal(got[1][0], p["bufs"] if op == "sgd" else p["exp_avgs"], "state")
    assert_lists_close(got[0], want[0], atol, rtol, "params")
    for a, e in zip(got[1], want[1]):
        assert_lists_close(a, e, atol, rtol, "state")
    if telemetry is not None:
        tol = 1e-10 if dtype == torch.float64 and telemetry[0] == torch.float64 else 1e-5
        assert_close(got[2][:1], want[2][:1], 0.0, tol, "sums[0]")
        if telemetry[1]:
            assert_close(got[2][1:], want[2][1:], 0.0, tol, "sums[1]")
        else:  # not written: still -0.0, bitwise
            assert_lists_equal([got[2][1:]], [p["tele"][0][1:]], "sums[1]")


@pytest.mark.parametrize("telemetry", DESCENT_TELEMETRY, ids=DESCENT_TELEMETRY_IDS)
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=["plain", "momentum-maximize", "nesterov", "init-buffers"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_sgd_restore_step_matches_reference(emu, dtype, atol, rtol, config, amp, telemetry):
    _check_descent(emu, "sgd", config, dtype, atol, rtol, amp, telemetry)


@pytest.mark.parametrize("telemetry", DESCENT_TELEMETRY, ids=DESCENT_TELEMETRY_IDS)
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=["step1", "step3-beta1-maximize"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_adamw_restore_step_matches_reference(emu, dtype, atol, rtol, config, amp, telemetry):
    _check_descent(emu, "adamw", config, dtype, atol, rtol, amp, telemetry)


@pytest.mark.parametrize("op", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_descents_misaligned_views(emu, dtype, atol, rtol, op):
    config = SGD_CONFIGS[2] if op == "sgd" else ADAMW_CONFIGS[0]
    _check_descent(emu, op, config, dtype, atol, rtol, "step", DESCENT_TELEMETRY[1], misaligned=True)


# --------------------------------------------------------------------------- variants

def _variants(mod, dtype, misaligned):
    """renormalize_, fisher_accumulate_, looksam_store_, looksam_apply_, mix_ on fixed inputs."""
    g = randn(SIZES, dtype, 1, misaligned=misaligned)
    gs = randn(SIZES, dtype, 2, misaligned=misaligned)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sq = torch.tensor(3.7, dtype=acc)
    out = {}
    x = clone(g)
    mod.renormalize_(x, torch.tensor(5.3, dtype=acc), sq, 1e-12)
    out["renormalize"] = x
    f = [t.abs() for t in clone(gs)]
    mod.fisher_accumulate_(f, g, 0.5)
    out["fisher"] = f
    gv = [torch.full_like(t, float("nan")) for t in g]
    mod.looksam_store_(gv, g, gs, torch.tensor(0.8, dtype=torch.float32), sq, 1e-12)
    out["looksam_store"] = gv
    y = clone(g)
    mod.looksam_apply_(y, gs, 0.7, sq, torch.tensor(2.5, dtype=torch.float64), 1e-12)
    out["looksam_apply"] = y
    z = clone(g)
    mod.mix_(z, gs, torch.tensor(1.3, dtype=acc), torch.tensor(-0.4, dtype=torch.float64))
    out["mix"] = z
    return out


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_variant_ops_match_reference(emu, dtype, atol, rtol, misaligned):
    got = _variants(emu, dtype, misaligned)
    want = _variants(ref, dtype, misaligned)
    for name in got:
        assert_lists_close(nonempty(got[name], SIZES), nonempty(want[name], SIZES), atol, rtol, name)


# --------------------------------------------------------------------------- Friendly-SAM / VaSSO EMA

EMA_CASES = {  # id: (weight, sigma, directions, amp: None | "step" | "skip")
    "fsam": (0.4, 1.0, True, None), "vasso": (0.9, 0.0, False, None), "fsam-amp": (0.4, 0.5, True, "step"),
    "vasso-amp": (0.9, 0.0, False, "step"), "fsam-skip-inf": (0.4, 1.0, True, "skip"),
}


def _ema(mod, dtype, case, misaligned):
    weight, sigma, with_dirs, amp = EMA_CASES[case]
    emas = randn(SIZES, dtype, 1, misaligned=misaligned)
    grads = randn(SIZES, dtype, 2, misaligned=misaligned)
    scale = found = None
    if amp is not None:
        grads = [g * 1024 for g in grads]
        scale, found = torch.tensor(1024.0), torch.tensor(float(amp == "skip"))
    if amp == "skip":
        grads[-1].view(-1)[:2] = torch.tensor([float("inf"), float("nan")]).to(dtype)
    dirs = [torch.full_like(g, float("nan")) for g in grads] if with_dirs else None
    mod.ema_update_(emas, grads, dirs, weight, sigma, scale, found)
    return emas, dirs


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("case", list(EMA_CASES))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_ema_update_matches_reference(emu, dtype, atol, rtol, case, misaligned):
    got_m, got_d = _ema(emu, dtype, case, misaligned)
    want_m, want_d = _ema(ref, dtype, case, misaligned)
    if EMA_CASES[case][3] == "skip":  # an overflowed pass leaves every EMA bitwise as it was
        assert_lists_equal(got_m, randn(SIZES, dtype, 1, misaligned=misaligned), "emas")
    assert_lists_close(nonempty(got_m, SIZES), nonempty(want_m, SIZES), atol, rtol, "emas")
    if got_d is not None:
        assert_lists_close(nonempty(got_d, SIZES), nonempty(want_d, SIZES), atol, rtol, "directions")
