"""The torch.optim contract, for SAM and every variant: hooks, schedulers, copies, errors, checks.

Each test is one failure the training-loop issue found, asserted the right way, over its class
(every variant, both documented loops where it applies).
"""
from __future__ import annotations

import contextlib
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from tests.utils import assert_lists_equal


def model_and_data(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(6, 5, generator=g, dtype=dtype), torch.randint(0, 3, (6,), generator=g)) for _ in range(6)]
    return model, data


def loss_of(model, x, y, reduction="mean"):
    return F.cross_entropy(model(x), y, reduction=reduction)


BASE = dict(sgd=(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), adamw=(torch.optim.AdamW, dict(lr=1e-2)),
            rmsprop=(torch.optim.RMSprop, dict(lr=1e-3)))


def build(variant, model, base="sgd", **extra):
    cls, kw = BASE[base]
    kw = {**kw, **extra}
    params = model.parameters()
    if variant == "SAM":
        return sk.SAM(params, cls, **kw)
    if variant == "ASAM":
        return sk.SAM(params, cls, rho=0.5, adaptive=True, **kw)
    if variant == "SSSAM":
        return sk.SSSAM(params, cls, p=0.5, seed=1, **kw)
    if variant == "StableSAM":
        return sk.StableSAM(params, cls, **kw)
    if variant == "LookSAM":
        return sk.LookSAM(params, cls, k=2, **kw)
    if variant == "AESAM":
        return sk.AESAM(params, cls, total_steps=6, **kw)
    if variant == "AELookSAM":
        return sk.AELookSAM(params, cls, total_steps=6, **kw)
    if variant == "SparseSAM":
        return sk.SparseSAM(params, cls, mask="random", sparsity=0.5, seed=0, **kw)
    if variant == "ESAM":
        return sk.ESAM(params, cls, beta=0.6, gamma=1.0, seed=2, **kw)
    if variant == "GSAM":
        return sk.GSAM(params, cls, alpha=0.4, **kw)
    if variant == "WSAM":
        return sk.WSAM(params, cls, gamma=0.9, **kw)
    if variant == "GCSAM":
        return sk.SAM(params, cls, use_gc=True, **kw)
    raise KeyError(variant)


VARIANTS = ["SAM", "ASAM", "SSSAM", "StableSAM", "LookSAM", "AESAM", "AELookSAM", "SparseSAM", "ESAM", "GSAM", "WSAM",
            "GCSAM"]


def manual_step(model, opt, x, y):
    """The README's manual protocol (ESAM: its ascent_pass around the first backward)."""
    ctx = opt.ascent_pass() if hasattr(opt, "ascent_pass") else contextlib.nullcontext()
    with ctx:
        loss_of(model, x, y).backward()
    if opt.wants_sam():
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
    else:
        opt.base_step(zero_grad=True)


def closure_step(model, opt, x, y):
    if isinstance(opt, sk.ESAM):
        opt.zero_grad()
        opt.step(lambda idx=None: loss_of(model, x, y, "none"))
        return
    loss_of(model, x, y).backward()
    opt.step(lambda: loss_of(model, x, y).backward())
    opt.zero_grad()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- 2. step machinery

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("loop", [manual_step, closure_step], ids=["manual", "closure"])
@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
def test_hooks_and_schedulers_see_one_step_per_step(variant, loop, base):
    model, data = model_and_data()
    opt = build(variant, model, base)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    base_seen = []
    opt.base_optimizer.register_step_pre_hook(lambda o, a, k: base_seen.append("pre"))
    opt.base_optimizer.register_step_post_hook(lambda o, a, k: base_seen.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    base_sched = torch.optim.lr_scheduler.MultiplicativeLR(opt.base_optimizer, lambda t: 1.0)  # shares the groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" must not appear
        for x, y in data[:3]:
            loop(model, opt, x, y)
            sched.step()
            base_sched.step()
    assert seen == ["pre", "post"] * 3
    assert base_seen == ["pre", "post"] * 3  # the fused descent replaces base.step(): its hooks still run
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE[base][1]["lr"] * 0.5 ** 3)


# ----------------------------------------------------------------------------- 3. copies

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("mid_step", [False, True], ids=["boundary", "mid_step"])
def test_copies_continue_like_the_original(variant, how, mid_step):
    model, data = model_and_data()
    opt = build(variant, model, "adamw" if variant == "SAM" else "sgd")
    for x, y in data[:2]:
        manual_step(model, opt, x, y)
    x, y = data[2]
    if mid_step:
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
    bundle = (model, opt)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy(bundle)
    else:
        model2, opt2 = pickle.loads(pickle.dumps(bundle))
    for m, o in ((model, opt), (model2, opt2)):
        if mid_step:
            loss_of(m, x, y).backward()
            o.second_step(zero_grad=True)
        for xx, yy in data[3:]:
            manual_step(m, o, xx, yy)
    assert_lists_equal(weights(model2), weights(model), f"{variant} copy")
    assert opt2.step_count == opt.step_count
    assert opt2.param_groups is opt2.base_optimizer.param_groups


def test_midstep_copy_restores_its_own_weights():
    model, data = model_and_data()
    opt = build("SAM", model)
    x, y = data[0]
    w = weights(model)
    loss_of(model, x, y).backward()
    opt.first_step()
    model2, opt2 = copy.deepcopy((model, opt))
    opt2.restore()
    assert_lists_equal(weights(model2), w, "copy restored to w")
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), w))  # the original is still at w + e
    opt.restore()
    assert_lists_equal(weights(model), w)


# ----------------------------------------------------------------------------- 5. errors restore w

@pytest.mark.parametrize("variant", VARIANTS)
def test_error_in_second_step_restores_w(variant, monkeypatch):
    model, data = model_and_data()
    opt = build(variant, model)
    x, y = data[0]
    w = weights(model)
    with (opt.ascent_pass() if hasattr(opt, "ascent_pass") else contextlib.nullcontext()):
        loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()

    def boom(*a, **k):
        raise RuntimeError("injected")
    monkeypatch.setattr(sk.ops, "sgd_restore_step_", boom)
    monkeypatch.setattr(opt.base_optimizer, "step", boom)
    with pytest.raises(RuntimeError, match="injected"):
        opt.second_step()
    assert_lists_equal(weights(model), w, "weights after the error")
    monkeypatch.undo()
    opt.zero_grad()
    manual_step(model, opt, x, y)  # not stuck
    assert opt.step_count == 1


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_model_cast_mid_run_keeps_going_like_torch(base):
    """model.double() between steps: state follows the param's dtype as in torch.optim."""
    model, data = model_and_data(dtype=torch.float32)
    ref, _ = model_and_data(dtype=torch.float32)
    opt = build("SAM", model, base)
    cls, kw = BASE[base]
    ref_opt = sk.SAM(ref.parameters(), cls, backend="eager", **kw)
    for x, y in data[:2]:
        manual_step(model, opt, x.float(), y)
        manual_step(ref, ref_opt, x.float(), y)
    model.double()
    ref.double()
    for st in ref_opt.base_optimizer.state.values():  # the oracle: state cast by hand
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                st[k] = v.double()
    for x, y in data[2:]:
        manual_step(model, opt, x.double(), y)
        manual_step(ref, ref_opt, x.double(), y)
    for a, b in zip(weights(model), weights(ref)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # two fp32 steps: cpp vs eager rounding
    assert all(v.dtype == torch.float64 for st in opt.base_optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def test_model_cast_between_first_and_second_step_restores():
    model, data = model_and_data(dtype=torch.float32)
    opt = build("SAM", model)
    x, y = data[0]
    w = weights(model)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    model.double()
    loss_of(model, x.double(), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)  # the backups are fp32, the params fp64: cast (exact), then step
    ref = [a.double() - 0.1 * g for a, g in zip(w, grads)]  # SGD's first step: buf = g
    for a, b in zip(weights(model), ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- 6, 7, 8. param groups

def test_duplicate_params_rejected():
    model, _ = model_and_data()
    p = list(model.parameters())
    with pytest.raises(ValueError, match="appears twice, in the same param group"):
        sk.SAM([p[0], p[1], p[0]], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="appears twice, in param groups 0 and 1"):
        sk.SAM([{"params": [p[0]]}, {"params": [p[0], p[1]]}], torch.optim.SGD, lr=0.1)
    opt = sk.SAM([p[0]], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [p[1], p[0]]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("key,value,error", [
    ("rho", -1.0, ValueError), ("rho", float("nan"), ValueError), ("rho", float("inf"), ValueError),
    ("rho", "0.05", TypeError), ("eta", -1.0, ValueError), ("eta", float("inf"), ValueError),
    ("adaptive", 1, TypeError), ("rho", True, TypeError),
])
@pytest.mark.parametrize("where", ["top", "group", "add_param_group", "load_state_dict"])
def test_hyperparameters_checked_everywhere(key, value, error, where):
    model, _ = model_and_data()
    p = list(model.parameters())
    if where == "top":
        with pytest.raises(error, match=key):
            sk.SAM(p, torch.optim.SGD, lr=0.1, **{key: value})
        return
    if where == "group":
        with pytest.raises(error, match=f"param group 1: {key}"):
            sk.SAM([{"params": p[:2]}, {"params": p[2:], key: value}], torch.optim.SGD, lr=0.1)
        return
    opt = sk.SAM([{"params": p[:2]}], torch.optim.SGD, lr=0.1)
    if where == "add_param_group":
        with pytest.raises(error, match=f"param group 1: {key}"):
            opt.add_param_group({"params": p[2:], key: value})
        assert len(opt.param_groups) == 1
        return
    sd = opt.state_dict()
    sd["param_groups"][0][key] = value
    with pytest.raises(error, match=f"param group 0: {key}"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0][key] == opt.defaults[key]


def test_group_added_to_base_optimizer_works():
    model, data = model_and_data()
    p = list(model.parameters())
    opt = sk.SAM(p[:2], torch.optim.SGD, lr=0.1, rho=0.1)
    opt.base_optimizer.add_param_group({"params": p[2:], "lr": 0.05})
    x, y = data[0]
    manual_step(model, opt, x, y)
    assert opt.param_groups[1]["rho"] == 0.1 and opt.param_groups[1]["adaptive"] is False
    bad = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt.base_optimizer.add_param_group({"params": [bad], "rho": -2.0})
    loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match="param group 2: rho"):
        opt.first_step()
    assert opt.step_state.perturbed is None


def test_old_state_dict_without_new_keys_loads_with_defaults():
    model, data = model_and_data()
    opt = build("SAM", model)
    manual_step(model, opt, *data[0])
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["eta"]  # saved before eta existed
    opt2 = build("SAM", model)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["eta"] == opt2.defaults["eta"]
    manual_step(model, opt2, *data[1])


@pytest.mark.parametrize("variant", ["SAM", "SparseSAM", "ESAM"])
def test_state_dict_hooks_see_the_whole_dict(variant):
    model, data = model_and_data()
    opt = build(variant, model)
    manual_step(model, opt, *data[0])
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(save=set(sd)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.update(load=set(sd)))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert {"sam", "base_optimizer", "state", "param_groups"} <= seen["save"] == seen["load"] == set(sd)


# ----------------------------------------------------------------------------- 9. step(closure) first

@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "ESAM"])
def test_step_with_closure_and_no_gradients_runs_the_first_pass(variant):
    """How Lightning, skorch and accelerate call closure optimizers: no backward before step()."""
    m1, data = model_and_data()
    m2, _ = model_and_data()
    o1, o2 = build(variant, m1), build(variant, m2)
    for x, y in data:
        def closure(m=m1, x=x, y=y):
            loss = loss_of(m, x, y)
            loss.backward()
            return loss
        o1.zero_grad(set_to_none=True)
        o1.step(closure)
        manual_step(m2, o2, x, y)
    assert_lists_equal(weights(m1), weights(m2), variant)


# ----------------------------------------------------------------------------- 12. no-gradient steps

@pytest.mark.parametrize("variant", VARIANTS)
def test_step_without_gradients_is_a_no_op(variant):
    model, _ = model_and_data()
    opt = build(variant, model)
    w = weights(model)
    for _ in range(3):  # LookSAM: SAM step, reuse step, SAM step
        if opt.wants_sam():
            opt.first_step()
            opt.second_step()
        else:
            opt.base_step()
    assert_lists_equal(weights(model), w)
    assert opt.step_count == 3


def test_esam_draw_selecting_no_tensor():
    """Per-tensor SWP can select nothing ((1 - beta)^#tensors): the manual loop must not crash."""
    model, data = model_and_data()
    opt = sk.ESAM(model.parameters(), torch.optim.SGD, beta=1e-9, seed=0, lr=0.1)
    w = weights(model)
    x, y = data[0]
    with opt.ascent_pass():
        loss_of(model, x, y).backward()
    assert opt.selected() == []
    opt.first_step(zero_grad=True)
    assert_lists_equal(weights(model), w)  # e = 0
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), w))
