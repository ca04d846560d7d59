"""The finite check taken by the fused SGD descent in its own pass (``finite_check`` True or "fused"
on CPU parameters): no read of g(w + e) of its own; a NaN/Inf gradient raises ``FloatingPointError``
with the weights at w and the optimizer state bitwise as before; otherwise the same run as the
separate pass ("pass"), in torch.optim's state layout, with the spare buffers allocated once and
never saved. Expected values come from plain torch runs and from ``finite_check="pass"``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from sam_kernels import ops
from sam_kernels.optim.finite import SPARE_KEY
from tests.utils import backend_available

BACKENDS = ["eager", "cpp"]
SGD = {
    "momentum": dict(momentum=0.9, weight_decay=5e-4),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening-maximize": dict(momentum=0.8, dampening=0.1, maximize=True),
    "plain": dict(momentum=0.0),
}


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def step(model, opt, seed, bad=None):
    """One SAM step; ``bad``: (param index, value) planted in g(w + e)."""
    x, y = batch(seed)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    if bad is not None:
        i, value = bad
        list(model.parameters())[i].grad.view(-1)[-1] = value
    opt.second_step(zero_grad=True)


def base_states(opt):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.base_optimizer.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


def assert_same_states(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


def descent_ops(opt, model, seed):
    """The ops the second step ran."""
    x, y = batch(seed)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with ops.dispatch.recording() as log:
        opt.second_step(zero_grad=True)
    return [r.op for r in log]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [True, "fused"])
def test_no_read_of_its_own(backend, mode):
    """The descent's pass checks the gradients: no norm of g(w + e) before it ("pass" has one)."""
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, finite_check=mode)
    assert descent_ops(opt, model, 0) == ["sgd_restore_step_"]
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, finite_check="pass")
    assert descent_ops(opt, model, 0) == ["grad_sq_norm", "sgd_restore_step_"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(SGD))
@pytest.mark.parametrize("where", [0, -1], ids=["first-param", "last-param"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("first", [False, True], ids=["later-step", "first-step"])
def test_fault_raises_with_weights_and_state_kept(backend, config, where, value, first):
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend, **SGD[config])
    if not first:
        for s in range(3):
            step(model, opt, s)
    weights = [p.detach().clone() for p in model.parameters()]
    state = base_states(opt)
    with pytest.raises(FloatingPointError, match="second_step.*NaN or Inf"):
        step(model, opt, 7, bad=(where, value))
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w), "weights must be at w"
    assert_same_states(base_states(opt), state)  # first step: no buffer installed at all
    # the next step works and equals a fresh optimizer's "pass" run from the same point
    twin_model = copy.deepcopy(model)
    twin = sk.SAM(twin_model.parameters(), torch.optim.SGD, lr=0.1, backend=backend, finite_check="pass",
                  **SGD[config])
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.zero_grad()
    step(model, opt, 8)
    step(twin_model, twin, 8)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def torch_sam_run(steps: int, config: str, rho: float = 0.05):
    """SAM by hand in plain torch: e = rho·g/‖g‖, then torch.optim.SGD at w with g(w + e)."""
    model = make_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, **SGD[config])
    for s in range(steps):
        x, y = batch(s)
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
        with torch.no_grad():
            w = [p.clone() for p in params]
            for p, gi in zip(params, g):
                p.add_(gi * (rho / (norm + 1e-12)).float())
        g2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g2):
                p.copy_(wi)
                p.grad = gi
        base.step()
    return model, base


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["momentum", "nesterov", "dampening-maximize"])
def test_run_equals_pass_and_torch_layout(backend, config):
    runs = {}
    for mode in (True, "fused", "pass"):
        model = make_model()
        opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend, finite_check=mode, **SGD[config])
        for s in range(6):
            step(model, opt, s)
        runs[mode] = (model, opt)
    ref_model, ref_opt = runs["pass"]
    for mode in (True, "fused"):
        model, opt = runs[mode]
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert torch.equal(p, q), mode
        assert_same_states(base_states(opt), base_states(ref_opt))
    # torch.optim's layout and values (within fp32 rounding of a differently ordered norm)
    hand_model, hand_base = torch_sam_run(6, config)
    model, opt = runs[True]
    sd, hand_sd = opt.base_optimizer.state_dict(), hand_base.state_dict()
    assert sd["state"].keys() == hand_sd["state"].keys()
    for k in sd["state"]:
        assert sd["state"][k].keys() == hand_sd["state"][k].keys() == {"momentum_buffer"}
        torch.testing.assert_close(sd["state"][k]["momentum_buffer"], hand_sd["state"][k]["momentum_buffer"],
                                   atol=1e-5, rtol=1e-4)
    for p, q in zip(model.parameters(), hand_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spares_allocated_once_and_never_saved(backend):
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    pairs = []
    for s in range(5):
        step(model, opt, s)
        pairs.append({p: frozenset((opt.base_optimizer.state[p]["momentum_buffer"].data_ptr(),
                                    opt.state[p][SPARE_KEY].data_ptr())) for p in model.parameters()
                      if SPARE_KEY in opt.state[p]})
        sd = opt.state_dict()
        assert not any(SPARE_KEY in st for st in sd["state"].values())
    assert pairs[0] == {}, "the first step has no old buffer: no spare yet"
    assert len(pairs[1]) == len(list(model.parameters()))
    assert all(pairs[i] == pairs[1] for i in range(2, 5)), "the same two buffers alternate"
    # mid-step too
    x, y = batch(9)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not any(SPARE_KEY in st for st in opt.state_dict()["state"].values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_mid_run_then_continue(backend):
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    for s in range(3):
        step(model, opt, s)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for s in range(3, 6):
        step(model, opt, s)
    other = make_model(seed=1)
    other.load_state_dict(saved_model)
    opt2 = sk.SAM(other.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    opt2.load_state_dict(saved)
    for s in range(3, 6):
        step(other, opt2, s)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert_same_states(base_states(opt2), base_states(opt))
    # and the optimizer itself, reloaded mid-run (its spares may hold the old buffers' memory)
    opt.load_state_dict(copy.deepcopy(opt2.state_dict()))
    step(model, opt, 6)
    step(other, opt2, 6)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("value", ["yes", 1, None, "Pass"])
def test_unknown_mode_rejected(value):
    with pytest.raises(ValueError, match="True, False, 'pass' or 'fused'"):
        sk.SAM(make_model().parameters(), torch.optim.SGD, lr=0.1, finite_check=value)


PASS_KEPT = {
    "adamw": lambda ps, mode: sk.SAM(ps, torch.optim.AdamW, lr=0.01, finite_check=mode),
    "renormalize": lambda ps, mode: sk.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, finite_check=mode,
                                           renormalize=True),
    "triton": lambda ps, mode: sk.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, finite_check=mode,
                                      backend="triton"),
}


@pytest.mark.parametrize("mode", [True, "fused"])
@pytest.mark.parametrize("case", list(PASS_KEPT))
def test_where_the_pass_stays(mode, case):
    """AdamW, descent modifiers and a backend without the in-pass check keep the separate read (and
    still raise with the weights and state kept)."""
    if case == "triton" and not backend_available("triton", "cpu"):
        pytest.skip("triton unavailable on cpu")
    model = make_model()
    opt = PASS_KEPT[case](model.parameters(), mode)
    assert descent_ops(opt, model, 0)[0] == "grad_sq_norm"
    weights = [p.detach().clone() for p in model.parameters()]
    state = base_states(opt)
    with pytest.raises(FloatingPointError):
        step(model, opt, 1, bad=(1, float("nan")))
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    assert_same_states(base_states(opt), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spares_follow_a_cast_of_the_state(backend):
    """A spare unlike its buffer (the model cast to float64 and the base optimizer's state reloaded)
    is made again, not an error."""
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    for s in range(2):
        step(model, opt, s)
    model.double()
    opt.base_optimizer.load_state_dict(opt.base_optimizer.state_dict())  # casts the buffers to float64
    x, y = batch(5)
    F.cross_entropy(model(x.double()), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x.double()), y).backward()
    opt.second_step(zero_grad=True)
    for p in model.parameters():
        assert opt.state[p][SPARE_KEY].dtype == torch.float64
        assert opt.base_optimizer.state[p]["momentum_buffer"].dtype == torch.float64
