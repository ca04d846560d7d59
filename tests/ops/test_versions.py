"""Every in-place op bumps the version counters of the tensors it writes, on every backend.

Without it a backward through a graph that saved a weight before ``first_step`` runs silently
on the new values (gradients that are neither g(w) nor g(w + e)); with it autograd raises.
"""
from __future__ import annotations

import pytest
import torch

import sam_kernels as sk
from tests.ops.opinfo import ALL, backend_param, require
from tests.utils import require_backend


def lists(device, n=3, shape=(4, 5)):
    return [torch.randn(shape, device=device) for _ in range(n)]


# op -> (call(run, device) -> the call, the lists it must write, the lists it must not; run(op, *args, **kw))
def _perturb(b, d):
    p, g, bk = lists(d), lists(d), lists(d)
    return lambda: b("perturb_", p, g, bk, 0.05), [p, bk], [g]


def _perturb_telemetry(b, d):
    p, g, bk, copies, sq = lists(d), lists(d), lists(d), lists(d), torch.zeros((), device=d)
    return (lambda: b("perturb_", p, g, bk, 0.05, perturbation_sq=sq, grad_copies=copies),
            [p, bk, copies, [sq]], [g])


def _restore(b, d):
    p, bk = lists(d), lists(d)
    return lambda: b("restore_", p, bk), [p], [bk]


def _sgd(b, d):
    p, bk, g, buf = lists(d), lists(d), lists(d), lists(d)
    return lambda: b("sgd_restore_step_", p, bk, g, buf, lr=0.1, momentum=0.9), [p, buf], [bk, g]


def _adamw(b, d):
    p, bk, g, m, v = lists(d), lists(d), lists(d), lists(d), [x.abs() for x in lists(d)]
    return lambda: b("adamw_restore_step_", p, bk, g, m, v, 2, lr=1e-3), [p, m, v], [bk, g]


def _renormalize(b, d):
    g = lists(d)
    return lambda: b("renormalize_", g, torch.tensor(2.0, device=d)), [g], []


def _fisher(b, d):
    f, g = lists(d), lists(d)
    return lambda: b("fisher_accumulate_", f, g), [f], [g]


def _store(b, d):
    gv, g, gs = lists(d), lists(d), lists(d)
    return lambda: b("looksam_store_", gv, g, gs), [gv], [g, gs]


def _apply(b, d):
    g, gv = lists(d), lists(d)
    return lambda: b("looksam_apply_", g, gv, 0.7), [g], [gv]


def _mix(b, d):
    g, o = lists(d), lists(d)
    return lambda: b("mix_", g, o, 1.3, -0.4), [g], [o]


def _ema(b, d):
    m, g, dirs = lists(d), lists(d), lists(d)
    return lambda: b("ema_update_", m, g, weight=0.4, sigma=1.0, directions=dirs), [m, dirs], [g]


def _centralize(b, d):
    g = lists(d)
    return lambda: b("centralize_", g), [g], []


OPS = {"centralize_": _centralize, "ema_update_": _ema, "perturb_": _perturb, "perturb_telemetry": _perturb_telemetry, "restore_": _restore, "sgd_restore_step_": _sgd, "adamw_restore_step_": _adamw,
       "renormalize_": _renormalize, "fisher_accumulate_": _fisher, "looksam_store_": _store,
       "looksam_apply_": _apply, "mix_": _mix}


@backend_param(ALL)
@pytest.mark.parametrize("op", list(OPS))
def test_written_tensors_bump_versions(backend, op):
    device = require(backend).device
    call, written, read = OPS[op](lambda name, *args, **kwargs: backend.call(name, args, kwargs), device)
    before_w = [[t._version for t in lst] for lst in written]
    before_r = [[t._version for t in lst] for lst in read]
    call()
    for lst, vs in zip(written, before_w):
        assert all(t._version > v for t, v in zip(lst, vs)), f"{op} on {backend.id}: a written tensor kept its version"
    for lst, vs in zip(read, before_r):
        assert [t._version for t in lst] == vs, f"{op} on {backend.id}: a read-only tensor was bumped"


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
