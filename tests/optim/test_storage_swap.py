"""The ascent into the backups with a trade of storages (sam_kernels/optim/storage_swap.py): the
weights of each step against SAM-SGD by hand in float64; when a param trades (CPU by default, each
param the only tensor over its memory, 16K elements or more on average) and when it keeps its
memory (a view, a .detach(), a state_dict tensor held; small params; swap_storages=False); the
weights at w after an error in the ascent; an autograd graph that saved a param sees the trade."""
from __future__ import annotations

import pytest
import torch

from sam_kernels.optim import SAM, storage_swap

RHO, LR, MOMENTUM, WD = 0.05, 0.1, 0.9, 5e-4
SHAPES = [(160, 128), (128,), (256, 128)]  # 20,480 + 128 + 32,768 elements: 17,792 on average


def _params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def _by_hand(w0, steps):
    """SAM-SGD (momentum, weight decay) in float64: per step, (w + e, w after the step)."""
    w = [x.double() for x in w0]
    bufs, out = None, []
    for g, gs in steps:
        norm = torch.sqrt(sum(x.double().square().sum() for x in g))
        perturbed = [wi + RHO * gi.double() / (norm + 1e-12) for wi, gi in zip(w, g)]
        d = [gi.double() + WD * wi for wi, gi in zip(w, gs)]
        bufs = d if bufs is None else [MOMENTUM * b + di for b, di in zip(bufs, d)]
        w = [wi - LR * b for wi, b in zip(w, bufs)]
        out.append((perturbed, w))
    return out


def _run(params, steps, check=None, **kw):
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD, **kw)
    moved, seen = [], []
    for g, gs in steps:
        for p, x in zip(params, g):
            p.grad = x.clone()
        before = [p.data_ptr() for p in params]
        opt.first_step(zero_grad=True)
        moved.append([p.data_ptr() != b for p, b in zip(params, before)])
        seen.append([p.detach().clone() for p in params])
        if check is not None:
            check(opt, params)
        for p, x in zip(params, gs):
            p.grad = x.clone()
        opt.second_step(zero_grad=True)
        seen[-1] = (seen[-1], [p.detach().clone() for p in params])
    return opt, moved, seen


def _steps(shapes=SHAPES, n=3):
    return [(_grads(shapes, 10 + 2 * i), _grads(shapes, 11 + 2 * i)) for i in range(n)]


def _assert_close_lists(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}[{i}]: {m}")


def test_default_trades_on_cpu_and_steps_as_by_hand():
    params, steps = _params(), _steps()
    w0 = [p.detach().clone() for p in params]
    _, moved, seen = _run(params, steps)
    assert all(all(m) for m in moved), "every param took its backup's memory in first_step"
    for k, ((perturbed, after), (want_p, want_w)) in enumerate(zip(seen, _by_hand(w0, steps))):
        _assert_close_lists(perturbed, want_p, f"step {k}: w + e")
        _assert_close_lists(after, want_w, f"step {k}: weights after the step")


def test_trade_is_bitwise_the_in_place_ascent():
    steps = _steps()
    traded, kept = _params(), _params()
    opt_t, moved_t, seen_t = _run(traded, steps)
    opt_k, moved_k, seen_k = _run(kept, steps, swap_storages=False)
    assert all(all(m) for m in moved_t) and not any(any(m) for m in moved_k)
    for (pt, at), (pk, ak) in zip(seen_t, seen_k):
        for a, b in zip(pt + at, pk + ak):
            assert torch.equal(a, b)
    for p, q in zip(traded, kept):  # the state between steps too: backups at w, the same momentum
        assert torch.equal(opt_t.state[p]["backup"], opt_k.state[q]["backup"])
        assert torch.equal(opt_t.base_optimizer.state[p]["momentum_buffer"],
                           opt_k.base_optimizer.state[q]["momentum_buffer"])


def test_between_the_halves_the_backups_hold_w():
    params, steps = _params(), _steps(n=1)
    w0 = [p.detach().clone() for p in params]

    def check(opt, ps):
        for p, w in zip(ps, w0):
            assert torch.equal(opt.state[p]["backup"], w)
            assert opt.state[p]["backup"].data_ptr() != p.data_ptr()
    _run(params, steps, check=check)


@pytest.mark.parametrize("holder", ["view", "detach", "state_dict"])
def test_a_param_whose_memory_is_held_keeps_it(holder):
    """Every param keeps its memory while one of them is seen through another tensor, and that
    tensor sees the weights of the step (by hand)."""
    params, steps = _params(), _steps()
    w0 = [p.detach().clone() for p in params]
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", p)
    held = {"view": lambda: params[0][1:], "detach": lambda: params[0].detach(),
            "state_dict": lambda: module.state_dict()["p0"]}[holder]()
    _, moved, seen = _run(params, steps)
    assert not any(any(m) for m in moved)
    want = _by_hand(w0, steps)
    _assert_close_lists([held.reshape(-1)], [want[-1][1][0][1:].reshape(-1) if holder == "view"
                                             else want[-1][1][0].reshape(-1)], "the held tensor")


def test_trades_again_once_the_memory_is_let_go():
    params, steps = _params(), _steps(n=2)
    held = params[2].detach()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    ptrs = []
    for i, (g, gs) in enumerate(steps):
        if i == 1:
            del held
        for p, x in zip(params, g):
            p.grad = x.clone()
        before = params[2].data_ptr()
        opt.first_step(zero_grad=True)
        ptrs.append(params[2].data_ptr() != before)
        for p, x in zip(params, gs):
            p.grad = x.clone()
        opt.second_step(zero_grad=True)
    assert ptrs == [False, True]


@pytest.mark.parametrize("option,shapes,trades", [
    (False, SHAPES, False),
    (True, SHAPES, True),
    (None, [(64,)] * 8, False),   # 64 elements on average: the host work would cost more than the bytes
    (True, [(64,)] * 8, False),
])
def test_when_it_trades(option, shapes, trades):
    params = _params(shapes)
    _, moved, _ = _run(params, _steps(shapes, n=1), swap_storages=option)
    assert all(moved[0]) if trades else not any(moved[0])


def test_bad_option_raises():
    with pytest.raises(TypeError, match="swap_storages"):
        SAM(_params(), torch.optim.SGD, lr=LR, swap_storages="yes")


def test_error_in_the_ascent_leaves_w_and_the_memory(monkeypatch):
    """Two buckets (two rhos): the second launch fails after the first wrote its backups; the
    weights are w, bitwise, in their own memory."""
    params = _params()
    opt = SAM([{"params": params[:2]}, {"params": params[2:], "rho": 0.1}], torch.optim.SGD, rho=RHO, lr=LR,
              momentum=MOMENTUM)
    w0 = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    from sam_kernels import ops
    real, calls = ops.perturb_, []

    def failing(*a, **k):
        calls.append(k.get("into_backups"))
        if len(calls) == 2:
            raise RuntimeError("launch failed")
        return real(*a, **k)
    monkeypatch.setattr(ops, "perturb_", failing)
    for p, g in zip(params, _grads(SHAPES, 3)):
        p.grad = g
    with pytest.raises(RuntimeError, match="launch failed"):
        opt.first_step()
    assert calls == [True, True]
    for p, w, ptr in zip(params, w0, ptrs):
        assert torch.equal(p, w) and p.data_ptr() == ptr


def test_a_graph_that_saved_a_param_sees_the_trade():
    """A backward through a graph built before first_step raises, as after an in-place write."""
    params = _params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR)
    loss = (params[0] * params[0]).sum() + params[1].sum() + params[2].sum()  # mul saves the param itself
    loss.backward(retain_graph=True)
    before = params[0].data_ptr()
    opt.first_step(zero_grad=True)
    assert params[0].data_ptr() != before, "traded"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_python_fallback_gives_the_same_steps(monkeypatch):
    steps = _steps()
    _, moved_c, seen_c = _run(_params(), steps)
    monkeypatch.setattr(storage_swap, "_C_TRADEABLE", None)
    monkeypatch.setattr(storage_swap, "_C_SWAP", None)
    _, moved_py, seen_py = _run(_params(), steps)
    assert moved_c == moved_py and all(all(m) for m in moved_py)
    for (pc, ac), (pp, ap) in zip(seen_c, seen_py):
        for a, b in zip(pc + ac, pp + ap):
            assert torch.equal(a, b)


def test_tradeable_rules():
    p = torch.nn.Parameter(torch.randn(4, 5))
    b = torch.empty_like(p)
    assert storage_swap.tradeable([p], [b])
    assert not storage_swap.tradeable([p], [torch.empty(5, 4).t()]), "other strides"
    assert not storage_swap.tradeable([p], [torch.empty(4, 5, dtype=torch.float64)]), "other dtype"
    assert not storage_swap.tradeable([p], [p]), "itself"
    assert not storage_swap.tradeable([p[1:]], [torch.empty(3, 5)]), "a view"
    shared = b.view(20)
    assert not storage_swap.tradeable([p], [b]), "a backup seen through a view"
    del shared
    assert storage_swap.tradeable([p], [b])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_trades_only_when_asked_without_host_sync():
    """CUDA params: the default keeps each param's memory; swap_storages=True trades, with no host
    sync in the step, and gives the same weights bitwise."""
    results = {}
    for option in (None, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256).cuda()  # 65,536 + 256 elements: 32,896 on average
        x = torch.randn(8, 256, device="cuda")
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, swap_storages=option)
        moved = []
        for _ in range(3):
            model(x).square().sum().backward()
            before = model.weight.data_ptr()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.first_step(zero_grad=True)
                model(x).square().sum().backward()
                opt.second_step(zero_grad=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            moved.append(model.weight.data_ptr() != before)
        assert moved == [option is True] * 3
        results[option] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(results[None], results[True]))
