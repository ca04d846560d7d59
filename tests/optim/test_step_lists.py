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


# ---------------------------------------------------------------- lists over several groups, rebuilt each step

RHO, MOMENTUM = 0.05, 0.9


def hand_sam_sgd(ws, g1s, g2s, cfgs, bufs):
    """One SAM-SGD step in float64, by hand: e = rho_group·g1/‖g1‖ (the norm over every param with
    a first-pass gradient), then torch.optim.SGD with the second-pass gradient at w (momentum 0.9,
    the buffer is d itself on a param's first step). ``None`` gradients: the param is skipped.
    Returns the perturbed weights, the new weights and the new buffers (lists like ``ws``)."""
    norm = torch.sqrt(sum(g.double().square().sum() for g in g1s if g is not None))
    perturbed, new, new_bufs = [], [], []
    for w, g1, g2, (lr, wd, rho), buf in zip(ws, g1s, g2s, cfgs, bufs):
        w = w.double()
        perturbed.append(w if g1 is None else w + rho * g1.double() / (norm + 1e-12))
        if g2 is None:
            new.append(w)
            new_bufs.append(buf)
            continue
        d = g2.double() + wd * w
        b = d if buf is None else MOMENTUM * buf + d
        new.append(w - lr * b)
        new_bufs.append(b)
    return perturbed, new, new_bufs


def _close(got, want):
    return torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


def _run_checked(opt, params, g1s, g2s, cfgs, bufs):
    """Hand both passes' gradients over, step, compare with :func:`hand_sam_sgd`; the new buffers."""
    ws = [p.detach().clone() for p in params]
    perturbed, new, new_bufs = hand_sam_sgd(ws, g1s, g2s, cfgs, bufs)
    for p, g in zip(params, g1s):
        p.grad = g
    opt.first_step()
    for i, (p, e) in enumerate(zip(params, perturbed)):
        assert _close(p, e), f"param {i} after first_step"
    for p, g in zip(params, g2s):
        p.grad = g
    opt.second_step()
    for i, (p, e) in enumerate(zip(params, new)):
        assert _close(p, e), f"param {i} after second_step"
    for i, (p, b) in enumerate(zip(params, new_bufs)):
        got = opt.base_optimizer.state.get(p, {}).get("momentum_buffer")
        assert (got is None) == (b is None) and (b is None or _close(got, b)), f"buffer {i}"
    return new_bufs


def _skip_unavailable(backend):
    if backend == "cpp" and not sk.backends()["cpp"]["available"]:
        pytest.skip(sk.backends()["cpp"]["reason"])


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_groups_with_gaps_that_move_between_steps_match_hand_maths(backend):
    """Three groups (own lr, weight decay and rho), gradients missing at the start, middle and end
    of groups, a different pattern each step: every step equals the hand-computed one."""
    _skip_unavailable(backend)
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 2), (5,), (1,), (4,), (2, 3), (3,), (2,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    split = [(0, 3, dict(lr=0.1, weight_decay=1e-3)), (3, 6, dict(lr=0.03, weight_decay=0.0, rho=0.2)),
             (6, 8, dict(lr=0.2, weight_decay=5e-4))]
    opt = sk.SAM([{"params": params[a:b], **kw} for a, b, kw in split], torch.optim.SGD, rho=RHO,
                 momentum=MOMENTUM, backend=backend)
    cfgs = [(kw["lr"], kw["weight_decay"], kw.get("rho", RHO)) for a, b, kw in split for _ in range(a, b)]
    bufs = [None] * len(params)
    for missing in ([0, 4, 7], [], [2, 3, 5], [1, 6]):
        g1s = [None if i in missing else torch.randn(s, generator=gen) for i, s in enumerate(shapes)]
        g2s = [None if g is None else torch.randn(g.shape, generator=gen) for g in g1s]
        bufs = _run_checked(opt, params, g1s, g2s, cfgs, bufs)


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_added_group_and_edited_group_list_match_hand_maths(backend):
    """A group added with add_param_group between steps takes part in the next step (its first);
    a param removed from its group's list is no longer stepped, and a group's list replaced by a
    new list object is followed."""
    _skip_unavailable(backend)
    gen = torch.Generator().manual_seed(1)
    a = [torch.randn(4, generator=gen) for _ in range(3)]
    b = [torch.randn(2, 3, generator=gen) for _ in range(2)]
    opt = sk.SAM(a, torch.optim.SGD, rho=RHO, lr=0.1, momentum=MOMENTUM, weight_decay=1e-3, backend=backend)

    def grads(ps):
        return [torch.randn(p.shape, generator=gen) for p in ps], [torch.randn(p.shape, generator=gen) for p in ps]
    g1s, g2s = grads(a)
    bufs = _run_checked(opt, a, g1s, g2s, [(0.1, 1e-3, RHO)] * 3, [None] * 3)
    opt.add_param_group({"params": b, "lr": 0.02, "weight_decay": 0.0})
    g1s, g2s = grads(a + b)
    bufs = _run_checked(opt, a + b, g1s, g2s, [(0.1, 1e-3, RHO)] * 3 + [(0.02, 0.0, RHO)] * 2, bufs + [None] * 2)
    dropped = a[1]
    opt.param_groups[0]["params"] = [a[0], a[2]]  # a new list object, one param shorter
    kept = [a[0], a[2]] + b
    g1s, g2s = grads(kept)
    dropped.grad = torch.randn(dropped.shape, generator=gen)  # a gradient on a param no group holds any more
    w = dropped.detach().clone()
    _run_checked(opt, kept, g1s, g2s, [(0.1, 1e-3, RHO)] * 2 + [(0.02, 0.0, RHO)] * 2, [bufs[0], bufs[2]] + bufs[3:])
    assert torch.equal(dropped, w)


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_grad_made_non_contiguous_between_steps_matches_hand_maths(backend):
    """A gradient in another memory order than its param (a transposed view) in one step, contiguous
    again in the next: each step equals the hand-computed one (that entry runs eagerly, then fused)."""
    _skip_unavailable(backend)
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    opt = sk.SAM(params, torch.optim.SGD, rho=RHO, lr=0.1, momentum=MOMENTUM, weight_decay=1e-3, backend=backend)
    cfgs, bufs = [(0.1, 1e-3, RHO)] * 2, [None, None]
    for transposed in (False, True, False):
        g1s, g2s = ([torch.randn(4, 3, generator=gen).t() if transposed else torch.randn(3, 4, generator=gen),
                     torch.randn(5, generator=gen)] for _ in range(2))
        assert g1s[0].is_contiguous() != transposed
        bufs = _run_checked(opt, params, g1s, g2s, cfgs, bufs)


def test_runs_and_buckets_of_entries_with_gaps():
    """groups.runs/bucket: one run per group whatever params lack a gradient, the key asked once per group."""
    from sam_kernels.optim import groups
    ps = [torch.zeros(1) for _ in range(9)]
    gs = [{"params": ps[0:4], "k": "x"}, {"params": ps[4:5], "k": "y"}, {"params": ps[5:9], "k": "x"}]
    for with_grad in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 4, 5, 6, 7], [0, 3, 8], [4], []):
        for i, p in enumerate(ps):
            p.grad = torch.zeros(1) if i in with_grad else None
        entries = groups.with_grads(gs)
        assert [id(p) for _, p in entries] == [id(ps[i]) for i in with_grad]
        want_runs = []
        for i, (g, _) in enumerate(entries):  # by hand: a new run where the group changes
            if want_runs and want_runs[-1][0] is g:
                want_runs[-1][2] = i + 1
            else:
                want_runs.append([g, i, i + 1])
        assert [list(r) for r in groups.runs(entries)] == want_runs
        asked = []
        buckets = groups.bucket(entries, lambda g: asked.append(g["k"]) or g["k"])
        assert len(asked) == len(want_runs)
        assert buckets == {k: [i for i, (g, _) in enumerate(entries) if g["k"] == k]
                           for k in dict.fromkeys(g["k"] for g, _ in entries)}


def test_param_signature_sees_every_cast_and_move():
    """The per-step look at the params' dtypes and devices tells every cast and move (a param on
    another device, same dtype) from no change, with every param on the CPU or not."""
    from sam_kernels.optim import follow
    ps = [torch.zeros(2), torch.zeros(3, dtype=torch.float64)]
    last = follow.signature(ps)
    assert not follow.changed(last, follow.signature(ps))
    assert not follow.changed(None, last)
    ps[0].data = ps[0].data.double()
    now = follow.signature(ps)
    assert follow.changed(last, now)
    ps[1] = torch.empty(3, dtype=torch.float64, device="meta")  # off the CPU, same dtype
    moved = follow.signature(ps)
    assert follow.changed(now, moved) and not follow.changed(moved, follow.signature(ps))
    ps[0] = torch.empty(2, dtype=torch.float64, device="meta")
    assert follow.changed(moved, follow.signature(ps))
