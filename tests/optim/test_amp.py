"""SAM under fp16 autocast + torch.amp.GradScaler (CPU here; the same code path on CUDA).

The oracle: the same autocast loop without a scaler. Loss scales are powers of 2, so scaled
gradients are exactly S times the unscaled ones (no overflow, no subnormals in these models), and
the AMP run must follow the unscaled one to fp32 rounding.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from tests.utils import assert_lists_equal

DEV = "cpu"
SCALE = 1024.0


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    return model, data


def loss_of(model, x, y):
    with torch.autocast(DEV, dtype=torch.float16):
        return F.cross_entropy(model(x).float(), y)


def make_opt(kind, model, scaler=None, **kw):
    base = dict(sgd=(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                adamw=(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
                rmsprop=(torch.optim.RMSprop, dict(lr=1e-3)))
    cls, opts = base[kind]
    return sk.SAM(model.parameters(), cls, rho=0.05, grad_scaler=scaler, **opts, **kw)


def closure_loop(model, opt, scaler, data, inject=None):
    """The documented closure loop; ``inject(step, pass_no)`` may corrupt gradients after a backward."""
    for t, (x, y) in enumerate(data):
        scaler.scale(loss_of(model, x, y)).backward()
        if inject:
            inject(t, 1)

        def closure():
            loss = loss_of(model, x, y)
            scaler.scale(loss).backward()
            if inject:
                inject(t, 2)
            return loss
        scaler.step(opt, closure)
        scaler.update()
        opt.zero_grad()


def manual_loop(model, opt, scaler, data, inject=None):
    """The documented manual loop: first_step by hand, scaler.step ends the step."""
    for t, (x, y) in enumerate(data):
        scaler.scale(loss_of(model, x, y)).backward()
        if inject:
            inject(t, 1)
        opt.first_step(zero_grad=True)
        scaler.scale(loss_of(model, x, y)).backward()
        if inject:
            inject(t, 2)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def plain_loop(model, opt, data):
    for x, y in data:
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def close(a, b, tol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "rmsprop"])
@pytest.mark.parametrize("loop", [closure_loop, manual_loop], ids=["closure", "manual"])
def test_amp_equals_unscaled(kind, loop):
    m1, data = model_and_data()
    m2, _ = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    loop(m1, make_opt(kind, m1, scaler), scaler, data)
    plain_loop(m2, make_opt(kind, m2), data)
    close(weights(m1), weights(m2))
    assert scaler.get_scale() == SCALE  # no overflow: no backoff


def test_amp_differs_when_descent_is_not_unscaled():
    """The failure the issue found: the second pass applied still scaled. A run that forgets to
    unscale (no grad_scaler given, loss scaled by hand) ends far from the unscaled run."""
    m1, data = model_and_data()
    m2, _ = model_and_data()
    opt = make_opt("sgd", m1)
    for x, y in data:
        (loss_of(m1, x, y) * SCALE).backward()
        opt.first_step(zero_grad=True)
        (loss_of(m1, x, y) * SCALE).backward()
        opt.second_step(zero_grad=True)
    plain_loop(m2, make_opt("sgd", m2), data)
    assert max((a - b).abs().max().item() for a, b in zip(weights(m1), weights(m2))) > 1e-2


def injector(step, pass_no, model):
    def inject(t, p):
        if t == step and p == pass_no:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = float("inf")
    return inject


@pytest.mark.parametrize("kind", ["sgd", "adamw", "rmsprop"])
@pytest.mark.parametrize("loop", [closure_loop, manual_loop], ids=["closure", "manual"])
@pytest.mark.parametrize("pass_no", [1, 2])
def test_overflow_skips_the_whole_step(kind, loop, pass_no):
    m, data = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    opt = make_opt(kind, m, scaler)
    loop(m, opt, scaler, data[:1])  # one normal step: state exists
    w = weights(m)
    state = {k: v.clone() for st in opt.base_optimizer.state.values() for k, v in st.items()
             if isinstance(v, torch.Tensor)}
    state_before = [(k, v.clone()) for st in opt.base_optimizer.state.values() for k, v in st.items()]
    loop(m, opt, scaler, data[1:2], inject=injector(0, pass_no, m))
    assert_lists_equal(weights(m), w, "weights after the skipped step")
    state_after = [(k, v) for st in opt.base_optimizer.state.values() for k, v in st.items()]
    assert [k for k, _ in state_after] == [k for k, _ in state_before]
    assert_lists_equal([v for _, v in state_after], [v for _, v in state_before], "base state after the skip")
    assert state  # the base state really existed
    assert scaler.get_scale() == SCALE / 2  # the scaler backed off
    loop(m, opt, scaler, data[2:3])  # the next step proceeds
    assert any(not torch.equal(a, b) for a, b in zip(weights(m), w))
    assert not opt.step_state.perturbed and opt.step_state.found is None


@pytest.mark.parametrize("variant", ["sssam", "stable", "looksam", "aesam"])
def test_variants_under_amp_equal_unscaled(variant):
    def build(model, scaler):
        kw = dict(lr=0.1, momentum=0.9, grad_scaler=scaler)
        params = model.parameters()
        if variant == "sssam":
            return sk.SSSAM(params, torch.optim.SGD, p=0.5, seed=3, **kw)
        if variant == "stable":
            return sk.StableSAM(params, torch.optim.SGD, **kw)
        if variant == "looksam":
            return sk.LookSAM(params, torch.optim.SGD, k=2, **kw)
        return sk.AESAM(params, torch.optim.SGD, total_steps=8, **kw)

    def run(model, data, scaler):
        opt = build(model, scaler)
        for x, y in data * 2:
            loss = loss_of(model, x, y)
            (scaler.scale(loss) if scaler else loss).backward()
            if opt.wants_sam():
                opt.first_step(zero_grad=True)
                loss = loss_of(model, x, y)
                (scaler.scale(loss) if scaler else loss).backward()
                scaler.step(opt) if scaler else opt.second_step()
            else:
                scaler.step(opt) if scaler else opt.base_step()
            if scaler:
                scaler.update()
            opt.zero_grad()
        return opt

    m1, data = model_and_data()
    m2, _ = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    o1 = run(m1, data, scaler)
    o2 = run(m2, data, None)
    close(weights(m1), weights(m2), 1e-5)
    assert o1.step_count == o2.step_count == 8


def test_scaler_step_without_attached_scaler_raises_before_any_change():
    m, data = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    opt = make_opt("sgd", m)  # no grad_scaler=
    x, y = data[0]
    scaler.scale(loss_of(m, x, y)).backward()
    w = weights(m)
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler.step(opt, lambda: scaler.scale(loss_of(m, x, y)).backward())
    assert_lists_equal(weights(m), w)
    assert opt.step_state.perturbed is None


def test_scaler_step_without_closure_or_first_step_shows_the_loop():
    m, data = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    opt = make_opt("sgd", m, scaler)
    x, y = data[0]
    scaler.scale(loss_of(m, x, y)).backward()
    w = weights(m)
    with pytest.raises(ValueError, match="scaler.step\\(opt, closure\\)"):
        scaler.step(opt)
    assert_lists_equal(weights(m), w)


def test_unscale_for_clipping_in_manual_loop():
    """scaler.unscale_(opt) before scaler.step (to clip the descent gradient) is honoured."""
    m1, data = model_and_data()
    m2, _ = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    opt1, opt2 = make_opt("sgd", m1, scaler), make_opt("sgd", m2)
    for x, y in data:
        scaler.scale(loss_of(m1, x, y)).backward()
        opt1.first_step(zero_grad=True)
        scaler.scale(loss_of(m1, x, y)).backward()
        scaler.unscale_(opt1)
        torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.5)
        scaler.step(opt1)
        scaler.update()
        opt1.zero_grad()
        loss_of(m2, x, y).backward()
        opt2.first_step(zero_grad=True)
        loss_of(m2, x, y).backward()
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
        opt2.second_step(zero_grad=True)
    close(weights(m1), weights(m2))


def test_amp_step_has_no_host_sync(monkeypatch):
    """Count host reads of tensors (item, bool, tolist, cpu, float, int) during the AMP step."""
    m, data = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    opt = make_opt("sgd", m, scaler)
    closure_loop(m, opt, scaler, data[:1])  # warm up (state creation)
    calls = []
    for name in ("item", "__bool__", "tolist", "cpu", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _orig=original, **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    x, y = data[1]
    scaler.scale(loss_of(m, x, y)).backward()
    scaler.step(opt, lambda: scaler.scale(loss_of(m, x, y)).backward())
    scaler.update()
    monkeypatch.undo()
    assert calls == []


def test_disabled_scaler_is_plain_sam():
    m1, data = model_and_data()
    m2, _ = model_and_data()
    scaler = torch.amp.GradScaler(DEV, enabled=False)
    closure_loop(m1, make_opt("sgd", m1, scaler), scaler, data)
    plain_loop(m2, make_opt("sgd", m2), data)
    close(weights(m1), weights(m2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_of_the_amp_step():
    """The whole fp16 AMP SAM step (both backwards, first_step, scaler.step, scaler.update) captured
    in a CUDA graph and replayed equals the same steps run eagerly: nothing in it reads the device."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).cuda()
    model_ref = copy.deepcopy(model)
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")

    def make(m):
        scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)
        return sk.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, grad_scaler=scaler), scaler
    (opt, scaler), (opt_ref, scaler_ref) = make(model), make(model_ref)

    def step(m, o, s):
        o.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(m(x), y)
        s.scale(loss).backward()
        o.first_step()
        o.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(m(x), y)
        s.scale(loss).backward()
        s.step(o)
        s.update()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(model, opt, scaler)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(model_ref, opt_ref, scaler_ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt, scaler)
    for _ in range(3):
        graph.replay()
        step(model_ref, opt_ref, scaler_ref)
    torch.cuda.synchronize()
    for p, r in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert scaler._scale.item() == scaler_ref._scale.item()


def test_manual_loop_without_scaler_step():
    """first_step / second_step by hand, then scaler.update(): SAM records its overflow flag for the
    scaler itself (update() needs one), and the result is the unscaled run's."""
    m1, data = model_and_data()
    m2, _ = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    opt = make_opt("sgd", m1, scaler)
    for t, (x, y) in enumerate(data):
        scaler.scale(loss_of(m1, x, y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(loss_of(m1, x, y)).backward()
        if t == 3:
            with torch.no_grad():
                m1[0].weight.grad[0, 0] = float("nan")
        opt.second_step(zero_grad=True)
        scaler.update()
    plain_loop(m2, make_opt("sgd", m2), data[:3])
    close(weights(m1), weights(m2))  # the 4th step was skipped
    assert scaler.get_scale() == SCALE / 2


def test_closure_as_keyword_is_refused_by_torch_before_anything():
    """GradScaler itself refuses scaler.step(opt, closure=...) before calling the optimizer; the
    closure goes positionally (README)."""
    m, data = model_and_data()
    scaler = torch.amp.GradScaler(DEV, init_scale=SCALE)
    opt = make_opt("sgd", m, scaler)
    x, y = data[0]
    scaler.scale(loss_of(m, x, y)).backward()
    w = weights(m)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: scaler.scale(loss_of(m, x, y)).backward())
    assert_lists_equal(weights(m), w)
