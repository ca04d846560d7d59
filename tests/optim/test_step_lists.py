"""What the step keeps from one step to the next (the backward watch's param scan, the lists of the
fused descent) follows changes made between steps: a param replaced in its group, resized, re-cast,
a gradient set to None, a frozen param unfrozen. After each, a warm optimizer's next step equals
that of a fresh optimizer loaded with its state dict (the fresh one has nothing to reuse)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g).to(dtype), torch.randint(0, 3, (6,), generator=g)


def build(params, backend):
    return sk.SAM(params, torch.optim.SGD, rho=0.05, backend=backend, lr=0.1, momentum=0.9, weight_decay=1e-3)


def sam_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def resize(model, opt):
    """The last layer grows from 3 to 4 outputs (new storage, new shape); its state is dropped."""
    lin = model[2]
    for p in lin.parameters():
        opt.base_optimizer.state.pop(p, None)
        opt.state.pop(p, None)
    with torch.no_grad():
        lin.weight.data = torch.cat([lin.weight.data, torch.ones(1, 7)])
        lin.bias.data = torch.cat([lin.bias.data, torch.zeros(1)])
    lin.out_features = 4


def replace(model, opt):
    """A new Parameter takes the first layer's weight's place, in the model and in its group."""
    old = model[0].weight
    new = torch.nn.Parameter(old.detach() * 0.5)
    model[0].weight = new
    params = opt.param_groups[0]["params"]
    params[[i for i, p in enumerate(params) if p is old][0]] = new
    opt.base_optimizer.state.pop(old, None)
    opt.state.pop(old, None)


def recast(model, opt):
    model.double()


def freeze_then_unfreeze(model, opt):
    model[0].bias.requires_grad_(False)


CHANGES = {"resize": resize, "replace": replace, "recast": recast, "freeze": freeze_then_unfreeze}


@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_between_steps_equals_a_fresh_optimizer(change, backend):
    if backend == "cpp" and not sk.backends()["cpp"]["available"]:
        pytest.skip(sk.backends()["cpp"]["reason"])
    model = make_model()
    opt = build(model.parameters(), backend)
    for t in range(2):
        sam_step(model, opt, *batch(t))
    CHANGES[change](model, opt)
    dtype = next(model.parameters()).dtype
    for t in (2, 3):  # the first step after the change, and the one after it (unfrozen again for "freeze")
        ref_model = copy.deepcopy(model)
        ref = build([{"params": [p for p in ref_model.parameters()]}], backend)
        ref.load_state_dict(copy.deepcopy(opt.state_dict()))
        x, y = batch(t, dtype)
        sam_step(model, opt, x, y)
        sam_step(ref_model, ref, x, y)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert p.dtype == q.dtype and torch.equal(p, q), f"{name} after step {t}"
        for p, q in zip(model.parameters(), ref_model.parameters()):
            a, b = opt.base_optimizer.state.get(p, {}), ref.base_optimizer.state.get(q, {})
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        model[0].bias.requires_grad_(True)


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_grad_set_to_none_between_and_within_steps(backend):
    """A param without a gradient is neither perturbed nor updated; one whose gradient is dropped
    between the passes is restored to w and not updated (the lists are rebuilt, not reused)."""
    if backend == "cpp" and not sk.backends()["cpp"]["available"]:
        pytest.skip(sk.backends()["cpp"]["reason"])
    model = make_model()
    opt = build(model.parameters(), backend)
    sam_step(model, opt, *batch(0))
    x, y = batch(1)
    # between steps: the first layer's bias gets no gradient this step
    F.cross_entropy(model(x), y).backward()
    model[0].bias.grad = None
    w = model[0].bias.detach().clone()
    buf = opt.base_optimizer.state[model[0].bias]["momentum_buffer"].clone()
    opt.first_step(zero_grad=True)
    assert torch.equal(model[0].bias, w)
    F.cross_entropy(model(x), y).backward()
    # within the step: the last layer's weight loses its g(w + e)
    v = opt.state[model[2].weight]["backup"].clone()
    model[0].bias.grad = None
    model[2].weight.grad = None
    opt.second_step(zero_grad=True)
    assert torch.equal(model[0].bias, w) and torch.equal(model[2].weight, v)
    assert torch.equal(opt.base_optimizer.state[model[0].bias]["momentum_buffer"], buf)
    # the next full step equals a fresh optimizer's
    ref_model = copy.deepcopy(model)
    ref = build(ref_model.parameters(), backend)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    sam_step(model, opt, *batch(2))
    sam_step(ref_model, ref, *batch(2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


def test_a_param_unfrozen_after_construction_is_watched_by_step_closure():
    """step(closure) knows a first pass ran from hooks on the params: one unfrozen after the optimizer
    was built gets its hook at the end of the next step, so a backward that writes only its gradient
    counts (the closure then runs once, for the second pass)."""
    model = make_model()
    a, b = model[0].weight, model[2].weight
    for p in model.parameters():
        p.requires_grad_(p is a)
    opt = build(model.parameters(), "eager")
    x, y = batch(0)

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    calls = []
    F.cross_entropy(model(x), y).backward()
    opt.step(closure)
    assert len(calls) == 1
    a.requires_grad_(False)
    b.requires_grad_(True)
    opt.zero_grad()
    calls.clear()
    F.cross_entropy(model(x), y).backward()  # writes b's gradient only
    opt.step(closure)
    assert len(calls) == 1, "the first pass was not seen: the closure ran for it too"
