"""SS-SAM, Stable SAM, LookSAM, AE-SAM / AE-LookSAM against the maths, plus composition and resume."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import sam_kernels as sk
from sam_kernels.optim.policy import AdaptivePolicy, ScheduledPolicy
from tests.optim.test_sam import batches, loss_of, make_model


def run(model, opt, data):
    """Manual-loop protocol; returns the per-step decisions."""
    decisions = []
    for x, y in data:
        loss_of(model, x, y).backward()
        d = opt.wants_sam()
        decisions.append(d)
        if d:
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.base_step(zero_grad=True)
    return decisions


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------- SS-SAM

@pytest.mark.parametrize("schedule,kw", [
    ("constant", dict(p=0.6)),
    ("piecewise", dict(p_start=0.9, p_end=0.2, s_switch=0.3)),
    ("linear", dict(p_start=1.0, p_end=0.0)),
    ("trigonometric", dict(p_start=0.8, p_end=0.1)),
])
def test_ss_sam_fraction_matches_schedule_mean(schedule, kw):
    total = 4000
    pol = ScheduledPolicy(schedule, total_steps=total, seed=3, **kw)
    probs = [pol.probability(t) for t in range(total)]
    hits = sum(pol.decide(t) for t in range(total))
    mean = sum(probs)
    sigma = math.sqrt(sum(p * (1 - p) for p in probs))
    assert abs(hits - mean) <= 3 * sigma + 1


def test_ss_sam_schedule_formulas():
    pol = ScheduledPolicy("trigonometric", p_start=0.8, p_end=0.2, total_steps=100, seed=0)
    assert pol.probability(0) == pytest.approx(0.8)
    assert pol.probability(50) == pytest.approx(0.5)
    assert pol.probability(100) == pytest.approx(0.2)
    lin = ScheduledPolicy("linear", p_start=0.8, p_end=0.2, total_steps=100, seed=0)
    assert lin.probability(25) == pytest.approx(0.65)
    pw = ScheduledPolicy("piecewise", p_start=0.8, p_end=0.2, s_switch=0.5, total_steps=100, seed=0)
    assert (pw.probability(49), pw.probability(50)) == (0.8, 0.2)
    with pytest.raises(ValueError, match="total_steps"):
        ScheduledPolicy("linear")
    with pytest.raises(ValueError, match="schedule"):
        ScheduledPolicy("cosine", total_steps=3)


def test_ss_sam_plain_step_equals_base_step():
    data = batches(12)
    model, ref = make_model(), make_model()
    opt = sk.SSSAM(model.parameters(), torch.optim.SGD, p=0.5, seed=7, lr=0.1, momentum=0.9)
    ref_opt = sk.SAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    plain.state = ref_opt.base_optimizer.state  # one momentum state, whichever step runs
    decisions = run(model, opt, data)
    assert 0 < sum(decisions) < len(decisions)
    for (x, y), d in zip(data, decisions):
        loss_of(ref, x, y).backward()
        if d:
            ref_opt.step(lambda: loss_of(ref, x, y).backward())
        else:
            plain.step()
        ref.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_ss_sam_same_seed_same_decisions_and_resume():
    data = batches(16)
    a = run(make_model(), sk.SSSAM(make_model().parameters(), torch.optim.SGD, p=0.5, seed=11, lr=0.1), data)
    model = make_model()
    opt = sk.SSSAM(model.parameters(), torch.optim.SGD, p=0.5, seed=11, lr=0.1)
    first = run(model, opt, data[:7])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2 = make_model()
    opt2 = sk.SSSAM(model2.parameters(), torch.optim.SGD, p=0.5, seed=999, lr=0.1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    assert first + run(model2, opt2, data[7:]) == a


# ---------------------------------------------------------------- Stable SAM

def test_stable_sam_descent_norm_equals_ascent_norm():
    model = make_model()
    opt = sk.StableSAM(model.parameters(), torch.optim.SGD, lr=0.0)  # lr 0: inspect the grads only
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    g_ascent = flat_grads(model).clone()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    g_raw = flat_grads(model).clone()
    opt.second_step()
    g_desc = flat_grads(model)
    assert g_desc.norm().item() == pytest.approx(g_ascent.norm().item(), rel=1e-10)
    cos = torch.dot(g_desc, g_raw) / (g_desc.norm() * g_raw.norm())
    assert cos.item() == pytest.approx(1.0, abs=1e-12)


def test_stable_sam_asam_uses_weighted_norms():
    model = make_model()
    opt = sk.StableSAM(model.parameters(), torch.optim.SGD, adaptive=True, eta=0.01, lr=0.0)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    t = torch.cat([(p.detach().abs() + 0.01).reshape(-1) for p in model.parameters()])  # T at w
    ref_sq = sum(float(((p.detach().abs() + 0.01) * p.grad).pow(2).sum()) for p in model.parameters())
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    g_raw = flat_grads(model).clone()
    opt.second_step()
    # both norms of T⊙g, T at the restored w (DESIGN §5): ‖T⊙g_desc‖ = ‖T⊙g(w)‖, direction of g(w+e)
    want = g_raw * math.sqrt(ref_sq) / ((t * g_raw).norm().item() + 1e-12)
    torch.testing.assert_close(flat_grads(model), want, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- LookSAM

def naive_looksam(model, data, k, alpha, rho, lr):
    params = list(model.parameters())
    g_v = None
    for t, (x, y) in enumerate(data):
        loss_of(model, x, y).backward()
        with torch.no_grad():
            g = torch.cat([p.grad.reshape(-1) for p in params]).clone()
            if t % k == 0:
                e = rho * g / (g.norm() + 1e-12)
                offs = 0
                for p in params:
                    p.add_(e[offs:offs + p.numel()].view_as(p))
                    offs += p.numel()
                model.zero_grad()
                with torch.enable_grad():
                    loss_of(model, x, y).backward()
                g_s = torch.cat([p.grad.reshape(-1) for p in params])
                offs = 0
                for p in params:
                    p.sub_(e[offs:offs + p.numel()].view_as(p))
                    offs += p.numel()
                g_v = g_s - torch.dot(g, g_s) / (g.norm() ** 2 + 1e-12) * g
                step = g_s
            else:
                step = g + alpha * g.norm() / (g_v.norm() + 1e-12) * g_v
            offs = 0
            for p in params:
                p.sub_(lr * step[offs:offs + p.numel()].view_as(p))
                offs += p.numel()
        model.zero_grad()


def test_looksam_matches_naive():
    data = batches(13)
    model, ref = make_model(), make_model()
    opt = sk.LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=3, alpha=0.7, lr=0.1)
    decisions = run(model, opt, data)
    assert decisions == [t % 3 == 0 for t in range(13)]
    naive_looksam(ref, data, k=3, alpha=0.7, rho=0.05, lr=0.1)
    # (w+e)-e in the naive version is not bitwise w, so compare with a tolerance.
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-8)


# ---------------------------------------------------------------- AE-SAM

def test_ae_policy_matches_hand_computation():
    norms = [4.0, 3.0, 5.0, 2.5, 6.0, 1.0, 8.0, 7.5, 2.0, 9.0]
    pol = AdaptivePolicy(total_steps=10, decay=0.8, l1=-1.0, l2=1.0)
    mu, var, want = None, 0.0, []
    for t, s in enumerate(norms):
        if mu is None:
            mu = s
        else:
            mu = 0.8 * mu + 0.2 * s
            var = 0.8 * var + 0.2 * (s - mu) ** 2
        c = (t / 10) * -1.0 + (1 - t / 10) * 1.0
        want.append(s >= mu + c * math.sqrt(var))
    got = [pol.update(t, s) for t, s in enumerate(norms)]
    assert got == want
    assert True in got and False in got


def test_aesam_decides_on_first_pass_norm_and_resumes():
    data = batches(10)
    model = make_model()
    opt = sk.AESAM(model.parameters(), torch.optim.SGD, total_steps=10, lr=0.1)
    ref = AdaptivePolicy(total_steps=10)
    decisions = []
    for t, (x, y) in enumerate(data[:5]):
        loss_of(model, x, y).backward()
        want = ref.update(t, float(flat_grads(model).pow(2).sum()))
        decisions.append(opt.wants_sam())
        assert decisions[-1] == want
        if decisions[-1]:
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.base_step(zero_grad=True)
    saved = copy.deepcopy(opt.state_dict())
    opt2 = sk.AESAM(model.parameters(), torch.optim.SGD, total_steps=10, lr=0.1)
    opt2.load_state_dict(saved)
    assert (opt2.policy.mu, opt2.policy.var, opt2.step_count) == (opt.policy.mu, opt.policy.var, 5)


def test_ae_looksam_reuses_on_plain_steps():
    data = batches(8)
    model = make_model()
    opt = sk.AELookSAM(model.parameters(), torch.optim.SGD, total_steps=8, alpha=0.7, lr=0.1)
    decisions = run(model, opt, data)
    assert decisions[0] is True  # EMAs start at the first observation
    assert all("looksam_gv" in opt.state[p] for p in model.parameters())


# ---------------------------------------------------------------- composition

def test_ss_sam_with_renormalize_matches_maths():
    data = batches(6)
    model = make_model()
    opt = sk.SSSAM(model.parameters(), torch.optim.SGD, p=1.0, seed=0, renormalize=True, lr=0.1)
    ref = make_model()
    for x, y in data:
        loss_of(ref, x, y).backward()
        with torch.no_grad():
            g = [p.grad.clone() for p in ref.parameters()]
            n = torch.sqrt(sum((x_ ** 2).sum() for x_ in g))
            e = [0.05 * x_ / (n + 1e-12) for x_ in g]
            for p, ei in zip(ref.parameters(), e):
                p.add_(ei)
        ref.zero_grad()
        loss_of(ref, x, y).backward()
        with torch.no_grad():
            gs = [p.grad for p in ref.parameters()]
            ns = torch.sqrt(sum((x_ ** 2).sum() for x_ in gs))
            for p, ei, gi in zip(ref.parameters(), e, gs):
                p.sub_(ei)
                p.sub_(0.1 * gi * n / (ns + 1e-12))
        ref.zero_grad()
    run(model, opt, data)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-9)


def test_aesam_with_renormalize_runs_and_resumes_bitwise():
    data = batches(8)
    model = make_model()
    opt = sk.AESAM(model.parameters(), torch.optim.AdamW, total_steps=8, renormalize=True, lr=1e-2)
    run(model, opt, data)
    straight = [p.clone() for p in model.parameters()]
    model = make_model()
    opt = sk.AESAM(model.parameters(), torch.optim.AdamW, total_steps=8, renormalize=True, lr=1e-2)
    run(model, opt, data[:3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2 = make_model(seed=4)
    opt2 = sk.AESAM(model2.parameters(), torch.optim.AdamW, total_steps=8, renormalize=True, lr=1e-2)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    run(model2, opt2, data[3:])
    for p, q in zip(model2.parameters(), straight):
        assert torch.equal(p, q)
