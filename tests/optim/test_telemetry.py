"""Sharpness telemetry and cost accounting (optim/telemetry.py): values against a hand computation from
the gradients and weights the optimizer saw, counters against the expected decisions, no host sync
in a step, and state_dict round trips.

Norm tolerance: the ops accumulate ~130 fp32 products; n·2^-24 ≈ 1e-5 bounds the relative error.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from sam_kernels.optim import telemetry as telemetry_stats
from sam_kernels.optim.esam import num_selected

NORM_RTOL = 1e-5
RHO = 0.05


def model_and_data(seed=0, batch=16):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(batch, 5, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(6)]
    return model, data


def loss_of(model, x, y, reduction="mean"):
    return F.cross_entropy(model(x), y, reduction=reduction)


def snapshot(ts):
    return [None if t is None else t.detach().double().clone() for t in ts]


def sq(ts):
    return sum(float((t * t).sum()) for t in ts if t is not None)


def dot(a, b):
    return sum(float((x * y).sum()) for x, y in zip(a, b) if x is not None and y is not None)


def closure_step(model, opt, x, y):
    """One closure-driven SAM step; returns what a hand computation needs (fp64 copies)."""
    params = list(model.parameters())
    opt.zero_grad(set_to_none=True)
    loss1 = loss_of(model, x, y)
    loss1.backward()
    seen = {"g1": snapshot([p.grad for p in params]), "w": snapshot(params), "loss1": loss1.detach()}

    def closure():
        loss = loss_of(model, x, y)
        loss.backward()
        seen.update(g2=snapshot([p.grad for p in params]), wp=snapshot(params), loss2=loss.detach())
        return loss

    opt.step(closure, loss=loss1)
    return seen


def finish_step(model, opt, x, y, wants: bool, loss1):
    """The rest of a manual-loop step after the first backward: a SAM step (losses handed over) or a plain one."""
    if wants:
        opt.first_step(zero_grad=True, loss=loss1)
        loss2 = loss_of(model, x, y)
        loss2.backward()
        opt.second_step(zero_grad=True, loss=loss2)
    else:
        opt.base_step(zero_grad=True)


def hand(seen):
    g1, g2 = seen["g1"], seen["g2"]
    both1 = [a for a, b in zip(g1, g2) if a is not None and b is not None]
    both2 = [b for a, b in zip(g1, g2) if a is not None and b is not None]
    return {
        "grad_norm": math.sqrt(sq(g1)),
        "sam_grad_norm": math.sqrt(sq(g2)),
        "grad_cosine": dot(both1, both2) / math.sqrt(sq(both1) * sq(both2)),
        "applied": math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(seen["wp"], seen["w"]))),
        "sharpness": float(seen["loss2"] - seen["loss1"]),  # the two closure losses, fp32 subtraction
        "spacing": math.sqrt(sum(float(((torch.nextafter(a.float(), torch.tensor(math.inf)) - a.float()).double()
                                        ** 2).sum()) for a in seen["wp"])),
    }


def assert_norms(st, h):
    for key in ("grad_norm", "sam_grad_norm", "grad_cosine"):
        assert st[key] == pytest.approx(h[key], rel=NORM_RTOL), key
    assert st["sharpness"] == h["sharpness"]


def test_sam_values_equal_hand_computation():
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, telemetry=True)
    for x, y in data[:2]:
        seen = closure_step(model, opt, x, y)
    st, h = opt.stats(), hand(seen)
    assert_norms(st, h)
    assert st["perturbation_norm"] == pytest.approx(RHO, rel=1e-6)  # rho·‖g‖/(‖g‖ + 1e-12)
    assert abs(st["perturbation_norm"] - h["applied"]) <= h["spacing"] + NORM_RTOL * RHO  # what was added
    assert st["sharpness"] != 0.0


def test_sam_values_without_finite_check_and_in_the_manual_loop():
    """finite_check=False: ‖g(w+e)‖ is computed by telemetry itself; losses handed to first/second_step."""
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, finite_check=False, telemetry=True)
    params = list(model.parameters())
    x, y = data[0]
    loss1 = loss_of(model, x, y)
    loss1.backward()
    g1 = snapshot([p.grad for p in params])
    opt.first_step(zero_grad=True, loss=loss1)
    loss2 = loss_of(model, x, y)
    loss2.backward()
    g2 = snapshot([p.grad for p in params])
    opt.second_step(zero_grad=True, loss=loss2)
    st = opt.stats()
    assert st["grad_norm"] == pytest.approx(math.sqrt(sq(g1)), rel=NORM_RTOL)
    assert st["sam_grad_norm"] == pytest.approx(math.sqrt(sq(g2)), rel=NORM_RTOL)
    assert st["grad_cosine"] == pytest.approx(dot(g1, g2) / math.sqrt(sq(g1) * sq(g2)), rel=NORM_RTOL)
    assert st["sharpness"] == float(loss2.detach() - loss1.detach())


def test_sharpness_is_nan_when_the_first_loss_is_unknown():
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
    x, y = data[0]
    loss_of(model, x, y).backward()
    opt.step(lambda: loss_of(model, x, y).backward())
    st = opt.stats()
    assert math.isnan(st["sharpness"]) and math.isfinite(st["grad_norm"])


def test_asam_values_equal_hand_computation():
    """grad_norm is the plain ‖g‖ (not ‖T⊙g‖); ‖e‖ = rho·‖T²⊙g‖/‖T⊙g‖ (up to w + e's rounding)."""
    model, data = model_and_data()
    eta = 0.01
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=eta, lr=0.1, telemetry=True)
    seen = closure_step(model, opt, *data[0])
    st, h = opt.stats(), hand(seen)
    assert_norms(st, h)
    t = [w.abs() + eta for w in seen["w"]]
    formula = 0.5 * math.sqrt(sq([ti * ti * g for ti, g in zip(t, seen["g1"])])) / math.sqrt(
        sq([ti * g for ti, g in zip(t, seen["g1"])]))
    assert abs(st["perturbation_norm"] - formula) <= h["spacing"] + NORM_RTOL * formula
    assert st["perturbation_norm"] == pytest.approx(h["applied"], rel=NORM_RTOL)


def test_sparse_sam_values_equal_hand_computation():
    """Unmasked norm (the default): ‖e‖ = rho·‖m⊙g‖/‖g‖ < rho."""
    model, data = model_and_data()
    opt = sk.SparseSAM(model.parameters(), torch.optim.SGD, rho=RHO, sparsity=0.5, mask="random", seed=0,
                       update_freq=100, update_unit="step", lr=0.1, telemetry=True)
    seen = closure_step(model, opt, *data[0])
    st, h = opt.stats(), hand(seen)
    assert_norms(st, h)
    masks = [m.double() for m in opt.masks]
    formula = RHO * math.sqrt(sq([m * g for m, g in zip(masks, seen["g1"])])) / math.sqrt(sq(seen["g1"]))
    assert formula < RHO * 0.9
    assert abs(st["perturbation_norm"] - formula) <= h["spacing"] + NORM_RTOL * formula
    assert st["perturbation_norm"] == pytest.approx(h["applied"], rel=NORM_RTOL)


def test_esam_values_and_passes_equal_hand_computation():
    """Per-tensor SWP (beta 0.5, frozen tensors have no g(w)) and SDS (gamma 0.5): ‖e‖ = rho/beta over the
    selected tensors, the cosine over them, sharpness = mean loss at w + e (extra forward) − at w."""
    model, data = model_and_data()
    beta, gamma = 0.5, 0.5
    opt = sk.ESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=beta, gamma=gamma, seed=1, lr=0.1,
                  telemetry=True)
    params = list(model.parameters())
    accumulated = {}  # param index -> gradients as accumulated, in order (the first one is g(w))
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda p, i=i: accumulated.setdefault(i, []).append(
            p.grad.detach().double().clone()))
    x, y = data[0]
    calls = []

    def closure(indices=None):
        xs, ys = (x, y) if indices is None else (x[indices], y[indices])
        if len(calls) == 2:  # the second pass runs at w + e: the first pass's gradients are still there
            calls.append({"g1": snapshot([p.grad for p in params]), "wp": snapshot(params)})
        out = loss_of(model, xs, ys, reduction="none")
        calls.append(out.detach())
        return out

    opt.zero_grad(set_to_none=True)
    w = snapshot(params)
    losses = opt.step(closure)
    g2 = snapshot([p.grad for p in params])
    assert len(calls) == 4
    # ESAM zeroes the first-pass grads in first_step: the snapshot in the closure has none; the
    # perturbed tensors are those whose weights moved.
    moved = [bool((a != b).any()) for a, b in zip(calls[2]["wp"], w)]
    assert 0 < sum(moved) < len(params)
    st = opt.stats()
    applied = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(calls[2]["wp"], w)))
    assert st["perturbation_norm"] == pytest.approx(applied, rel=NORM_RTOL)
    assert st["perturbation_norm"] == pytest.approx(RHO / beta, rel=1e-4)
    assert st["sam_grad_norm"] == pytest.approx(math.sqrt(sq(g2)), rel=NORM_RTOL)
    assert st["sharpness"] == float(calls[1].mean() - losses.mean())
    selected = [i for i, m in enumerate(moved) if m]
    assert sorted(i for i, gs in accumulated.items() if len(gs) == 2) == selected  # frozen: one backward
    g1 = [accumulated[i][0] for i in selected]
    g2_sel = [g2[i] for i in selected]
    assert st["grad_norm"] == pytest.approx(math.sqrt(sq(g1)), rel=NORM_RTOL)
    assert st["grad_cosine"] == pytest.approx(dot(g1, g2_sel) / math.sqrt(sq(g1) * sq(g2_sel)), rel=NORM_RTOL)
    k = num_selected(x.shape[0], gamma)
    assert st["forward_passes"] == 2 + k / x.shape[0] and st["backward_passes"] == 1 + k / x.shape[0]
    assert st["steps"] == 1 and st["sam_steps"] == 1


def test_esam_element_swp_reports_the_applied_perturbation():
    """Element SWP: each element joins with probability beta (scaled 1/beta): ‖e‖ is what was added."""
    model, data = model_and_data()
    opt = sk.ESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=0.6, swp="element", seed=2, lr=0.1,
                  telemetry=True)
    params = list(model.parameters())
    x, y = data[0]
    loss1 = loss_of(model, x, y)
    loss1.backward()
    seen = {"g1": snapshot([p.grad for p in params]), "w": snapshot(params), "loss1": loss1.detach()}
    opt.first_step(zero_grad=True, loss=loss1)
    seen["wp"] = snapshot(params)
    loss2 = loss_of(model, x, y)
    loss2.backward()
    seen.update(g2=snapshot([p.grad for p in params]), loss2=loss2.detach())
    opt.second_step(zero_grad=True, loss=loss2)
    st, h = opt.stats(), hand(seen)
    assert_norms(st, h)
    assert st["perturbation_norm"] == pytest.approx(h["applied"], rel=NORM_RTOL)
    assert st["perturbation_norm"] != pytest.approx(RHO, rel=1e-2)  # not the plain-SAM formula


def test_esam_grad_norm_and_cosine_over_the_selected_tensors():
    """Manual loop (no freezing): g(w) of every tensor exists; the cosine and ‖g(w)‖ are over all of them."""
    model, data = model_and_data()
    opt = sk.ESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=0.5, seed=3, lr=0.1, telemetry=True)
    params = list(model.parameters())
    x, y = data[0]
    loss_of(model, x, y).backward()
    g1 = snapshot([p.grad for p in params])
    w = snapshot(params)
    opt.first_step(zero_grad=True)
    wp = snapshot(params)
    loss_of(model, x, y).backward()
    g2 = snapshot([p.grad for p in params])
    opt.second_step(zero_grad=True)
    st = opt.stats()
    assert st["grad_norm"] == pytest.approx(math.sqrt(sq(g1)), rel=NORM_RTOL)
    assert st["grad_cosine"] == pytest.approx(dot(g1, g2) / math.sqrt(sq(g1) * sq(g2)), rel=NORM_RTOL)
    applied = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(wp, w)))
    assert st["perturbation_norm"] == pytest.approx(applied, rel=NORM_RTOL)


def test_looksam_values_on_sam_steps_and_kept_on_reuse_steps():
    model, data = model_and_data()
    opt = sk.LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=2, lr=0.1, telemetry=True)
    seen = closure_step(model, opt, *data[0])  # step 0: SAM
    st, h = opt.stats(), hand(seen)
    assert_norms(st, h)
    assert st["perturbation_norm"] == pytest.approx(RHO, rel=1e-6)
    closure_step_plain = closure_step(model, opt, *data[1])  # step 1: reuse step, one pass
    assert "g2" not in closure_step_plain
    after = opt.stats()
    assert {k: after[k] for k in telemetry_stats.VALUES} == {k: st[k] for k in telemetry_stats.VALUES}
    assert (after["steps"], after["sam_steps"], after["forward_passes"], after["backward_passes"]) == (2, 1, 3, 3)


def test_stable_sam_reports_the_descent_gradient_before_the_renormalization():
    model, data = model_and_data()
    opt = sk.StableSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
    seen = closure_step(model, opt, *data[0])
    st, h = opt.stats(), hand(seen)
    assert_norms(st, h)
    assert st["sam_grad_norm"] != pytest.approx(st["grad_norm"], rel=1e-3)  # not the renormalized norm


CLASSES = ["SAM", "SSSAM", "StableSAM", "LookSAM", "AESAM", "AELookSAM", "SparseSAM", "ESAM"]


def build(name, model, **kw):
    params, sgd = model.parameters(), torch.optim.SGD
    common = dict(rho=RHO, lr=0.1, **kw)
    if name == "SSSAM":
        return sk.SSSAM(params, sgd, p=1.0, seed=0, **common)
    if name in ("AESAM", "AELookSAM"):
        return getattr(sk, name)(params, sgd, total_steps=10, **common)
    if name == "SparseSAM":
        return sk.SparseSAM(params, sgd, mask="random", seed=0, update_freq=100, update_unit="step", **common)
    if name == "ESAM":
        return sk.ESAM(params, sgd, seed=0, **common)
    return getattr(sk, name)(params, sgd, **common)


@pytest.mark.parametrize("name", CLASSES)
def test_every_optimizer_class_reports_stats(name):
    model, data = model_and_data()
    opt = build(name, model, telemetry=True)
    if name == "ESAM":
        x, y = data[0]
        opt.step(lambda idx=None: loss_of(model, x, y, reduction="none"))
        st = opt.stats()
        assert tuple(st) == telemetry_stats.KEYS
        assert all(isinstance(v, float) for v in st.values())
        assert st["sam_steps"] == 1 and math.isfinite(st["sharpness"]) and math.isfinite(st["grad_cosine"])
        return
    seen = closure_step(model, opt, *data[0])  # the first step is a SAM step for every class here
    st, h = opt.stats(), hand(seen)
    assert tuple(st) == telemetry_stats.KEYS
    assert all(isinstance(v, float) for v in st.values())
    assert_norms(st, h)
    assert st["steps"] == 1 and st["sam_steps"] == 1 and st["sam_step_fraction"] == 1.0
    assert st["optimizer_bytes"] > 0


def test_stats_before_any_step_and_without_telemetry():
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, telemetry=False)
    st = opt.stats()
    assert tuple(st) == telemetry_stats.KEYS
    assert all(math.isnan(st[k]) for k in telemetry_stats.VALUES + ("sam_step_fraction",))
    assert st["steps"] == 0 and st["optimizer_bytes"] == 0
    closure_step(model, opt, *data[0])
    st = opt.stats()
    assert all(math.isnan(st[k]) for k in telemetry_stats.VALUES)  # telemetry off: counters only
    assert (st["steps"], st["sam_steps"], st["forward_passes"], st["backward_passes"]) == (1, 1, 2, 2)


@pytest.mark.parametrize("name", CLASSES)
def test_default_optimizer_reports_norms_after_one_sam_step(name):
    """No telemetry= argument: the default ("norms") fills ‖g(w)‖, ‖g(w + e)‖, ‖e‖ and the sharpness
    after one SAM step, equal to a hand computation; the cosine (telemetry=True) stays NaN."""
    model, data = model_and_data()
    params = list(model.parameters())
    opt = build(name, model)
    assert opt.telemetry.enabled and not opt.telemetry.cosine
    x, y = data[0]
    loss1 = loss_of(model, x, y)
    loss1.backward()
    seen = {"g1": snapshot([p.grad for p in params]), "w": snapshot(params)}
    assert opt.wants_sam()  # the first step is a SAM step for every class here
    opt.first_step(zero_grad=True, loss=loss1)
    seen["wp"] = snapshot(params)
    loss2 = loss_of(model, x, y)
    loss2.backward()
    seen.update(g2=snapshot([p.grad for p in params]), loss1=loss1.detach(), loss2=loss2.detach())
    opt.second_step(zero_grad=True, loss=loss2)
    st, h = opt.stats(), hand(seen)
    assert (st["steps"], st["sam_steps"]) == (1, 1)
    for key in ("grad_norm", "sam_grad_norm"):
        assert math.isfinite(st[key]) and st[key] == pytest.approx(h[key], rel=NORM_RTOL), key
    assert math.isfinite(st["perturbation_norm"])
    assert abs(st["perturbation_norm"] - h["applied"]) <= h["spacing"] + NORM_RTOL * RHO  # what was added
    if name != "SparseSAM":  # every element perturbed: ‖e‖ = rho·‖g‖/(‖g‖ + 1e-12)
        assert st["perturbation_norm"] == pytest.approx(RHO * h["grad_norm"] / (h["grad_norm"] + 1e-12), rel=1e-6)
    else:  # half the elements masked: less than rho
        assert st["perturbation_norm"] < 0.9 * RHO
    assert st["sharpness"] == h["sharpness"] != 0.0
    assert math.isnan(st["grad_cosine"])


def test_sssam_counts_the_seeded_draws():
    model, data = model_and_data()
    p, seed, steps = 0.4, 11, 12
    opt = sk.SSSAM(model.parameters(), torch.optim.SGD, rho=RHO, p=p, seed=seed, lr=0.1)
    g = torch.Generator().manual_seed(seed)
    expected = sum(float(torch.rand((), generator=g)) < p for _ in range(steps))
    assert 0 < expected < steps
    for i in range(steps):
        closure_step(model, opt, *data[i % len(data)])
    st = opt.stats()
    assert st["steps"] == steps and st["sam_steps"] == expected
    assert st["sam_step_fraction"] == expected / steps
    assert st["forward_passes"] == steps + expected and st["backward_passes"] == steps + expected


def test_aesam_counts_the_decisions_of_a_fixed_gradient_sequence():
    """Gradients set by hand (‖g‖² = scale²·numel): AE-SAM's rule, run here in Python, says which steps
    are SAM steps (values far from the threshold: no rounding question)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4))
    total, decay = 10, 0.9
    opt = sk.AESAM([w], torch.optim.SGD, rho=RHO, total_steps=total, lr=0.1)
    scales = [1.0, 1.0, 3.0, 1.0, 0.5, 4.0, 1.0, 1.0, 5.0, 1.0]
    mu = var = None
    expected = []
    for t, s in enumerate(scales):
        x = 4 * s * s
        mu = x if mu is None else decay * mu + (1 - decay) * x
        var = 0.0 if var is None or t == 0 else decay * var + (1 - decay) * (x - mu) ** 2
        c = (t / total) * -1.0 + (1 - t / total) * 1.0
        expected.append(x >= mu + c * math.sqrt(var))
    for s in scales:
        w.grad = torch.full((4,), s)
        if opt.wants_sam():
            opt.first_step(zero_grad=True)
            w.grad = torch.full((4,), s)
            opt.second_step(zero_grad=True)
        else:
            opt.base_step(zero_grad=True)
    st = opt.stats()
    n_sam = sum(expected)
    assert 1 < n_sam < len(scales)
    assert (st["steps"], st["sam_steps"]) == (len(scales), n_sam)
    assert st["forward_passes"] == len(scales) + n_sam == st["backward_passes"]


def test_optimizer_bytes_are_the_op_floors():
    """One SAM step with SGD momentum, fp32, N parameters: grad_sq_norm (4N) + perturb_ (16N) in
    first_step, sgd_restore_step_ (20N, the finite check in its pass by default): 40N bytes; with
    finite_check="pass" the check's grad_sq_norm (4N) more. Telemetry on adds one read of g(w) (4N)
    in the fused descent, which also takes ‖g(w+e)‖² and the dot (g(w) is held, not copied: the loop
    sets p.grad to None); telemetry="norms" adds nothing at all (the descent takes ‖g(w+e)‖² in its
    own pass, or reuses the check's read)."""
    for telemetry, finite_check, per_param in ((False, True, 40), (True, True, 44), ("norms", True, 40),
                                               (False, "pass", 44), (True, "pass", 48), ("norms", "pass", 44),
                                               (False, False, 40), ("norms", False, 40), (True, False, 44)):
        model, data = model_and_data()
        n = sum(p.numel() for p in model.parameters())
        opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, telemetry=telemetry,
                     finite_check=finite_check)
        closure_step(model, opt, *data[0])
        assert opt.stats()["optimizer_bytes"] == per_param * n, telemetry
        assert set(opt.telemetry.bytes_by_backend) == {"cpp"}


def _bytes_per_sam_step(make, telemetry, finite_check):
    """optimizer_bytes of one SAM step (manual loop; ESAM's first backward inside ascent_pass, so
    only the selected tensors get g(w)), and N."""
    model, data = model_and_data()
    kw = {} if telemetry == "default" else dict(telemetry=telemetry)
    opt = make(model.parameters(), finite_check=finite_check, **kw)
    x, y = data[0]
    with opt.ascent_pass() if isinstance(opt, sk.ESAM) else contextlib.nullcontext():
        loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert opt.stats()["sam_steps"] == 1
    return opt.stats()["optimizer_bytes"], sum(p.numel() for p in model.parameters())


DEFAULT_COST = {  # extra fp32 element reads per parameter that the default ("norms") adds to a SAM step
    "SAM": (lambda ps, **kw: sk.SAM(ps, torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, **kw), 0, 0),
    "SAM-AdamW": (lambda ps, **kw: sk.SAM(ps, torch.optim.AdamW, rho=RHO, lr=0.01, **kw), 0, 0),
    "SSSAM": (lambda ps, **kw: sk.SSSAM(ps, torch.optim.SGD, rho=RHO, p=1.0, seed=0, lr=0.1, **kw), 0, 0),
    "AESAM": (lambda ps, **kw: sk.AESAM(ps, torch.optim.SGD, rho=RHO, total_steps=10, lr=0.1, **kw), 0, 0),
    "StableSAM": (lambda ps, **kw: sk.StableSAM(ps, torch.optim.SGD, rho=RHO, lr=0.1, **kw), 0, 0),
    "SparseSAM": (lambda ps, **kw: sk.SparseSAM(ps, torch.optim.SGD, rho=RHO, mask="random", seed=0, update_freq=100,
                                                update_unit="step", lr=0.1, **kw), 0, 0),
    "ESAM": (lambda ps, **kw: sk.ESAM(ps, torch.optim.SGD, rho=RHO, beta=0.5, seed=1, lr=0.1, **kw), 0, 0),
    # ASAM's ascent norm is ‖T ⊙ g‖: ‖g(w)‖ is one more read of g
    "ASAM": (lambda ps, **kw: sk.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, **kw), 1, 1),
    # a descent not fused with SGD/AdamW: ‖g(w + e)‖ is the finite check's norm, else one more read
    "LookSAM": (lambda ps, **kw: sk.LookSAM(ps, torch.optim.SGD, rho=RHO, k=2, lr=0.1, **kw), 0, 1),
    "SAM-Adam": (lambda ps, **kw: sk.SAM(ps, torch.optim.Adam, rho=RHO, lr=0.01, **kw), 0, 1),
}


@pytest.mark.parametrize("name", list(DEFAULT_COST))
def test_what_the_default_telemetry_costs_in_bytes(name):
    """The default adds no bytes to a SAM step but where the docs say (the telemetry guide's table):
    ASAM (one read of g for ‖g(w)‖) and, without the finite check, descents that are not fused."""
    make, with_check, without_check = DEFAULT_COST[name]
    for finite_check, extra in ((True, with_check), (False, without_check)):
        off, n = _bytes_per_sam_step(make, False, finite_check)
        default, _ = _bytes_per_sam_step(make, "default", finite_check)
        assert default - off == extra * 4 * n, (finite_check, off, default)


def test_norms_mode_reports_everything_but_the_cosine():
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry="norms")
    seen = closure_step(model, opt, *data[0])
    st, h = opt.stats(), hand(seen)
    assert st["grad_norm"] == pytest.approx(h["grad_norm"], rel=NORM_RTOL)
    assert st["sam_grad_norm"] == pytest.approx(h["sam_grad_norm"], rel=NORM_RTOL)
    assert st["sharpness"] == h["sharpness"] and st["perturbation_norm"] == pytest.approx(RHO, rel=1e-6)
    assert math.isnan(st["grad_cosine"])
    assert all(telemetry_stats.SCRATCH_KEY not in st for st in opt.state.values())
    with pytest.raises(ValueError, match="telemetry"):
        sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, telemetry="cosine")


def test_floor_table_matches_the_bench_op_specs():
    """The bench's floors count the reductions a composite op needs (op_specs' table); telemetry
    counts them as the grad_sq_norm/dot calls the op makes, so its own entry is the element pass."""
    from sam_kernels.bench.op_specs import SPECS
    specs = {s.name: (s.floor_units, s.mask_bytes) for s in SPECS.values()}
    reductions = {"renormalize_": 1, "looksam_store_": 2, "looksam_apply_": 2}  # op_specs: "norm: read g", ...
    for op, (units, extra) in telemetry_stats.FLOOR_UNITS.items():
        assert specs[op] == (units + reductions.get(op, 0), extra), op


def test_composite_ops_are_counted_once():
    """renormalize_ through the API: its norm (a grad_sq_norm record) plus its pass = the 3·sN floor;
    with the norm handed over, 2·sN. (Before: the norm was counted twice.)"""
    from sam_kernels import ops
    grads = [torch.randn(100), torch.randn(7, 3)]
    n = sum(g.numel() for g in grads)
    for sq_norm, units in ((None, 3), (ops.grad_sq_norm(grads), 2)):
        with ops.dispatch.recording() as log:
            ops.renormalize_(grads, torch.tensor(2.0), sq_norm=sq_norm)
        assert sum(telemetry_stats.record_bytes(log).values()) == units * 4 * n


def test_stable_sam_reuses_the_finite_check_norm():
    """Stable SAM with the finite check: ‖g(w+e)‖² is taken once in second_step (the check), not again
    by the renormalization."""
    from sam_kernels import ops
    model, data = model_and_data()
    opt = sk.StableSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, finite_check=True)
    x, y = data[0]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    with ops.dispatch.recording() as log:
        opt.second_step(zero_grad=True)
    assert [r.op for r in log].count("grad_sq_norm") == 1


def test_ema_and_state_dict_round_trip():
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True, telemetry_decay=0.5)
    values = []
    for x, y in data[:3]:
        closure_step(model, opt, x, y)
        values.append(opt.stats()["grad_norm"])
    ema = values[0]
    for v in values[1:]:
        ema = 0.5 * ema + 0.5 * v
    assert opt.stats(ema=True)["grad_norm"] == pytest.approx(ema, rel=1e-6)
    sd = opt.state_dict()
    model2, _ = model_and_data()
    model2.load_state_dict(model.state_dict())
    opt2 = sk.SAM(model2.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True, telemetry_decay=0.5)
    opt2.load_state_dict(sd)
    assert opt2.stats() == opt.stats() or all(
        (a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(opt2.stats().values(), opt.stats().values()))
    assert opt2.stats(ema=True)["grad_norm"] == opt.stats(ema=True)["grad_norm"]
    assert opt2.stats()["steps"] == 3
    closure_step(model2, opt2, *data[3])
    assert opt2.stats()["steps"] == 4 and opt2.stats()["sam_steps"] == 4
    old = opt.state_dict()
    del old["sam"]["telemetry"]  # saved before telemetry existed
    opt3 = sk.SAM(model_and_data()[0].parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    opt3.load_state_dict(old)
    assert opt3.stats()["steps"] == 0


def test_between_steps_the_state_dict_holds_no_gradient_copy():
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
    closure_step(model, opt, *data[0])
    assert all(telemetry_stats.SCRATCH_KEY not in st for st in opt.state_dict()["state"].values())


def test_restore_discards_the_step():
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
    x, y = data[0]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    opt.restore()
    st = opt.stats()
    assert st["steps"] == 0 and math.isnan(st["grad_norm"])


def test_every_calls_the_callback_every_n_steps():
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
    got = []
    handle = telemetry_stats.every(opt, 2, got.append)
    for x, y in data[:5]:
        closure_step(model, opt, x, y)
    assert [d["steps"] for d in got] == [2.0, 4.0]
    assert tuple(got[0]) == telemetry_stats.KEYS
    handle.remove()
    closure_step(model, opt, *data[5])
    assert len(got) == 2
    with pytest.raises(ValueError):
        telemetry_stats.every(opt, 0, print)


def test_amp_norms_are_unscaled():
    scale = 1024.0
    model, data = model_and_data()
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, grad_scaler=scaler, telemetry=True)
    params = list(model.parameters())
    x, y = data[0]
    scaler.scale(loss_of(model, x, y)).backward()
    g1 = [g / scale for g in snapshot([p.grad for p in params])]
    seen = {}

    def closure():
        scaler.scale(loss_of(model, x, y)).backward()
        seen["g2"] = [g / scale for g in snapshot([p.grad for p in params])]

    scaler.step(opt, closure)
    scaler.update()
    st = opt.stats()
    assert st["grad_norm"] == pytest.approx(math.sqrt(sq(g1)), rel=NORM_RTOL)
    assert st["sam_grad_norm"] == pytest.approx(math.sqrt(sq(seen["g2"])), rel=NORM_RTOL)
    assert st["grad_cosine"] == pytest.approx(dot(g1, seen["g2"]) / math.sqrt(sq(g1) * sq(seen["g2"])),
                                              rel=NORM_RTOL)
    assert st["perturbation_norm"] == pytest.approx(RHO, rel=1e-6)


def test_amp_overflow_keeps_the_previous_values():
    scale = 1024.0
    model, data = model_and_data()
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, grad_scaler=scaler, telemetry=True)
    x, y = data[0]
    for inject in (False, True):
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()

        def closure():
            scaler.scale(loss_of(model, x, y)).backward()
            if inject:
                next(model.parameters()).grad[0, 0] = float("inf")

        scaler.step(opt, closure)
        scaler.update()
        if not inject:
            before = opt.stats()
    after = opt.stats()
    for k in telemetry_stats.VALUES:
        assert (after[k] == before[k]) or (math.isnan(after[k]) and math.isnan(before[k])), k
    assert after["steps"] == 2


# ---------------------------------------------------------------------- no host sync

SYNC_READS = ("item", "__bool__", "tolist", "cpu", "__float__", "__int__")


def count_reads(monkeypatch, calls):
    for name in SYNC_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _orig=original, **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("telemetry", [True, "default"])
@pytest.mark.parametrize("name", CLASSES)
def test_a_step_with_telemetry_has_no_host_sync(monkeypatch, name, telemetry):
    """The step itself (first_step, the second backward, second_step): the policy's decision is taken
    before (SS-SAM's draw and AE-SAM's threshold are host reads by design), ESAM's tensor draw too.
    ``"default"``: no telemetry= argument (the "norms" mode)."""
    model, data = model_and_data()
    kw = {} if telemetry == "default" else dict(telemetry=telemetry)
    opt = build(name, model, finite_check=False, **kw)
    for i in range(2):  # warm-up: state, masks
        x, y = data[i]
        loss1 = loss_of(model, x, y)
        loss1.backward()
        wants = opt.wants_sam()
        if name == "ESAM":
            opt.ascent_params()
        calls = []
        if i == 1:
            count_reads(monkeypatch, calls)
        finish_step(model, opt, x, y, wants, loss1)
        monkeypatch.undo()
        assert calls == [], i
    st = opt.stats()
    assert math.isfinite(st["grad_norm"])


def test_esam_closure_step_with_sds_has_no_host_sync(monkeypatch):
    model, data = model_and_data()
    opt = sk.ESAM(model.parameters(), torch.optim.SGD, rho=RHO, gamma=0.5, seed=0, lr=0.1, telemetry=True,
                  finite_check=False)
    x, y = data[0]
    closure = lambda idx=None: loss_of(model, x if idx is None else x[idx], y if idx is None else y[idx],  # noqa: E731
                                       reduction="none")
    opt.step(closure)
    calls = []
    count_reads(monkeypatch, calls)
    opt.step(closure)
    monkeypatch.undo()
    assert calls == []
    assert math.isfinite(opt.stats()["sharpness"])


def test_stats_reads_the_device_once(monkeypatch):
    model, data = model_and_data()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, telemetry=True)
    closure_step(model, opt, *data[0])
    for ema in (False, True):
        calls = []
        count_reads(monkeypatch, calls)
        opt.stats(ema=ema)
        monkeypatch.undo()
        assert calls == ["tolist"], ema


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CLASSES)
def test_cuda_step_with_telemetry_has_no_sync(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).cuda()
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    opt = build(name, model, telemetry=True, finite_check=False)
    for i in range(3):
        loss1 = loss_of(model, x, y)
        loss1.backward()
        wants = opt.wants_sam()
        if name == "ESAM":
            opt.ascent_params()
        if i == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            finish_step(model, opt, x, y, wants, loss1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    st = opt.stats()
    assert tuple(st) == telemetry_stats.KEYS and math.isfinite(st["grad_norm"])


@pytest.mark.parametrize("mode", ["norms", True])
def test_fullgraph_compiled_steps_keep_telemetry(mode):
    """first_step/second_step under torch.compile(fullgraph=True) with telemetry on: no graph break, and
    the values and counters equal the eager run's (bytes are not counted under compile: trace time)."""
    torch._dynamo.reset()
    sk.backends()
    runs = []
    for compiled in (True, False):
        model, data = model_and_data()
        opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, finite_check=False,
                     telemetry=mode)
        first, second = opt.first_step, opt.second_step
        if compiled:
            first = torch.compile(first, fullgraph=True, backend="aot_eager")
            second = torch.compile(second, fullgraph=True, backend="aot_eager")
        for x, y in data[:3]:
            loss_of(model, x, y).backward()
            first()
            model.zero_grad()  # outside: torch.optim's zero_grad is not traceable
            loss_of(model, x, y).backward()
            second()
            model.zero_grad()
        runs.append(opt.stats())
    got, want = runs
    for k in telemetry_stats.VALUES[:4]:
        if mode != "norms" or k != "grad_cosine":
            assert got[k] == pytest.approx(want[k], rel=NORM_RTOL), k
    assert math.isnan(got["sharpness"])
    assert (got["steps"], got["sam_steps"]) == (want["steps"], want["sam_steps"]) == (3, 3)


# ---------------------------------------------------------------------- the docs

def test_docs_telemetry_example_runs(capsys):
    """The example of the telemetry guide's "stats()" section runs as written and fills every value."""
    from tests.docs_blocks import python_blocks

    blocks = python_blocks("guides/telemetry.md", "## `stats()` and the `telemetry=` modes")
    assert len(blocks) == 1
    for block in blocks:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 3))
        loader = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
        scope = dict(torch=torch, sk=sk, F=F, model=model, loss_fn=F.cross_entropy, loader=loader)
        exec(compile(block, "docs/guides/telemetry.md", "exec"), scope)
        st = scope["opt"].stats()
        assert st["steps"] == 4 and math.isfinite(st["sharpness"]) and math.isfinite(st["grad_cosine"])
    printed = capsys.readouterr().out
    assert printed.count("'grad_norm'") == 3  # every(opt, 2, print) at steps 2 and 4, then the final print


def test_old_module_name_warns_and_gives_the_same_objects():
    """``sam_kernels.optim.stats`` (the telemetry's former module name) still imports, with a DeprecationWarning."""
    import importlib
    import sys
    sys.modules.pop("sam_kernels.optim.stats", None)
    with pytest.warns(DeprecationWarning, match="sam_kernels.optim.telemetry"):
        old = importlib.import_module("sam_kernels.optim.stats")
    assert (old.every, old.KEYS, old.FOLD, old.Telemetry) == (
        telemetry_stats.every, telemetry_stats.KEYS, telemetry_stats.FOLD, telemetry_stats.Telemetry)
