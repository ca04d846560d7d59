"""The finite check without a read of the flag in the step: the device-side skip and the error raised
at the next step, as it runs for GPU parameters (forced here on CPU tensors with
``step_state.finite.deferred = True``). Expected weights and states come from plain torch runs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from sam_kernels.optim.finite import FiniteCheck


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def states(opt):
    """Every tensor (and number) of the base optimizer's state, copied."""
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.base_optimizer.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


def same_states(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(
        torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x) for x, y in zip(a, b))


BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
         "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=1e-2)),
         "adam": (torch.optim.Adam, dict(lr=0.01))}  # no fused descent: the generic path


def build(model, base):
    cls, kw = BASES[base]
    opt = sk.SAM(model.parameters(), cls, rho=0.05, **kw)
    opt.step_state.finite.deferred = True
    return opt


def sam_step(model, opt, x, y, bad=None, where=None):
    loss_of(model, x, y).backward()
    if where == "first":
        model[2].weight.grad[0, 1] = bad
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    if where == "second":
        model[0].bias.grad[2] = bad
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["first", "second"])
def test_skipped_on_the_device_and_raised_at_the_next_step(base, bad, where):
    model = make_model()
    opt = build(model, base)
    sam_step(model, opt, *batch(1))  # a good step first: the state exists and must not move
    weights = [p.detach().clone() for p in model.parameters()]
    before = states(opt)
    sam_step(model, opt, *batch(2), bad=bad, where=where)  # no error inside the step
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)), "the skipped step moved the weights"
    assert same_states(states(opt), before), "the skipped step changed the optimizer state"
    assert opt.step_state.perturbed is None
    x, y = batch(3)
    loss_of(model, x, y).backward()
    with pytest.raises(FloatingPointError, match="NaN or Inf.*optimizer step 1"):
        opt.first_step()  # the next step's first call raises, having done nothing
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert same_states(states(opt), before)
    # raised once: calling again takes the step, as a fresh run from the same weights and state does
    ref_model = make_model()
    ref_model.load_state_dict(model.state_dict())
    ref = build(ref_model, base)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    loss_of(ref_model, x, y).backward()
    opt.first_step(zero_grad=True)
    ref.first_step(zero_grad=True)
    for m, o in ((model, opt), (ref_model, ref)):
        loss_of(m, x, y).backward()
        o.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_good_steps_equal_the_immediate_check():
    """Without NaNs the deferred check changes no value: the same weights as the in-call check."""
    a, b = make_model(), make_model()
    oa, ob = build(a, "sgd"), sk.SAM(b.parameters(), torch.optim.SGD, rho=0.05, **BASES["sgd"][1])
    for t in range(3):
        sam_step(a, oa, *batch(t))
        sam_step(b, ob, *batch(t))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_plain_step_skipped_and_raised_by_check_finite():
    model = make_model()
    opt = sk.SSSAM(model.parameters(), torch.optim.SGD, p=0.0, seed=0, lr=0.1, momentum=0.9)
    opt.step_state.finite.deferred = True
    loss_of(model, *batch(1)).backward()
    opt.base_step(zero_grad=True)
    weights = [p.detach().clone() for p in model.parameters()]
    before = states(opt)
    loss_of(model, *batch(2)).backward()
    assert not opt.wants_sam()
    model[0].weight.grad[0, 0] = float("nan")
    opt.base_step(zero_grad=True)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert same_states(states(opt), before)
    with pytest.raises(FloatingPointError, match="optimizer step 1"):
        opt.check_finite()
    opt.check_finite()  # once only


def test_stats_and_step_closure_raise_it():
    model = make_model()
    opt = build(model, "sgd")
    x, y = batch(1)
    sam_step(model, opt, x, y, bad=float("nan"), where="second")
    with pytest.raises(FloatingPointError, match="optimizer step 0"):
        opt.stats()
    sam_step(model, opt, x, y, bad=float("nan"), where="first")
    ran = []

    def closure():
        ran.append(1)
        loss = loss_of(model, x, y)
        loss.backward()
        return loss
    with pytest.raises(FloatingPointError, match="optimizer step 1"):
        opt.step(closure)
    assert not ran, "the closure ran before the deferred error was raised"
    opt.zero_grad()
    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_looksam_keeps_its_state_on_a_skipped_step():
    model = make_model()
    opt = sk.LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.1)
    opt.step_state.finite.deferred = True
    sam_step(model, opt, *batch(1))
    kept = [opt.state[p]["looksam_gv"].clone() for p in model.parameters()]
    sam_step(model, opt, *batch(2), bad=float("nan"), where="second")
    assert all(torch.equal(opt.state[p]["looksam_gv"], v) for p, v in zip(model.parameters(), kept))
    with pytest.raises(FloatingPointError):
        opt.check_finite()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bad", [None, float("nan")])
def test_cuda_default_step_has_no_sync_and_skips_on_the_device(bad):
    """SGD momentum at default settings (finite_check=True): no host sync in first_step/second_step,
    a NaN skips the step on the device and is raised at the next first_step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).cuda()
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for i in range(3):
        loss_of(model, x, y).backward()
        if i == 2:
            weights = [p.detach().clone() for p in model.parameters()]
            bufs = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            if i == 2 and bad is not None:
                model[0].bias.grad[3] = bad
            opt.second_step(zero_grad=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    moved = not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert moved == (bad is None)
    if bad is not None:
        assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], b)
                   for p, b in zip(model.parameters(), bufs))
        loss_of(model, x, y).backward()
        with pytest.raises(FloatingPointError, match="optimizer step 2"):
            opt.first_step()


class _Event:
    """Stands for the CUDA event of a flag's copy: done once ``done`` is set; counts waits."""

    def __init__(self):
        self.done, self.waited = False, 0

    def query(self):
        return self.done

    def synchronize(self):
        self.waited += 1
        self.done = True


def test_flags_of_steps_the_device_has_not_finished_wait_in_order():
    """The device may be several steps behind: a flag whose copy has not finished is not read (no
    wait), a later step's flag does not replace it, and each skipped step raises once, oldest first."""
    check = FiniteCheck()
    events = [_Event() for _ in range(3)]
    for step, (flag, event) in enumerate(zip((1.0, 0.0, 1.0), events)):
        check._pending.append((torch.tensor(flag), event, step))
    check.surface()  # nothing has arrived: no error, no wait
    assert len(check._pending) == 3 and not any(e.waited for e in events)
    events[1].done = True
    check.surface()  # step 0's flag is still on its way: step 1's waits behind it
    assert len(check._pending) == 3
    events[0].done = True
    with pytest.raises(FloatingPointError, match="optimizer step 0"):
        check.surface()
    check.surface()  # step 1 was fine; step 2 not arrived
    assert [p[2] for p in check._pending] == [2]
    with pytest.raises(FloatingPointError, match="optimizer step 2"):
        check.surface(wait=True)
    assert events[2].waited == 1 and not check._pending
