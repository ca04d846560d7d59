"""Edge cases of the SAM core against the maths and the error contract: Stable SAM in ASAM mode, LookSAM
vs naive maths, state left clean after errors, AE statistics, per-bucket RNG, resume of every variant."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk


def model_(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


def loss(m, x, y):
    return F.cross_entropy(m(x), y)


def grads_at(m, x, y):
    m.zero_grad()
    loss(m, x, y).backward()
    return [p.grad.clone() for p in m.parameters()]


# ------------------------------------------------------------------ Stable SAM in ASAM mode

@pytest.mark.parametrize("adaptive", [False, True])
def test_stable_sam_descent_norm_equals_ascent_norm(adaptive):
    """Spec (DESIGN §5): g <- g(w+e)·‖T g(w)‖/‖T g(w+e)‖, T = |w|+eta in ASAM mode (1 otherwise)."""
    m = model_()
    x, y = data(1)[0]
    w0 = [p.detach().clone() for p in m.parameters()]
    eta, rho = 0.01, 0.5
    # naive
    g0 = grads_at(m, x, y)
    T = [(w.abs() + eta) if adaptive else torch.ones_like(w) for w in w0]
    n0 = math.sqrt(sum(((t * g) ** 2).sum().item() for t, g in zip(T, g0)))
    with torch.no_grad():
        for p, t, g in zip(m.parameters(), T, g0):
            p.add_(rho * t * t * g / (n0 + 1e-12))
    gs = grads_at(m, x, y)
    ns = math.sqrt(sum(((t * g) ** 2).sum().item() for t, g in zip(T, gs)))
    want = [g * n0 / (ns + 1e-12) for g in gs]
    # optimizer (lr 1, plain SGD: the update is -g exactly)
    with torch.no_grad():
        for p, w in zip(m.parameters(), w0):
            p.copy_(w)
    opt = sk.StableSAM(m.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=1.0)
    m.zero_grad()
    loss(m, x, y).backward()
    opt.first_step(zero_grad=True)
    loss(m, x, y).backward()
    opt.second_step()
    got = [(w - p.detach()) for p, w in zip(m.parameters(), w0)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ LookSAM vs naive

def test_looksam_matches_naive_k3():
    k, alpha, rho, lr = 3, 0.7, 0.05, 0.1
    batches = data(13)
    m1, m2 = model_(), model_()
    opt = sk.LookSAM(m1.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, lr=lr, momentum=0.9)
    base = torch.optim.SGD(m2.parameters(), lr=lr, momentum=0.9)
    gv = None
    for t, (x, y) in enumerate(batches):
        m1.zero_grad()
        loss(m1, x, y).backward()
        opt.step(lambda: loss(m1, x, y).backward())
        # naive
        params = list(m2.parameters())
        g = grads_at(m2, x, y)
        if t % k == 0:
            n = math.sqrt(sum((gi ** 2).sum().item() for gi in g))
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(rho * gi / (n + 1e-12))
            gs = grads_at(m2, x, y)
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
            d = sum((a * b).sum().item() for a, b in zip(g, gs))
            gv = [b - d / (n * n) * a for a, b in zip(g, gs)]
            use = gs
        else:
            ng = math.sqrt(sum((gi ** 2).sum().item() for gi in g))
            nv = math.sqrt(sum((v ** 2).sum().item() for v in gv))
            use = [gi + alpha * ng / nv * v for gi, v in zip(g, gv)]
        for p, u in zip(params, use):
            p.grad = u.clone()
        base.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------ error leaves clean state

def test_nan_at_second_pass_does_not_poison_looksam_state():
    m = model_()
    x, y = data(1)[0]
    opt = sk.LookSAM(m.parameters(), torch.optim.SGD, k=2, lr=0.1)
    loss(m, x, y).backward()
    opt.first_step(zero_grad=True)
    loss(m, x, y).backward()
    next(m.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.second_step()
    bad = [k for p in m.parameters() for k, v in opt.state[p].items()
           if torch.is_tensor(v) and not torch.isfinite(v).all()]
    assert not bad, f"non-finite SAM state left after the error: {bad}"


def test_ae_forced_first_step_updates_statistics():
    """A davda54-style loop (first/second step without wants_sam) should still feed AE's EMAs."""
    m = model_()
    opt = sk.AESAM(m.parameters(), torch.optim.SGD, total_steps=10, lr=0.1)
    for x, y in data(3):
        m.zero_grad()
        loss(m, x, y).backward()
        opt.first_step(zero_grad=True)
        loss(m, x, y).backward()
        opt.second_step(zero_grad=True)
    assert opt.policy.mu is not None, "AE-SAM statistics never updated in a first/second-step loop"


def test_ae_mu_var_are_device_tensors():
    m = model_()
    opt = sk.AESAM(m.parameters(), torch.optim.SGD, total_steps=10, lr=0.1)
    x, y = data(1)[0]
    loss(m, x, y).backward()
    opt.wants_sam()
    assert torch.is_tensor(opt.policy.mu), f"mu is {type(opt.policy.mu).__name__} (brief: device tensors)"


def test_keep_prob_groups_get_distinct_draws():
    """Two groups with different rho, same shapes: per-element keep masks must not repeat across groups."""
    class Sub(sk.SAM):
        def perturbation_options(self, params, grads):
            return {"keep_prob": 0.5, "seed": 1234}
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float64))
    opt = Sub([dict(params=[a], rho=1.0), dict(params=[b], rho=2.0)], torch.optim.SGD, lr=0.1)
    a.grad = torch.ones_like(a)
    b.grad = torch.ones_like(b)
    opt.first_step()
    assert not torch.equal(a.detach() != 0, b.detach() != 0), "both groups drew the same keep mask"


def test_adamw_step_dtype_follows_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m1, m2 = model_(), model_()
        x, y = data(1)[0]
        ref = torch.optim.AdamW(m2.parameters(), lr=1e-3)
        loss(m2, x, y).backward()
        ref.step()
        opt = sk.SAM(m1.parameters(), torch.optim.AdamW, lr=1e-3)
        loss(m1, x, y).backward()
        opt.step(lambda: loss(m1, x, y).backward())
        s1 = opt.base_optimizer.state_dict()["state"][0]["step"]
        s2 = ref.state_dict()["state"][0]["step"]
        assert s1.dtype == s2.dtype, f"{s1.dtype} vs torch {s2.dtype}"
    finally:
        torch.set_default_dtype(old)


def test_load_with_wrong_policy_does_not_half_load():
    m = model_()
    x, y = data(1)[0]
    a = sk.SSSAM(m.parameters(), torch.optim.SGD, p=0.5, seed=0, lr=0.1, momentum=0.9)
    for _ in range(2):
        m.zero_grad()
        loss(m, x, y).backward()
        a.step(lambda: loss(m, x, y).backward())
    sd = copy.deepcopy(a.state_dict())
    b = sk.AESAM(m.parameters(), torch.optim.SGD, total_steps=10, lr=0.1, momentum=0.9)
    with pytest.raises((ValueError, KeyError)):
        b.load_state_dict(sd)
    assert len(b.base_optimizer.state) == 0, "base optimizer state was loaded before the policy mismatch was found"


def test_sssam_non_sam_step_is_exactly_base_step():
    m1, m2 = model_(), model_()
    opt = sk.SSSAM(m1.parameters(), torch.optim.SGD, p=0.0, seed=3, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    for x, y in data(5):
        m1.zero_grad(); m2.zero_grad()
        loss(m1, x, y).backward(); loss(m2, x, y).backward()
        calls = []
        opt.step(lambda: calls.append(1) or loss(m1, x, y).backward())
        ref.step()
        assert not calls
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_first_step_failure_midway_leaves_no_perturbation():
    """Two buckets (different rho); the second bucket's perturb_ fails: the first must be restored."""
    class Bad(sk.SAM):
        def perturbation_options(self, params, grads):
            # a float mask for the second bucket only: perturb_ rejects it after bucket 1 ran
            return {"masks": [torch.ones(3, dtype=torch.bool), torch.ones(3)]}
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = Bad([dict(params=[a], rho=0.1), dict(params=[b], rho=0.2)], torch.optim.SGD, lr=0.1)
    a.grad = torch.ones(3)
    b.grad = torch.ones(3)
    with pytest.raises(TypeError, match="masks"):
        opt.first_step()
    assert torch.equal(a.detach(), torch.ones(3)), "weights left perturbed after a failed first_step"
    with pytest.raises(RuntimeError, match="before first_step"):  # nothing was left pending
        opt.second_step()


def test_ae_nan_batch_does_not_poison_statistics():
    m = model_()
    opt = sk.AESAM(m.parameters(), torch.optim.SGD, total_steps=10, lr=0.1)
    x, y = data(1)[0]
    loss(m, x, y).backward()
    opt.wants_sam(); opt.base_step(zero_grad=True)
    loss(m, x, y).backward()
    next(m.parameters()).grad[0, 0] = float("nan")
    try:
        opt.wants_sam()
    except FloatingPointError:
        pass
    assert math.isfinite(float(opt.policy.mu)), "one NaN batch made mu NaN: AE-SAM never takes a SAM step again"


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_unperturbed_param_with_grad_on_fused_path(backend):
    """ESAM-like: only the first tensor is perturbed; all get a base step (fused SGD, momentum)."""
    class Sub(sk.SAM):
        def ascent_params(self):
            return [next(iter(self.param_groups[0]["params"]))]
    m1, m2 = model_(), model_()
    opt = Sub(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    for x, y in data(4):
        g = grads_at(m2, x, y)
        p0 = next(m2.parameters())
        w0 = p0.detach().clone()
        with torch.no_grad():
            p0.add_(0.1 * g[0] / (g[0].norm() + 1e-12))
        gs = grads_at(m2, x, y)
        with torch.no_grad():
            p0.copy_(w0)
        for p, gg in zip(m2.parameters(), gs):
            p.grad = gg
        ref.step()
        m1.zero_grad(); loss(m1, x, y).backward()
        opt.step(lambda: loss(m1, x, y).backward())
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_grad_gone_at_second_pass_restores_without_update(backend, base):
    """A param perturbed at the first pass but without a gradient at the second gets its weights back,
    bitwise, and no base step; the others take the fused step as usual."""
    m = model_()
    make = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if base == "sgd" else \
        (lambda ps: torch.optim.AdamW(ps, lr=0.1))
    opt = sk.SAM(m.parameters(), torch.optim.SGD if base == "sgd" else torch.optim.AdamW, rho=0.1, lr=0.1,
                 **(dict(momentum=0.9) if base == "sgd" else {}), backend=backend)
    x, y = data(1)[0]
    frozen = m[2].bias
    w = [p.detach().clone() for p in m.parameters()]
    loss(m, x, y).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(frozen, w[3]), "the param was not perturbed"
    loss(m, x, y).backward()
    g2 = [p.grad.clone() for p in m.parameters()]
    frozen.grad = None
    opt.second_step()
    assert torch.equal(frozen, w[3])
    assert "momentum_buffer" not in opt.base_optimizer.state[frozen] and "exp_avg" not in opt.base_optimizer.state[frozen]
    ref = [t.clone().requires_grad_() for t in w[:3]]
    for r, g in zip(ref, g2):
        r.grad = g
    make(ref).step()
    for p, r in zip(list(m.parameters())[:3], ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,kw", [(sk.LookSAM, dict(k=3)), (sk.AELookSAM, dict(total_steps=12)),
                                    (sk.StableSAM, dict())])
@pytest.mark.parametrize("mid_step", [False, True])
def test_variant_resume_bitwise(cls, kw, mid_step):
    batches = data(9)
    def run(m, opt, bs):
        for x, y in bs:
            m.zero_grad(); loss(m, x, y).backward()
            opt.step(lambda: loss(m, x, y).backward())
    m1 = model_()
    o1 = cls(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
    run(m1, o1, batches)
    m2 = model_()
    o2 = cls(m2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
    run(m2, o2, batches[:4])
    x, y = batches[4]
    if mid_step:  # save after first_step when step 4 is a SAM step (StableSAM; AE-LookSAM by its decision)
        m2.zero_grad(); loss(m2, x, y).backward()
        want = o2.wants_sam()
        if want:
            o2.first_step(zero_grad=True)
    sd = copy.deepcopy(o2.state_dict()); msd = copy.deepcopy(m2.state_dict())
    m3 = model_(5); m3.load_state_dict(msd)
    o3 = cls(m3.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
    o3.load_state_dict(sd)
    if mid_step:
        if want:
            loss(m3, x, y).backward(); o3.second_step(zero_grad=True)
        else:
            m3.zero_grad(); loss(m3, x, y).backward(); o3.base_step(zero_grad=True)
        run(m3, o3, batches[5:])
    else:
        run(m3, o3, batches[4:])
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_between_steps_holds_no_scratch_buffers():
    m = model_()
    opt = sk.LookSAM(m.parameters(), torch.optim.SGD, k=2, lr=0.1)
    for x, y in data(3):
        m.zero_grad(); loss(m, x, y).backward()
        opt.step(lambda: loss(m, x, y).backward())
    keys = {k for st in opt.state_dict()["state"].values() for k in st}
    assert keys == {"looksam_gv"}, keys


def test_ae_step_without_gradients_is_a_plain_no_op():
    """No gradient at all (a no-gradient step, as plain SAM allows): a plain step that learns nothing."""
    m = model_()
    opt = sk.AESAM(m.parameters(), torch.optim.SGD, total_steps=10, lr=0.1)
    assert opt.wants_sam() is False
    opt.base_step()
    assert opt.policy.mu is None or not bool(opt.policy.seen)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_adamw_params_at_different_step_counts(backend):
    """A param that gets gradients only from the third step on has its own AdamW step count (bias
    corrections): the fused descent splits launches by step and matches torch's AdamW."""
    m1, m2 = model_(), model_()
    late1, late2 = m1[2].bias, m2[2].bias
    opt = sk.SAM(m1.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, weight_decay=0.05, backend=backend)
    ref = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.05)
    for i, (x, y) in enumerate(data(5)):
        # reference: SAM by hand, then torch's AdamW with the second-pass grads
        g = grads_at(m2, x, y)
        gs_live = [(p, gg) for p, gg in zip(m2.parameters(), g) if i >= 2 or p is not late2]
        norm = torch.sqrt(sum((gg ** 2).sum() for _, gg in gs_live))
        w0 = [p.detach().clone() for p in m2.parameters()]
        with torch.no_grad():
            for p, gg in gs_live:
                p.add_(0.1 * gg / (norm + 1e-12))
        g2 = grads_at(m2, x, y)
        with torch.no_grad():
            for p, w in zip(m2.parameters(), w0):
                p.copy_(w)
        for p, gg in zip(m2.parameters(), g2):
            p.grad = None if (i < 2 and p is late2) else gg
        ref.step()
        # sam_kernels: the late param's grad is dropped after each backward before step 3
        m1.zero_grad(); loss(m1, x, y).backward()
        if i < 2:
            late1.grad = None
        opt.first_step(zero_grad=True)
        loss(m1, x, y).backward()
        if i < 2:
            late1.grad = None
        opt.second_step(zero_grad=True)
    assert int(opt.base_optimizer.state[late1]["step"]) == 3 and int(opt.base_optimizer.state[m1[0].weight]["step"]) == 5
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_param_changed_between_steps_gets_a_new_backup(backend, change):
    """A param resized or cast after some steps (its base state reset, as torch requires) gets a fresh
    backup: the step runs and matches a new optimizer started on the changed param."""
    m1 = model_()
    opt = sk.SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, backend=backend)
    x, y = data(1)[0]
    m1.zero_grad(); loss(m1, x, y).backward()
    opt.first_step(zero_grad=True); loss(m1, x, y).backward(); opt.second_step(zero_grad=True)
    p = m1[2].bias
    old_backup = opt.state[p]["backup"]
    with torch.no_grad():
        p.data = torch.randn(5, dtype=torch.float64) if change == "shape" else p.data.float()
    w0 = p.detach().clone()
    g = torch.randn_like(p)
    p.grad = g.clone()
    opt.first_step()
    assert opt.state[p]["backup"] is not old_backup
    assert torch.equal(opt.state[p]["backup"], w0)
    # perturbed by rho·g/‖all grads‖: only p has a grad now
    torch.testing.assert_close(p.detach(), w0 + 0.1 * g / (g.norm() + 1e-12))
    opt.restore()
    assert torch.equal(p.detach(), w0)
