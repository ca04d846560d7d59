"""Every in-place op bumps the version counters of the tensors it writes, on every backend.

Without it a backward through a graph that saved a weight before ``first_step`` runs silently
on the new values (gradients that are neither g(w) nor g(w + e)); with it autograd raises.
"""
from __future__ import annotations

import pytest
import torch

import sam_kernels as sk
import sam_kernels.ops as ops
from tests.ops.test_backends import CASE_IDS, CASES
from tests.utils import require_backend


@pytest.fixture(params=[("eager", "cpu"), *CASES], ids=["eager-cpu", *CASE_IDS])
def case(request):
    backend, device = request.param
    if backend != "eager":
        require_backend(backend, device)
    return backend, device


def lists(device, n=3, shape=(4, 5)):
    return [torch.randn(shape, device=device) for _ in range(n)]


# op -> (call(backend, device) -> the lists it must have written)
def _perturb(b, d):
    p, g, bk = lists(d), lists(d), lists(d)
    return lambda: ops.perturb_(p, g, bk, 0.05, backend=b), [p, bk], [g]


def _restore(b, d):
    p, bk = lists(d), lists(d)
    return lambda: ops.restore_(p, bk, backend=b), [p], [bk]


def _sgd(b, d):
    p, bk, g, buf = lists(d), lists(d), lists(d), lists(d)
    return lambda: ops.sgd_restore_step_(p, bk, g, buf, lr=0.1, momentum=0.9, backend=b), [p, buf], [bk, g]


def _adamw(b, d):
    p, bk, g, m, v = lists(d), lists(d), lists(d), lists(d), [x.abs() for x in lists(d)]
    return lambda: ops.adamw_restore_step_(p, bk, g, m, v, 2, lr=1e-3, backend=b), [p, m, v], [bk, g]


def _renormalize(b, d):
    g = lists(d)
    return lambda: ops.renormalize_(g, torch.tensor(2.0, device=d), backend=b), [g], []


def _fisher(b, d):
    f, g = lists(d), lists(d)
    return lambda: ops.fisher_accumulate_(f, g, backend=b), [f], [g]


def _store(b, d):
    gv, g, gs = lists(d), lists(d), lists(d)
    return lambda: ops.looksam_store_(gv, g, gs, backend=b), [gv], [g, gs]


def _apply(b, d):
    g, gv = lists(d), lists(d)
    return lambda: ops.looksam_apply_(g, gv, 0.7, backend=b), [g], [gv]


OPS = {"perturb_": _perturb, "restore_": _restore, "sgd_restore_step_": _sgd, "adamw_restore_step_": _adamw,
       "renormalize_": _renormalize, "fisher_accumulate_": _fisher, "looksam_store_": _store,
       "looksam_apply_": _apply}


@pytest.mark.parametrize("op", list(OPS))
def test_written_tensors_bump_versions(case, op):
    backend, device = case
    call, written, read = OPS[op](backend, device)
    before_w = [[t._version for t in lst] for lst in written]
    before_r = [[t._version for t in lst] for lst in read]
    call()
    for lst, vs in zip(written, before_w):
        assert all(t._version > v for t, v in zip(lst, vs)), f"{op} on {backend}: a written tensor kept its version"
    for lst, vs in zip(read, before_r):
        assert [t._version for t in lst] == vs, f"{op} on {backend}: a read-only tensor was bumped"


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_backward_through_stale_graph_raises(backend):
    """The issue's failure: a graph built before first_step, backpropagated after it."""
    if backend != "eager":
        require_backend(backend, "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = sk.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    x = torch.randn(5, 4)
    model(x).square().mean().backward()
    stale = model(x).square().mean()  # saves the weights at w
    opt.first_step(zero_grad=True)    # writes them
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()
    opt.restore()
