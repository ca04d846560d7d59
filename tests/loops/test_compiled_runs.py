"""Compiled step functions over long runs (issue input 1 and its class): README's compile recipe
(``finite_check=False``, ``torch.compile(opt.first_step, fullgraph=True)``, same for ``second_step``
and ``base_step``) runs any number of steps with a bounded number of compiles.

Each function compiles at most twice, both times in its first two calls (the backups are created at
the first ascent; the host step counters become dynamic at the second call), and never again: a
compile counter per function (``torch._dynamo.testing.CompileCounterWithBackend``) is read after
each function's second call and at the end of 52 steps. The weights must equal the eager run of the same optimizer
(and, for SAM, a float64 hand computation in plain torch; the compiled steps run float32, the
dtype the ops trace for). aot_eager traces the same graphs as
inductor; one inductor run checks the generated code.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import sam_kernels as sk

STEPS = 52
WARMUP = 2  # calls of a step function after which it may not compile again
LR, MOMENTUM, RHO, EPS = 0.1, 0.9, 0.05, 1e-12


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _data(dtype, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(steps)]


def _make(name, params, steps=STEPS):
    kw = dict(lr=LR, momentum=MOMENTUM, finite_check=False)
    return {
        "SAM": lambda: sk.SAM(params, torch.optim.SGD, rho=RHO, **kw),
        "ASAM": lambda: sk.SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, **kw),
        "StableSAM": lambda: sk.StableSAM(params, torch.optim.SGD, rho=RHO, **kw),
        "SSSAM": lambda: sk.SSSAM(params, torch.optim.SGD, rho=RHO, p=0.5, seed=3, **kw),
        "LookSAM": lambda: sk.LookSAM(params, torch.optim.SGD, rho=RHO, k=3, **kw),
        "AESAM": lambda: sk.AESAM(params, torch.optim.SGD, rho=RHO, total_steps=steps, **kw),
        "AELookSAM": lambda: sk.AELookSAM(params, torch.optim.SGD, rho=RHO, total_steps=steps, **kw),
    }[name]()


def _run(name, dtype, compile_backend=None, steps=STEPS):
    """The README loop (the policy asked eagerly, the step functions compiled); returns the weights
    and, when compiled, the compile counts per function after the warm-up and at the end."""
    model = _model(dtype)
    opt = _make(name, model.parameters(), steps)
    fns = {"first_step": opt.first_step, "second_step": opt.second_step, "base_step": opt.base_step}
    counters, after_warmup = {}, {}
    if compile_backend is not None:
        counters = {k: CompileCounterWithBackend(compile_backend) for k in fns}
        fns = {k: _counted(k, torch.compile(f, fullgraph=True, backend=counters[k]), counters[k], after_warmup)
               for k, f in fns.items()}
    for x, y in _data(dtype, steps):
        F.cross_entropy(model(x), y).backward()
        if opt.wants_sam():
            fns["first_step"]()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            fns["second_step"]()
        else:
            fns["base_step"]()
        opt.zero_grad()
    assert opt.step_count == steps
    return [p.detach() for p in model.parameters()], after_warmup, {k: c.frame_count for k, c in counters.items()}


def _counted(name, fn, counter, after_warmup):
    """``fn`` that notes ``counter``'s compiles at the end of its WARMUP-th call in ``after_warmup[name]``."""
    calls = []

    def call():
        fn()
        calls.append(1)
        if len(calls) == WARMUP:
            after_warmup[name] = counter.frame_count
    return call


def _hand_sam(dtype, steps=STEPS):
    """SAM around SGD(momentum) by hand in float64 on the same data."""
    weights = [p.detach().to(torch.float64).clone() for p in _model(dtype).parameters()]

    def grads(ws, x, y):
        ws = [w.detach().clone().requires_grad_(True) for w in ws]
        w1, b1, w2, b2 = ws
        F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y).backward()
        return [w.grad for w in ws]
    bufs = None
    for x, y in _data(dtype, steps):
        x = x.to(torch.float64)
        g1 = grads(weights, x, y)
        norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
        g2 = grads([w + RHO * g / (norm + EPS) for w, g in zip(weights, g1)], x, y)
        bufs = [g.clone() for g in g2] if bufs is None else [MOMENTUM * b + g for b, g in zip(bufs, g2)]
        weights = [w - LR * b for w, b in zip(weights, bufs)]
    return weights


VARIANTS = ["SAM", "ASAM", "StableSAM", "SSSAM", "LookSAM", "AESAM", "AELookSAM"]


@pytest.mark.parametrize("name", VARIANTS)
def test_input_01_compiled_run_of_any_length(name):
    torch._dynamo.reset()
    got, after_warmup, total = _run(name, torch.float32, "aot_eager")
    called = {k: n for k, n in total.items() if n}  # SAM never calls base_step
    assert called == after_warmup, f"recompiled after the warm-up: {after_warmup} -> {total}"
    assert all(n <= 2 for n in total.values()), total
    want, _, _ = _run(name, torch.float32)
    # float32 over 52 momentum steps; compiled plain steps take the fused descent where eager ones take
    # torch's SGD (another summation order), so they agree to rounding, not bitwise
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_input_01_compiled_sam_equals_the_hand_computation():
    torch._dynamo.reset()
    got, _, total = _run("SAM", torch.float32, "aot_eager")
    assert total["first_step"] == 2 and total["second_step"] == 2 and total["base_step"] == 0
    for a, b in zip(got, _hand_sam(torch.float32)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_input_01_inductor():
    torch._dynamo.reset()
    got, after_warmup, total = _run("SAM", torch.float32, "inductor")
    assert total["base_step"] == 0 and after_warmup == {"first_step": 2, "second_step": 2} == {
        k: total[k] for k in after_warmup}, (after_warmup, total)
    for a, b in zip(got, _hand_sam(torch.float32)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_input_01_step_functions_have_their_own_compile_caches():
    """The body each public step method's shell calls (what torch.compile compiles) has a code object
    of its own (torch.compile's cache and recompile budget are per code object), named after it."""
    opt = _make("SAM", _model(torch.float32).parameters())
    codes = {name: getattr(type(opt), name).__code__
             for name in ("_first_step", "_later_ascent", "_second_step", "_base_step", "restore")}
    assert len({id(c) for c in codes.values()}) == len(codes)
    assert all(c.co_name == name for name, c in codes.items())


def test_input_01_counters_after_a_compiled_run():
    """The host counters of stats() count every compiled step (they are read back after the trace)."""
    torch._dynamo.reset()
    model = _model(torch.float32)
    opt = _make("SSSAM", model.parameters())
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    second = torch.compile(opt.second_step, fullgraph=True, backend="aot_eager")
    base = torch.compile(opt.base_step, fullgraph=True, backend="aot_eager")
    sam_steps = 0
    for x, y in _data(torch.float32, 12):
        F.cross_entropy(model(x), y).backward()
        if opt.wants_sam():
            sam_steps += 1
            first()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            second()
        else:
            base()
        opt.zero_grad()
    stats = opt.stats()
    assert 0 < sam_steps < 12
    assert (stats["steps"], stats["sam_steps"]) == (12.0, float(sam_steps))
    assert stats["forward_passes"] == stats["backward_passes"] == 12.0 + sam_steps
    assert opt.step_count == 12
