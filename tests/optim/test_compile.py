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
