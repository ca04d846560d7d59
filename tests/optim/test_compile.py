"""torch.compile of the SAM step functions (finite_check=False: its checks are host syncs).

first_step, second_step and base_step trace with fullgraph=True and no graph break (the ops have
fake kernels; the list checks avoid what Dynamo cannot trace), and compiled steps give the eager
results. Inductor compiles slowly on small CPUs: one test uses it, the rest use aot_eager, which
traces the same graphs.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from sam_kernels.optim.descent import Modifier
from torch._dynamo.testing import CompileCounterWithBackend


def setup(variant="SAM", seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    kw = dict(lr=0.1, momentum=0.9, finite_check=False)
    if variant == "SAM":
        opt = sk.SAM(model.parameters(), torch.optim.SGD, **kw)
    elif variant == "ASAM":
        opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, **kw)
    else:
        opt = sk.StableSAM(model.parameters(), torch.optim.SGD, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    return model, opt, data


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("variant", ["SAM", "ASAM", "StableSAM"])
def test_step_functions_have_no_graph_break(variant):
    torch._dynamo.reset()
    sk.backends()  # load the backend modules first (an import is no part of a step)
    model, opt, data = setup(variant)
    x, y = data[0]
    loss_of(model, x, y).backward()
    first = torch._dynamo.explain(opt.first_step)()
    loss_of(model, x, y).backward()
    second = torch._dynamo.explain(opt.second_step)()
    loss_of(model, x, y).backward()
    base = torch._dynamo.explain(opt.base_step)()
    for name, e in (("first_step", first), ("second_step", second), ("base_step", base)):
        assert e.graph_break_count == 0, f"{name}: {[str(b.reason) for b in e.break_reasons]}"
        assert e.graph_count == 1, name


@pytest.mark.parametrize("variant", ["SAM", "ASAM", "StableSAM"])
def test_fullgraph_compiled_steps_equal_eager(variant):
    torch._dynamo.reset()
    model, opt, data = setup(variant)
    ref, ref_opt, _ = setup(variant)
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    second = torch.compile(opt.second_step, fullgraph=True, backend="aot_eager")
    base = torch.compile(opt.base_step, fullgraph=True, backend="aot_eager")
    for t, (x, y) in enumerate(data):
        for m, f1, f2, fb in ((model, first, second, base), (ref, ref_opt.first_step, ref_opt.second_step,
                                                             ref_opt.base_step)):
            loss_of(m, x, y).backward()
            if t == 1:  # a plain step among SAM steps
                fb()
                m.zero_grad()
                continue
            f1()  # zero_grad outside: torch.optim's zero_grad is not traceable (Dynamo skips it)
            m.zero_grad()
            loss_of(m, x, y).backward()
            f2()
            m.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert opt.step_count == ref_opt.step_count == 3


def test_compiled_whole_training_step_equals_eager_inductor():
    """A whole training step (both forward/backward passes and both SAM halves) under torch.compile
    (inductor; the backward calls split the graph, the optimizer halves trace whole)."""
    torch._dynamo.reset()
    model, opt, data = setup()
    ref = copy.deepcopy(model)
    ref_opt = sk.SAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, finite_check=False)

    def train_step(m, o, x, y):
        loss_of(m, x, y).backward()
        o.first_step(zero_grad=True)  # zero_grad breaks the graph here (torch.optim's, not traceable)
        loss = loss_of(m, x, y)
        loss.backward()
        o.second_step(zero_grad=True)
        return loss.detach()

    compiled = torch.compile(train_step)
    for x, y in data:
        la = compiled(model, opt, x, y)
        lb = train_step(ref, ref_opt, x, y)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_step_in_a_fresh_process():
    """The README loop as a new user runs it: nothing has called an op before the compiled first_step
    (a backend imported inside the traced code would break the graph)."""
    import subprocess
    import sys
    code = (
        "import torch, sam_kernels as sk\n"
        "m = torch.nn.Linear(4, 2)\n"
        "opt = sk.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, finite_check=False)\n"
        "first = torch.compile(opt.first_step, fullgraph=True, backend='aot_eager')\n"
        "second = torch.compile(opt.second_step, fullgraph=True, backend='aot_eager')\n"
        "x = torch.randn(3, 4)\n"
        "m(x).square().mean().backward(); first(); opt.zero_grad()\n"
        "m(x).square().mean().backward(); second(); opt.zero_grad()\n"
        "assert opt.step_count == 1\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


class _GraphBreak(Modifier):
    """A descent modifier that breaks the graph (what any untraceable descent code does)."""

    def before_descent(self, sam, params, grads, sam_step, sq_norm):
        torch._dynamo.graph_break()
        return sq_norm


def _hand_sam_sgd(ws, x, y, lr, rho, eps=1e-12):
    """One SAM step around plain SGD on the Linear-Tanh-Linear model, by hand in float64."""
    def grads(v):
        v = [t.detach().double().clone().requires_grad_(True) for t in v]
        w1, b1, w2, b2 = v
        F.cross_entropy(torch.tanh(x.double() @ w1.T + b1) @ w2.T + b2, y).backward()
        return [t.grad for t in v]
    ws = [w.double() for w in ws]
    g1 = grads(ws)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
    g2 = grads([w + rho * g / (norm + eps) for w, g in zip(ws, g1)])
    return [w - lr * g for w, g in zip(ws, g2)]


def _sgd_sam(modifiers=()):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, finite_check=False, modifiers=modifiers)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    return model, opt, x, y


def test_second_step_that_fails_to_compile_leaves_w():
    """A graph break in a fullgraph second_step: the compiled call runs nothing, its shell restores w
    (bitwise) before the error propagates, and the next (eager) step is the right SAM step."""
    from torch._dynamo.exc import Unsupported
    torch._dynamo.reset()
    model, opt, x, y = _sgd_sam([_GraphBreak()])
    w = [p.detach().clone() for p in model.parameters()]
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    second = torch.compile(opt.second_step, fullgraph=True, backend="aot_eager")
    loss_of(model, x, y).backward()
    first(zero_grad=True)
    assert not all(torch.equal(p, v) for p, v in zip(model.parameters(), w))
    loss_of(model, x, y).backward()
    with pytest.raises(Unsupported, match="graph_break"):
        second()
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), w))
    assert opt.step_state.perturbed is None and opt.step_count == 0
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    for p, want in zip(model.parameters(), _hand_sam_sgd(w, x, y, lr=0.1, rho=0.05)):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_second_step_at_the_recompile_limit_leaves_w(monkeypatch):
    """The recompile limit hit by a fullgraph second_step (here 1: its second call recompiles, the
    step counters becoming dynamic) fails the call before it runs; the weights are w again."""
    from torch._dynamo.exc import FailOnRecompileLimitHit
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model, opt, x, y = _sgd_sam()
    second = torch.compile(opt.second_step, fullgraph=True, backend="aot_eager")
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    second(zero_grad=True)
    w = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    with pytest.raises(FailOnRecompileLimitHit):
        second()
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), w))
    assert opt.step_state.perturbed is None and opt.step_count == 1


def test_compiled_zero_grad_runs_in_the_shell():
    """first_step(zero_grad=True) / second_step(zero_grad=True) compiled with fullgraph: the gradients
    are cleared (eagerly, by the shell) and the step is the hand computation's."""
    torch._dynamo.reset()
    model, opt, x, y = _sgd_sam()
    w = [p.detach().clone() for p in model.parameters()]
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    second = torch.compile(opt.second_step, fullgraph=True, backend="aot_eager")
    loss_of(model, x, y).backward()
    first(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())
    loss_of(model, x, y).backward()
    second(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())
    for p, want in zip(model.parameters(), _hand_sam_sgd(w, x, y, lr=0.1, rho=0.05)):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_tensor_lr_in_a_group_compiles_once_per_method():
    """torch's recipe for compiled optimizers with schedulers, lr=torch.tensor(...): a scheduler fills
    the tensor in place, the compiled steps read it as data (and equal the hand computation)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=torch.tensor(0.1), finite_check=False)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    counters = {k: CompileCounterWithBackend("aot_eager") for k in ("first", "second")}
    first = torch.compile(opt.first_step, fullgraph=True, backend=counters["first"])
    second = torch.compile(opt.second_step, fullgraph=True, backend=counters["second"])
    g = torch.Generator().manual_seed(1)
    w = [p.detach().clone() for p in model.parameters()]
    for t in range(6):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss_of(model, x, y).backward()
        first(zero_grad=True)
        loss_of(model, x, y).backward()
        second(zero_grad=True)
        w = _hand_sam_sgd(w, x, y, lr=0.1 * 0.9 ** t, rho=0.05)
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert all(c.frame_count <= 2 for c in counters.values()), {k: c.frame_count for k, c in counters.items()}
    for p, want in zip(model.parameters(), w):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
