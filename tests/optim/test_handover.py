"""``second_step(zero_grad=True)`` hands the gradients over (:mod:`sam_kernels.optim.handover`): the
fused SGD descent with the in-pass finite check writes the new momentum over g(w + e) and the
gradient tensors become the ``momentum_buffer`` entries; no spare buffers. Only gradients nothing
else can see are taken: a tensor the caller still holds, a view, a shared storage, a gradient in an
autograd graph or a step post hook keeps them (and their values). Expected values: plain torch (a SAM step by hand around
``torch.optim.SGD``) and the same run with the gradients kept."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from sam_kernels.optim.finite import SPARE_KEY
from sam_kernels.optim import base_step, handover
from tests.optim.test_finite_in_pass import SGD, batch, make_model, torch_sam_run

BACKENDS = ["eager", "cpp"]
LR, RHO = 0.1, 0.05
MOMENTUM, WD = SGD["momentum"]["momentum"], SGD["momentum"]["weight_decay"]  # torch_sam_run's "momentum" run


def make_opt(model, backend):
    return sk.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, weight_decay=WD, rho=RHO,
                  backend=backend)


def second_backward(model, opt, seed):
    x, y = batch(seed)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()


def momenta(opt, model):
    return [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_become_the_buffers_and_the_run_is_unchanged(backend):
    """From the second step on every g(w + e) tensor is the new momentum buffer (its memory, its
    values), no spare is kept, and the run equals the one that keeps the gradients (bitwise) and a
    SAM step by hand around torch.optim.SGD (fp32 rounding of the norm)."""
    model, kept_model = make_model(), make_model()
    opt, kept = make_opt(model, backend), make_opt(kept_model, backend)
    for s in range(5):
        second_backward(model, opt, s)
        ptrs = [p.grad.data_ptr() for p in model.parameters()]
        opt.second_step(zero_grad=True)
        if s > 0:  # a first step makes its buffers
            assert [b.data_ptr() for b in momenta(opt, model)] == ptrs
        assert all(p.grad is None for p in model.parameters())
        assert not any(SPARE_KEY in opt.state[p] for p in model.parameters())
        second_backward(kept_model, kept, s)
        kept.second_step()
        kept.zero_grad()
    for p, q in zip(model.parameters(), kept_model.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(momenta(opt, model), momenta(kept, kept_model)):
        assert torch.equal(a, b)
    hand_model, hand_base = torch_sam_run(5, "momentum", rho=RHO)
    for p, q in zip(model.parameters(), hand_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    for p, b in zip(hand_model.parameters(), momenta(opt, model)):
        torch.testing.assert_close(b, hand_base.state[p]["momentum_buffer"], atol=1e-5, rtol=1e-4)


def _held(model):
    """The caller keeps a reference to the first gradient."""
    return {"held": next(model.parameters()).grad}


def _view(model):
    """The first gradient is a view (at offset 0) of a larger tensor the caller keeps."""
    p = next(model.parameters())
    flat = torch.zeros(p.numel() + 7)
    flat[:p.numel()].copy_(p.grad.view(-1))
    p.grad = flat[:p.numel()].view_as(p)
    return {"flat": flat}


def _shared_storage(model):
    """The first gradient's storage is also used by another tensor (no view relation)."""
    p = next(model.parameters())
    other = torch.empty(0).set_(p.grad.untyped_storage(), 0, p.grad.shape, p.grad.stride())
    return {"other": other}


def _post_hook(model_opt):
    model, opt = model_opt
    seen = []
    opt.base_optimizer.register_step_post_hook(lambda o, args, kwargs: seen.append(
        [p.grad.clone() for p in model.parameters()]))
    return {"seen": seen}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["held", "view", "shared-storage", "post-hook"])
def test_gradients_others_can_see_are_not_taken(backend, case):
    """A gradient the caller can still see keeps its values (g(w + e)); the step is the same."""
    model, ref_model = make_model(), make_model()
    opt, ref = make_opt(model, backend), make_opt(ref_model, backend)
    for s in range(2):
        for m, o in ((model, opt), (ref_model, ref)):
            second_backward(m, o, s)
            o.second_step(zero_grad=True)
    second_backward(model, opt, 2)
    grads = [p.grad.clone() for p in model.parameters()]
    keep = {"held": _held, "view": _view, "shared-storage": _shared_storage,
            "post-hook": lambda m: _post_hook((m, opt))}[case](model)
    opt.second_step(zero_grad=True)
    if case == "post-hook":
        assert all(torch.equal(a, b) for a, b in zip(keep["seen"][0], grads)), "the hook saw g(w + e)"
    else:
        (seen,) = keep.values()  # what the caller can still read
        assert torch.equal(seen.reshape(-1)[:grads[0].numel()], grads[0].reshape(-1)), "it must still be g(w + e)"
        buf = opt.base_optimizer.state[next(model.parameters())]["momentum_buffer"]
        assert buf.untyped_storage().data_ptr() != seen.untyped_storage().data_ptr()
    second_backward(ref_model, ref, 2)
    ref.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(momenta(opt, model), momenta(ref, ref_model)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", [0, -1], ids=["first-param", "last-param"])
def test_fault_leaves_no_gradient_holding_momentum(backend, where):
    """A NaN found in the pass: weights at w and the momentum buffers bitwise as before; every
    gradient the descent took is None (its memory holds momentum values now), every other one is
    g(w + e) as given. The next step runs as the run that kept its gradients."""
    model = make_model()
    opt = make_opt(model, backend)
    for s in range(2):
        second_backward(model, opt, s)
        opt.second_step(zero_grad=True)
    twin_model = copy.deepcopy(model)
    twin = make_opt(twin_model, backend)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in momenta(opt, model)]
    second_backward(model, opt, 2)
    list(model.parameters())[where].grad.view(-1)[-1] = float("nan")
    given = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="second_step.*NaN or Inf"):
        opt.second_step(zero_grad=True)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(a, b) for a, b in zip(momenta(opt, model), buffers))
    taken = 0
    for p, g in zip(model.parameters(), given):
        if p.grad is None:
            taken += 1
        else:
            torch.testing.assert_close(p.grad, g, atol=0, rtol=0, equal_nan=True)
    assert taken == len(given)  # the pass sees the NaN after writing every buffer: all were taken
    opt.zero_grad()
    for m, o in ((model, opt), (twin_model, twin)):
        second_backward(m, o, 3)
        o.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_then_handed_over_drops_the_spares(backend):
    """Spares made while the gradients were kept are freed once they are handed over, and made
    again when kept once more; the state_dict never holds them."""
    model = make_model()
    opt = make_opt(model, backend)
    for s, hand in enumerate([False, False, True, False]):
        second_backward(model, opt, s)
        opt.second_step(zero_grad=hand)
        opt.zero_grad()
        spares = [SPARE_KEY in opt.state[p] for p in model.parameters()]
        assert all(spares) if (s > 0 and not hand) else not any(spares), (s, hand)
        assert not any(SPARE_KEY in st for st in opt.state_dict()["state"].values())


def test_the_request_lasts_one_call():
    """zero_grad=True is host bookkeeping: the flag is cleared after each call, so a later call
    (base_step, a step() that does not zero) never takes gradients."""
    model = make_model()
    opt = make_opt(model, "cpp")
    second_backward(model, opt, 0)
    opt.second_step(zero_grad=True)
    assert opt.step_state.zero_grad is False
    second_backward(model, opt, 1)
    opt.second_step()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_gradients_keep_their_spares(backend, monkeypatch):
    """Below ``MIN_NUMEL`` elements a gradient is not looked at (the look costs more than the spare's
    write); at or above it, it is handed over."""
    monkeypatch.undo()
    monkeypatch.setattr(base_step, "IN_PASS_MIN_MEAN_NUMEL", 0)  # the check in the pass whatever the mean
    torch.manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(128, 128)), torch.nn.Parameter(torch.randn(127, 129))
    assert big.numel() >= handover.MIN_NUMEL > small.numel()
    opt = sk.SAM([big, small], torch.optim.SGD, lr=LR, momentum=MOMENTUM, backend=backend)
    for s in range(3):
        for p in (big, small):
            p.grad = torch.randn_like(p)
        opt.first_step(zero_grad=True)
        for p in (big, small):
            p.grad = torch.randn_like(p)
        ptrs = {p: p.grad.data_ptr() for p in (big, small)}
        opt.second_step(zero_grad=True)
    state = opt.base_optimizer.state
    assert state[big]["momentum_buffer"].data_ptr() == ptrs[big] and SPARE_KEY not in opt.state[big]
    assert state[small]["momentum_buffer"].data_ptr() != ptrs[small] and SPARE_KEY in opt.state[small]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_a_create_graph_backward_are_not_taken(backend):
    """A gradient that is part of an autograd graph (``backward(create_graph=True)``) keeps its values."""
    model, ref_model = make_model(), make_model()
    opt, ref = make_opt(model, backend), make_opt(ref_model, backend)
    for s in range(3):
        for m, o, graph in ((model, opt, True), (ref_model, ref, False)):
            x, y = batch(s)
            F.cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward(create_graph=graph)
            if graph:
                assert all(p.grad.requires_grad for p in m.parameters())
                ptrs = [p.grad.data_ptr() for p in m.parameters()]
            o.second_step(zero_grad=True)
        assert not any(b.data_ptr() in ptrs for b in momenta(opt, model))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
