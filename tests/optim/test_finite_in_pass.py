"""The finite check taken by the fused SGD descent in its own pass (``finite_check`` True or "fused"):
no read of g(w + e) of its own; a NaN/Inf gradient raises ``FloatingPointError`` with the weights at
w and the optimizer state bitwise as before (in the call on CPU parameters; deferred to the next
step on device memory, forced here with ``step_state.finite.deferred = True``); otherwise the same
run as the separate pass ("pass"), in torch.optim's state layout, with the spare buffers allocated
once and never saved. Expected values come from plain torch runs and from ``finite_check="pass"``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from sam_kernels import ops
from sam_kernels.optim.finite import SPARE_KEY
from sam_kernels.optim import base_step
from tests.utils import backend_available

BACKENDS = ["eager", "cpp"]

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not backend_available("triton", "cpu"),
                                                         reason="triton unavailable on cpu"))
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


def step(model, opt, seed, bad=None, hand_over=True):
    """One SAM step; ``bad``: (param index, value) planted in g(w + e). ``hand_over``: second_step
    (zero_grad=True), whose descent may write the new momentum over the gradients (.handover); else
    second_step() then zero_grad(): the spare buffers."""
    x, y = batch(seed)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    if bad is not None:
        i, value = bad
        list(model.parameters())[i].grad.view(-1)[-1] = value
    try:
        opt.second_step(zero_grad=hand_over)
    finally:
        if not hand_over:
            opt.zero_grad()


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


@pytest.mark.parametrize("backend", [*BACKENDS, TRITON])
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
@pytest.mark.parametrize("hand_over", [True, False], ids=["handed-over", "spares"])
def test_fault_raises_with_weights_and_state_kept(backend, config, where, value, first, hand_over):
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend, **SGD[config])
    if not first:
        for s in range(3):
            step(model, opt, s, hand_over=hand_over)
    weights = [p.detach().clone() for p in model.parameters()]
    state = base_states(opt)
    with pytest.raises(FloatingPointError, match="second_step.*NaN or Inf"):
        step(model, opt, 7, bad=(where, value), hand_over=hand_over)
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
@pytest.mark.parametrize("hand_over", [True, False], ids=["handed-over", "spares"])
def test_run_equals_pass_and_torch_layout(backend, config, hand_over):
    runs = {}
    for mode in (True, "fused", "pass"):
        model = make_model()
        opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend, finite_check=mode, **SGD[config])
        for s in range(6):
            step(model, opt, s, hand_over=hand_over)
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
        step(model, opt, s, hand_over=False)
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
}


@pytest.mark.parametrize("mode", [True, "fused"])
@pytest.mark.parametrize("case", list(PASS_KEPT))
def test_where_the_pass_stays(mode, case):
    """AdamW and descent modifiers keep the separate read (and still raise with the weights and
    state kept)."""
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
        step(model, opt, s, hand_over=False)
    model.double()
    opt.base_optimizer.load_state_dict(opt.base_optimizer.state_dict())  # casts the buffers to float64
    x, y = batch(5)
    F.cross_entropy(model(x.double()), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x.double()), y).backward()
    opt.second_step()  # the gradients kept: spare buffers
    for p in model.parameters():
        assert opt.state[p][SPARE_KEY].dtype == torch.float64
        assert opt.base_optimizer.state[p]["momentum_buffer"].dtype == torch.float64


# --------------------------------------------------------------------------- deferred (device memory)

def deferred_run(backend, mode, config, good_steps, bad=(1, float("nan")), hand_over=True):
    """A deferred-check run: ``good_steps`` steps, then one with ``bad`` planted in g(w + e) (no error
    in it), then the next step (raises at its first call; taken when called again). Returns the
    model, the optimizer, the ops of the faulty step's second_step, and the weights and base state
    before the faulty step and right after it."""
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend, finite_check=mode, **SGD[config])
    opt.step_state.finite.deferred = True
    for s in range(good_steps):
        step(model, opt, s, hand_over=hand_over)
    weights, state = [p.detach().clone() for p in model.parameters()], base_states(opt)
    x, y = batch(7)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    i, value = bad
    list(model.parameters())[i].grad.view(-1)[-1] = value
    with ops.dispatch.recording() as log:
        opt.second_step(zero_grad=hand_over)  # no error inside the step
    if not hand_over:
        opt.zero_grad()
    after = ([p.detach().clone() for p in model.parameters()], base_states(opt))
    x, y = batch(8)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match=f"NaN or Inf.*optimizer step {good_steps}"):
        opt.first_step()  # does nothing else
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), after[0]))
    opt.zero_grad()
    step(model, opt, 8)
    return model, opt, [r.op for r in log], (weights, state), after


@pytest.mark.parametrize("backend", [*BACKENDS, TRITON])
@pytest.mark.parametrize("config", ["momentum", "nesterov", "plain"])
@pytest.mark.parametrize("first", [False, True], ids=["later-step", "first-step"])
@pytest.mark.parametrize("hand_over", [True, False], ids=["handed-over", "spares"])
def test_deferred_fault_undone_on_the_device_and_raised_at_the_next_step(backend, config, first, hand_over):
    """No read of g(w + e); the faulty step leaves the weights at w and the momentum state bitwise as
    before (a first step: zero buffers, as the deferred "pass" run leaves them); the error comes at
    the next step's first call; the run then goes on exactly as the deferred "pass" run."""
    good = 0 if first else 2
    model, opt, descent, before, after = deferred_run(backend, True, config, good, hand_over=hand_over)
    ref_model, ref_opt, ref_descent, ref_before, ref_after = deferred_run(backend, "pass", config, good,
                                                                          hand_over=hand_over)
    assert descent == ["sgd_restore_step_"] and ref_descent == ["grad_sq_norm", "sgd_restore_step_"]
    assert all(torch.equal(p, w) for p, w in zip(after[0], before[0])), "weights must be at w"
    if first:
        assert_same_states(after[1], ref_after[1])
        assert all(not st or torch.equal(st["momentum_buffer"], torch.zeros_like(st["momentum_buffer"]))
                   for st in after[1])
    else:
        assert_same_states(after[1], before[1])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert_same_states(base_states(opt), base_states(ref_opt))


def test_deferred_fault_in_the_first_pass():
    """A NaN in g(w) (deferred): the descent is skipped from the start (found_inf), the in-pass flag
    stays 0, the state is installed unchanged, and the error comes at the next step."""
    model = make_model()
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.step_state.finite.deferred = True
    for s in range(2):
        step(model, opt, s)
    weights, state = [p.detach().clone() for p in model.parameters()], base_states(opt)
    x, y = batch(7)
    F.cross_entropy(model(x), y).backward()
    list(model.parameters())[2].grad.view(-1)[0] = float("inf")
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with ops.dispatch.recording() as log:
        opt.second_step(zero_grad=True)
    assert [r.op for r in log] == ["sgd_restore_step_"]
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert_same_states(base_states(opt), state)
    with pytest.raises(FloatingPointError, match="optimizer step 2"):
        opt.check_finite()


def test_deferred_skipped_step_not_in_telemetry():
    """The skipped step's values are left out of stats() as in the deferred "pass" run (its flag
    reaches the step's skip flag before telemetry records the step); the counters agree."""
    stats = {}
    for mode in (True, "pass"):
        model, opt, *_ = deferred_run("eager", mode, "momentum", 3)
        stats[mode] = opt.stats()
    for key, value in stats["pass"].items():
        if key != "optimizer_bytes":  # "pass" reads g(w + e) once more
            torch.testing.assert_close(torch.tensor(stats[True][key]), torch.tensor(value), atol=0, rtol=1e-5,
                                       equal_nan=True, msg=key)
    assert stats[True]["optimizer_bytes"] < stats["pass"]["optimizer_bytes"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bad", [None, float("nan")])
def test_cuda_default_step_checks_in_the_pass_without_sync(bad):
    """SGD momentum on CUDA at default settings: the descent takes the check in its pass (no
    grad_sq_norm in second_step), no host sync in first_step/second_step; a NaN is undone on the
    device (weights and momentum bitwise as before) and raised at the next first_step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).cuda()
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for i in range(3):
        F.cross_entropy(model(x), y).backward()
        if i == 2:
            weights = [p.detach().clone() for p in model.parameters()]
            bufs = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
            bad_grad = None if bad is None else torch.tensor(bad, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            if i == 2 and bad is not None:
                model[0].bias.grad[3].copy_(bad_grad)
            with ops.dispatch.recording() as log:
                opt.second_step(zero_grad=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert [r.op for r in log] == ["sgd_restore_step_"]
    torch.cuda.synchronize()
    moved = not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert moved == (bad is None)
    if bad is not None:
        assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], b)
                   for p, b in zip(model.parameters(), bufs))
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(FloatingPointError, match="optimizer step 2"):
            opt.first_step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_gradients_keep_the_separate_read(backend, monkeypatch):
    """With ``finite_check=True`` a step whose gradients average fewer than ``IN_PASS_MIN_MEAN_NUMEL``
    elements reads them once more instead (no spares: their bookkeeping would cost more); "fused"
    asks for the pass whatever the size; a large step takes it by default."""
    monkeypatch.undo()
    small = make_model()
    assert sum(p.numel() for p in small.parameters()) < base_step.IN_PASS_MIN_MEAN_NUMEL
    assert descent_ops(sk.SAM(small.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend),
                       small, 0) == ["grad_sq_norm", "sgd_restore_step_"]
    assert descent_ops(sk.SAM(small.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend,
                              finite_check="fused"), small, 1) == ["sgd_restore_step_"]
    torch.manual_seed(0)
    large = torch.nn.Sequential(torch.nn.Linear(6, 16384), torch.nn.Tanh(), torch.nn.Linear(16384, 3))
    assert sum(p.numel() for p in large.parameters()) >= 4 * base_step.IN_PASS_MIN_MEAN_NUMEL
    assert descent_ops(sk.SAM(large.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend),
                       large, 2) == ["sgd_restore_step_"]
