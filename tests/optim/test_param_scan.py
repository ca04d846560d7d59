"""One look per step call at every param (:mod:`sam_kernels.optim.param_scan`, ``_C.scan`` and
``_C.numel_sum`` in csrc/host.cpp): the C pass and the Python fallback give what plain attribute
reads give, a cast or a move shows in the signature, and the kept (group, param) entries follow
any change of the param groups. Expected values: plain torch attribute reads, and SGD steps by hand
(w - lr·g)."""
from __future__ import annotations

import pytest
import torch

import sam_kernels as sk
from sam_kernels._extension import host_helpers
from sam_kernels.ops import lists
from sam_kernels.optim import param_scan

PATHS = ["python"] + (["c"] if host_helpers() is not None else [])


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(param_scan, "_host", None)
        monkeypatch.setattr(lists, "_host", None)
    return request.param


def _params():
    ps = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
          torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64)), torch.nn.Parameter(torch.randn(7))]
    ps[0].grad = torch.randn(3, 4)
    ps[2].grad = torch.randn(2, 2, dtype=torch.float64)
    ps[3].grad = torch.randn(7).to_sparse()
    return ps


def test_the_scan_reads_what_the_attributes_say(path):
    ps = _params()
    groups = [{"params": ps[:2]}, {"params": ps[2:]}]
    found = param_scan.scan(groups, param_scan.EntryCache())
    assert [e[1] for e in found.entries] == ps and [e[0] for e in found.entries] == [groups[0]] * 2 + [groups[1]] * 2
    assert all(g is p.grad for g, p in zip(found.grads, ps))  # the gradients themselves, None where absent
    assert found.numel == 12 + 5 + 4 + 7
    assert found.missing and found.sparse and found.device == torch.device("cpu")
    ps[1].grad, ps[3].grad = torch.randn(5), torch.randn(7)
    found = param_scan.scan(groups, param_scan.EntryCache())
    assert not found.missing and not found.sparse


def test_the_signature_shows_a_cast_or_a_move(path):
    ps = _params()
    groups = [{"params": ps}]
    cache = param_scan.EntryCache()
    before = param_scan.scan(groups, cache).signature
    assert param_scan.scan(groups, cache).signature == before
    ps[1].data = ps[1].data.double()
    cast = param_scan.scan(groups, cache).signature
    assert cast != before
    ps[1] = torch.nn.Parameter(torch.empty(5, dtype=torch.float64, device="meta"))  # as model.to() does
    found = param_scan.scan([{"params": ps}], cache)
    assert found.signature != cast and found.device is None  # two devices now


def test_subclasses_take_the_python_reads():
    class Tagged(torch.Tensor):
        pass

    ps = _params()
    ps.append(torch.randn(4).as_subclass(Tagged))
    found = param_scan.scan([{"params": ps}], param_scan.EntryCache())
    assert found.numel == 12 + 5 + 4 + 7 + 4 and found.missing and found.grads[4] is None
    assert lists.numel_sum(ps) == 32 and lists.numel_sum(tuple(ps[:2])) == 17


def test_element_counts(path):
    ts = [torch.zeros(3, 5), torch.zeros(0), torch.zeros(2, 3, 4)[:, 1], torch.zeros((), dtype=torch.int64)]
    assert lists.numel_sum(ts) == 15 + 0 + 8 + 1
    assert lists.numel_sum([]) == 0


def _sgd_step(opt, ps, grads):
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.first_step()
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.second_step()


@pytest.mark.parametrize("change", ["move", "swap", "replace_group", "replace_param"])
def test_the_kept_entries_follow_the_groups(path, change):
    """Plain SGD (no momentum): each step is w - lr·g with the lr of the group the param is in now."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(4)]
    opt = sk.SAM([{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.5}], torch.optim.SGD, rho=0.05,
                 backend="cpp" if path == "c" else "eager")
    grads = [torch.randn(4) for _ in ps]
    w0 = [p.detach().clone() for p in ps]
    _sgd_step(opt, ps, grads)
    lrs = [0.1, 0.1, 0.5, 0.5]
    w1 = [w - lr * g for w, lr, g in zip(w0, lrs, grads)]
    for p, w in zip(ps, w1):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)
    g0, g1 = opt.param_groups
    if change == "move":  # [[a, b], [c, d]] -> [[a], [b, c, d]]: same params in the same order
        g1["params"].insert(0, g0["params"].pop())
        lrs = [0.1, 0.5, 0.5, 0.5]
    elif change == "swap":  # [[a, b], [c, d]] -> [[a, c], [b, d]]: same lengths
        g0["params"][1], g1["params"][0] = g1["params"][0], g0["params"][1]
        lrs = [0.1, 0.5, 0.1, 0.5]
    elif change == "replace_group":  # a new dict in place of the first, same params
        opt.param_groups[0] = dict(g0, lr=0.3)
        lrs = [0.3, 0.3, 0.5, 0.5]
    else:  # a new tensor in place of a param (same length of every group)
        new = torch.nn.Parameter(w1[1].clone())
        g0["params"][1] = new
        ps[1] = new
    _sgd_step(opt, ps, grads)
    for p, w, lr, g in zip(ps, w1, lrs, grads):
        torch.testing.assert_close(p.detach(), w - lr * g, rtol=0, atol=1e-6)
