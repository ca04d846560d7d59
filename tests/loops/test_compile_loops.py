"""torch.compile of the step functions, as the README shows, over 50 steps with the learning rate
changed every step by a scheduler (and rho by hand): the reference in lockstep, and compiles counted.

``finite_check=False`` (its checks are host syncs). Backend ``aot_eager`` (traces the same graphs as
inductor, compiles fast); one case runs inductor. Each body of a step function compiles at most
twice, both in the function's first two steps (state created at the first, counters dynamic at the
second), and never again: a hyperparameter changed by a scheduler, the optimizer's own counters and
the number of ascents of a multi-step ascent must not be guards.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import sam_kernels as sk
from tests.loops.harness import Run
from tests.loops.matrix import cases, refusal
from tests.optim.hand_reference import exp_lr
from tests.optim.variants import variant

STEPS, GAMMA = 50, 0.97
WARMUP = 2  # steps after which a step function may not compile again
# the bodies each public step method runs (sam_kernels.optim.shells): the first ascent of a step and each
# later one of a multi-step ascent have their own; a one-pass step has no shell
BODIES = {"first_step": ("_first_step", "_later_ascent"), "second_step": ("_second_step",),
          "base_step": ("_base_step",), "step": ("_step",)}
RECOMPILE_LIMIT = 4  # above the 2 compiles per function allowed: a run that recompiles every step fails fast


class Counted:
    """A step method compiled with ``fullgraph=True``; ``graphs()`` counts the graphs torch.compile
    keeps for each of its bodies (their cache entries), ``warm`` them at the end of its ``WARMUP``-th
    step (``calls_per_step`` calls a step). (A compile counter would also count the analyses Dynamo
    restarts within one compile.)"""

    def __init__(self, opt, name, compiler, calls_per_step=1):
        self.fn = torch.compile(getattr(opt, name), fullgraph=True, backend=compiler)
        self.codes = [getattr(type(opt), body).__code__ for body in BODIES[name]]
        self.calls, self.warm, self.warm_calls = 0, None, WARMUP * calls_per_step

    def graphs(self) -> list[int]:
        return [len(_debug_get_cache_entry_list(code)) for code in self.codes]

    def __call__(self, *args, **kwargs):
        self.fn(*args, **kwargs)
        self.calls += 1
        if self.calls == self.warm_calls:
            self.warm = self.graphs()


def compiled_run(info, backend, compiler, steps=STEPS, rho_gamma=None):
    """``steps`` compiled steps with ExponentialLR (and, with ``rho_gamma``, rho scaled by it every
    step), the reference in lockstep; each body of a step function compiles at most twice, in the
    function's first two steps. Returns the run and the compiles per function and body."""
    torch._dynamo.reset()
    run = Run(info, backend, dtype=torch.float32, steps=steps, finite_check=False)
    lr0, rho0 = run.opt.param_groups[0]["lr"], run.opt.param_groups[0]["rho"]
    sched = torch.optim.lr_scheduler.ExponentialLR(run.opt, gamma=GAMMA)
    names = ("step",) if info.one_pass else ("first_step", "second_step", "base_step")
    step_with = {name: Counted(run.opt, name, compiler, info.ascent_steps if name == "first_step" else 1)
                 for name in names}
    for t, (x, y) in enumerate(run.data):
        micro = [(x, y)]
        if rho_gamma is not None:
            for group in run.opt.param_groups:
                group["rho"] = rho0 * rho_gamma ** t
            run.ref.rho = rho0 * rho_gamma ** t
        rec = run.manual(micro, step_with=step_with)
        run.ref.lr = exp_lr(lr0, GAMMA, t)
        run.reference_step(rec, micro)
        sched.step()
    run.check(f"after {steps} compiled steps", tol=(1e-5, 1e-4))
    compiles = {name: f.graphs() for name, f in step_with.items()}
    for name, f in step_with.items():
        if f.calls:
            assert f.warm is None or compiles[name] == f.warm, \
                f"{name}: compiles after its first {WARMUP} steps ({f.warm} -> {compiles})"
            assert 1 <= sum(compiles[name]) and max(compiles[name]) <= 2, compiles
        else:
            assert sum(compiles[name]) == 0, compiles
    assert step_with[names[0]].calls > 0
    return run, compiles


# Every row on cpp (the fused ops with their fake kernels); the eager backend's ops trace the same way:
# SAM alone there, to keep the matrix in CI time.
COMPILE_CASES = cases("compile", backends=("cpp",)) + [c for c in cases("compile", backends=("eager",))
                                                       if c.values[0].name == "SAM"]


@pytest.fixture(autouse=True)
def _recompile_limit(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", RECOMPILE_LIMIT)


@pytest.mark.parametrize("info,backend", COMPILE_CASES)
def test_compiled_steps_with_lr_schedule(info, backend):
    compiled_run(info, backend, "aot_eager")


@pytest.mark.parametrize("info,backend", [c for c in cases("compile/inductor") if c.id == "SAM-cpp"])
def test_compiled_steps_inductor(info, backend):
    compiled_run(info, backend, "inductor", steps=12)


@pytest.mark.parametrize("info,backend", [c for c in COMPILE_CASES if c.id in (
    "SAM-cpp", "ASAM-cpp", "StableSAM-cpp", "SparseSAM-structured-cpp", "SAM-AdamW-cpp", "SAM-eager", "WSAM-cpp",
    "BSAM-cpp", "ESAM-cpp", "FriendlySAM-cpp", "VaSSO-cpp")])
def test_compiled_steps_with_rho_schedule(info, backend):
    """rho changed by hand every step (as a rho schedule does) on top of the lr schedule: no recompile."""
    compiled_run(info, backend, "aot_eager", steps=20, rho_gamma=0.95)


@pytest.mark.parametrize("info,backend", cases("compile", backends=("cpp",), refused=True))
def test_compiled_steps_refused(info, backend):
    """A row that refuses fullgraph compiled steps raises its error at the compiled descent, with the
    weights at w (the compiled ascent ran; the failed descent restored them bitwise)."""
    torch._dynamo.reset()
    run = Run(info, backend, dtype=torch.float32, steps=1, finite_check=False)
    w = [p.detach().clone() for p in run.model.parameters()]
    first = torch.compile(run.opt.first_step, fullgraph=True, backend="aot_eager")
    second = torch.compile(run.opt.second_step, fullgraph=True, backend="aot_eager")
    (x, y), = run.data
    run.backward([(x, y)])
    first(zero_grad=True)
    assert any(not torch.equal(p, v) for p, v in zip(run.model.parameters(), w))  # at w + e
    run.backward([(x, y)])
    with refusal(info, "compile"):
        second()
    for p, v in zip(run.model.parameters(), w):
        assert torch.equal(p, v)
    assert run.opt.step_state.perturbed is None and run.opt.step_count == 0


def test_compiled_esam_unfrozen_selection():
    """ESAM with ``freeze=False`` (the default under torch.distributed): every tensor gets its first-pass
    gradient and the unselected ones must still get e = 0 and stay out of the norm, compiled."""
    esam = variant("ESAM")
    compiled_run(dataclasses.replace(esam, factory=functools.partial(esam.factory, freeze=False)), "cpp", "aot_eager")


def test_compiled_esam_element_swp_is_refused_before_any_write():
    """Element SWP's seed changes every step (a new graph each): refused at the compiled first_step, the
    weights and gradients untouched."""
    torch._dynamo.reset()
    esam = variant("ESAM")
    run = Run(dataclasses.replace(esam, factory=functools.partial(esam.factory, swp="element")), "cpp",
              dtype=torch.float32, steps=1, finite_check=False)
    first = torch.compile(run.opt.first_step, fullgraph=True, backend="aot_eager")
    (x, y), = run.data
    run.backward([(x, y)])
    w = [p.detach().clone() for p in run.model.parameters()]
    g = [p.grad.clone() for p in run.model.parameters()]
    with pytest.raises(TypeError, match="swp='element' cannot run under torch.compile"):
        first(zero_grad=True)
    for p, v, gv in zip(run.model.parameters(), w, g):
        assert torch.equal(p, v) and torch.equal(p.grad, gv)
    assert run.opt.step_state.perturbed is None


@pytest.mark.parametrize("compile_first", [False, True])
def test_compiled_momentum_sam_step_with_scheduler_hooks(compile_first):
    """Momentum-SAM's recipe, ``torch.compile(opt.step, fullgraph=True)``, with the scheduler built
    before or after it: compiles only in its first two calls, no scheduler warning (the step marks itself stepped), each step's
    pre and post hooks run once, and lr follows the schedule (w checked against the hand reference by
    the matrix row above)."""
    import warnings
    torch._dynamo.reset()
    run = Run(variant("MomentumSAM"), "cpp", dtype=torch.float32, steps=6, finite_check=False)
    calls = []
    run.opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    run.opt.register_step_post_hook(lambda *_: calls.append("post"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = Counted(run.opt, "step", "aot_eager") if compile_first else None
        sched = torch.optim.lr_scheduler.ExponentialLR(run.opt, gamma=GAMMA)
        step = step or Counted(run.opt, "step", "aot_eager")
        lr0 = run.opt.param_groups[0]["lr"]
        for x, y in run.data:
            run.backward([(x, y)])
            step()
            run.opt.zero_grad()
            sched.step()
    assert calls == ["pre", "post"] * len(run.data)
    assert step.graphs() == step.warm and max(step.warm) <= 2  # the first step holds no perturbation yet, the later ones do
    assert run.opt.param_groups[0]["lr"] == pytest.approx(lr0 * GAMMA ** len(run.data))


def test_compiled_momentum_sam_refusal_leaves_w():
    """Momentum-SAM around a base optimizer without a fused descent (Adam): the compiled step breaks the
    graph; with fullgraph=True it raises TypeError naming the fix, and the model holds w (the weights the
    eager step before it kept as backups), not w̃."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = sk.MomentumSAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=0.1, finite_check=False)
    x = torch.randn(8, 4)
    model(x).square().mean().backward()
    opt.step()  # eager: the model now holds w̃ = w − rho·v/‖v‖
    opt.zero_grad()
    w = [opt.state[p]["backup"].clone() for p in model.parameters()]
    assert not any(torch.equal(p, v) for p, v in zip(model.parameters(), w))
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    model(x).square().mean().backward()
    with pytest.raises(TypeError, match="compiled step with fullgraph=True needs a fused descent"):
        step()
    for p, v in zip(model.parameters(), w):
        assert torch.equal(p, v)
    assert opt.step_state.perturbed is None


def test_compiled_esam_refuses_a_selected_parameter_without_gradient():
    """An unused parameter would add a graph per draw (it has a gradient only when left out): the compiled
    first_step refuses it as soon as the draw selects it, before any weight or gradient changes."""
    import sam_kernels as sk
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    unused = torch.nn.Parameter(torch.randn(5))
    opt = sk.ESAM([*lin.parameters(), unused], torch.optim.SGD, rho=0.1, beta=0.999, seed=0, lr=0.1,
                  finite_check=False)
    first = torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")
    lin(torch.randn(8, 4)).square().mean().backward()
    w = [p.detach().clone() for p in (*lin.parameters(), unused)]
    g = [p.grad.clone() for p in lin.parameters()]
    with pytest.raises(ValueError, match=r"positions \[2\].*got no gradient"):
        first()
    for p, v in zip((*lin.parameters(), unused), w):
        assert torch.equal(p, v)
    for p, gv in zip(lin.parameters(), g):
        assert torch.equal(p.grad, gv)
    assert unused.grad is None and opt.step_state.perturbed is None
