"""sam_kernels.SAM against a naive per-parameter SAM written here, plus state and misuse."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk

ETA = 0.01


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3),
    ).to(dtype)


def batches(n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def group_spec(model, adaptive_conv=True):
    """Two groups with different rho/lr; the conv group uses ASAM."""
    conv = list(model[0].parameters())
    rest = [p for m in (model[3], model[5]) for p in m.parameters()]
    return [dict(params=conv, rho=0.1, adaptive=adaptive_conv, lr=0.05), dict(params=rest)]


def naive_sam_step(model, base, groups, x, y):
    """The maths of SAM, one parameter at a time: ONE global norm, e = rho·T²·g/(‖T⊙g‖+1e-12)."""
    loss_of(model, x, y).backward()
    with torch.no_grad():
        sq = 0.0
        for g in groups:
            for p in g["params"]:
                t = (p.abs() + ETA) if g["adaptive"] else 1.0
                sq = sq + ((t * p.grad) ** 2).sum()
        norm = torch.sqrt(sq)
        backups = []
        for g in groups:
            for p in g["params"]:
                t2 = (p.abs() + ETA) ** 2 if g["adaptive"] else 1.0
                backups.append((p, p.clone()))
                p.add_(g["rho"] * t2 * p.grad / (norm + 1e-12))
    model.zero_grad()
    loss_of(model, x, y).backward()
    with torch.no_grad():
        for p, b in backups:
            p.copy_(b)
    base.step()
    model.zero_grad()


def sam_step(model, opt, x, y):
    loss_of(model, x, y).backward()
    opt.step(lambda: loss_of(model, x, y).backward())
    opt.zero_grad()


BASES = {
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    "sgd_dampening": (torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.1, weight_decay=1e-3)),
    "sgd_plain": (torch.optim.SGD, dict(lr=0.1)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    "rmsprop_generic": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5)),
}


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_sam_matches_naive_sam(base_name, adaptive, backend):
    cls, kw = BASES[base_name]
    ref_model, model = make_model(), make_model()
    spec_ref = group_spec(ref_model, adaptive)
    for g in spec_ref:
        g.setdefault("rho", 0.05)
        g.setdefault("adaptive", False)
    ref_base = cls([{k: v for k, v in g.items() if k not in ("rho", "adaptive")} for g in spec_ref], **kw)
    opt = sk.SAM(group_spec(model, adaptive), cls, rho=0.05, eta=ETA, backend=backend, **kw)
    for x, y in batches(20):
        naive_sam_step(ref_model, ref_base, spec_ref, x, y)
        sam_step(model, opt, x, y)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-9)
    assert opt.step_count == 20


def test_fused_path_writes_torch_state_layout():
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    for x, y in batches(2):
        sam_step(model, opt, x, y)
    ref = torch.optim.AdamW(make_model().parameters(), lr=1e-3)
    make_model()(torch.randn(1, 2, 6, 6, dtype=torch.float64)).sum().backward()
    st = opt.base_optimizer.state[next(model.parameters())]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
    assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu" and float(st["step"]) == 2.0
    assert ref.state_dict()["param_groups"][0].keys() <= opt.base_optimizer.state_dict()["param_groups"][0].keys()


def test_base_optimizer_instance_and_lr_scheduler():
    model, ref_model = make_model(), make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = sk.SAM(model.parameters(), base, rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref_base = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_base, step_size=1, gamma=0.5)
    spec = [dict(params=list(ref_model.parameters()), rho=0.05, adaptive=False)]
    for x, y in batches(4):
        sam_step(model, opt, x, y)
        naive_sam_step(ref_model, ref_base, spec, x, y)
        sched.step()
        ref_sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 / 16)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-9)


def test_instance_with_other_params_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match="exactly the parameters"):
        sk.SAM(model.parameters(), torch.optim.SGD(list(model.parameters())[:2], lr=0.1))
    with pytest.raises(TypeError, match="base_optimizer"):
        sk.SAM(model.parameters(), "SGD")


@pytest.mark.parametrize("cls,kw", [BASES["sgd_nesterov"], BASES["adamw"], BASES["rmsprop_generic"]],
                         ids=["sgd", "adamw", "rmsprop"])
def test_resume_is_bitwise(cls, kw):
    data = batches(10)
    model = make_model()
    opt = sk.SAM(group_spec(model), cls, **kw)
    for x, y in data:
        sam_step(model, opt, x, y)
    straight = [p.clone() for p in model.parameters()]

    model = make_model()
    opt = sk.SAM(group_spec(model), cls, **kw)
    for x, y in data[:4]:
        sam_step(model, opt, x, y)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2 = make_model(seed=5)
    opt2 = sk.SAM(group_spec(model2), cls, **kw)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    for x, y in data[4:]:
        sam_step(model2, opt2, x, y)
    for p, q in zip(model2.parameters(), straight):
        assert torch.equal(p, q)


def test_mid_step_save_includes_backups_and_resumes():
    data = batches(3)
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sam_step(model, opt, *data[0])
    x, y = data[1]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    sd = copy.deepcopy(opt.state_dict())
    msd = copy.deepcopy(model.state_dict())
    assert sd["sam"]["perturbed"] is not None and all("backup" in s for s in sd["state"].values())
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    want = [p.clone() for p in model.parameters()]

    model2 = make_model(seed=3)
    opt2 = sk.SAM(model2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    model2.load_state_dict(msd)
    opt2.load_state_dict(sd)
    loss_of(model2, x, y).backward()
    opt2.second_step(zero_grad=True)
    for p, q in zip(model2.parameters(), want):
        assert torch.equal(p, q)
    # Between steps the backups are scratch space and stay out of the checkpoint.
    assert all("backup" not in s for s in opt2.state_dict()["state"].values())


def test_load_mismatched_state_is_rejected():
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sam_step(model, opt, *batches(1)[0])
    other = sk.SAM(torch.nn.Linear(3, 3).double().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not saved by"):
        other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    renorm = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, renormalize=True)
    with pytest.raises(ValueError, match="descent modifiers"):
        renorm.load_state_dict(opt.state_dict())


def test_second_step_before_first_step():
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, *batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()


def test_first_step_twice():
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, *batches(1)[0]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["first", "second"])
def test_nonfinite_grads_raise_and_leave_weights_clean(bad, where):
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    before = [p.clone() for p in model.parameters()]
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    if where == "first":
        model[5].weight.grad[0, 0] = bad
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            opt.first_step(zero_grad=True)
    else:
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        model[5].bias.grad[1] = bad
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            opt.second_step(zero_grad=True)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "weights must be neither perturbed nor updated"
    # Clean state: the next step works.
    opt.zero_grad()
    sam_step(model, opt, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_without_check_never_perturbs():
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, finite_check=False)
    before = [p.clone() for p in model.parameters()]
    loss_of(model, *batches(1)[0]).backward()
    model[5].weight.grad[0, 0] = float("inf")
    opt.first_step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_sparse_gradients_are_rejected_around_a_base_optimizer_without_them():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = sk.SAM(emb.parameters(), torch.optim.Adam, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.first_step()


def test_step_without_closure_and_restore():
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    before = [p.clone() for p in model.parameters()]
    loss_of(model, *batches(1)[0]).backward()
    opt.first_step()
    opt.restore()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_closure_error_restores_weights():
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.clone() for p in model.parameters()]
    loss_of(model, *batches(1)[0]).backward()

    def broken():
        raise KeyError("data loader failed")

    with pytest.raises(KeyError):
        opt.step(broken)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_params_without_grad_are_skipped():
    model = make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    opt = sk.SAM([p for p in model.parameters()], torch.optim.SGD, lr=0.1, momentum=0.9)
    before = frozen.clone()
    sam_step(model, opt, *batches(1)[0])
    assert torch.equal(frozen, before)


def test_bf16_model_runs_on_fused_path():
    model = make_model(dtype=torch.bfloat16)
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for x, y in batches(3, dtype=torch.bfloat16):
        sam_step(model, opt, x, y)
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


def test_plain_step_with_nonfinite_grads_raises():
    model = make_model()
    opt = sk.SSSAM(model.parameters(), torch.optim.SGD, p=0.0, seed=0, lr=0.1, momentum=0.9)
    before = [p.clone() for p in model.parameters()]
    loss_of(model, *batches(1)[0]).backward()
    assert not opt.wants_sam()
    model[3].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="base_step"):
        opt.base_step(zero_grad=True)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
