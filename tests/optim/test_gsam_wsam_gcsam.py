"""GSAM, WSAM and SAM(use_gc=True) beyond the loop matrix: their options (GSAM's ASAM form, the rho
schedule, WSAM's gamma), refusals, centralization of conv weights by hand, and a cross-check against
pytorch-optimizer's implementations (optional: skipped when it is not installed)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from tests.loops.harness import Run
from tests.optim.hand_reference import HandSAM, norm
from tests.optim.variants import RHO, SGD, VariantInfo, closure_of, loss_fn, make_batches, make_model

BACKENDS = ("eager", "cpp")


def _row(name, cls, hand, **kw):
    def factory(params, model=None, backend=None, **extra):
        return cls(params, torch.optim.SGD, backend=backend, **{**kw, **SGD, **extra})
    return VariantInfo(name, factory, False, hand)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gsam_adaptive_is_the_official_form(backend):
    """GSAM(adaptive=True): e = rho·w²·g/‖|w|·g‖ (eta 0, as gsam.py), then the surrogate-gap descent."""
    hand = lambda ws: HandSAM(ws, base="sgd", base_kwargs=SGD, rho=0.5, adaptive=True, eta=0.0, gsam_alpha=0.3)
    Run(_row("GSAM-adaptive", sk.GSAM, hand, rho=0.5, alpha=0.3, adaptive=True), backend).train("manual")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gsam_alpha_zero_is_sam(backend):
    """alpha = 0: the descent is g(w + e) itself (a SAM step), by hand."""
    hand = lambda ws: HandSAM(ws, base="sgd", base_kwargs=SGD, rho=RHO)
    Run(_row("GSAM-0", sk.GSAM, hand, rho=RHO, alpha=0.0), backend).train("manual")


@pytest.mark.parametrize("gamma", [0.5, 0.8])
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_gamma(gamma, decouple):
    hand = lambda ws: HandSAM(ws, base="sgd", base_kwargs=SGD, rho=RHO, wsam_gamma=gamma, wsam_decouple=decouple)
    Run(_row("WSAM-g", sk.WSAM, hand, rho=RHO, gamma=gamma, decouple=decouple), "cpp").train("manual")


def test_wsam_coupled_half_is_sam():
    """gamma = 0.5 (a = 1), coupled: the descent is g(w + e), as SAM's."""
    hand = lambda ws: HandSAM(ws, base="sgd", base_kwargs=SGD, rho=RHO)
    Run(_row("WSAM-half", sk.WSAM, hand, rho=RHO, gamma=0.5, decouple=False), "cpp").train("manual")


@pytest.mark.parametrize("gamma", [1.0, -0.1, 1.5])
def test_wsam_gamma_out_of_range(gamma):
    with pytest.raises(ValueError, match="gamma"):
        sk.WSAM(make_model().parameters(), torch.optim.SGD, gamma=gamma, lr=0.1)


@pytest.mark.parametrize("cls", [sk.GSAM, sk.WSAM])
def test_per_replica_mode_refused(cls):
    with pytest.raises(ValueError, match="m-sam"):
        cls(make_model().parameters(), torch.optim.SGD, lr=0.1, distributed="m-sam")


# --------------------------------------------------------------------------- rho schedule

def test_proportional_rho_follows_the_lr_schedule():
    """rho_t = min_rho + (max_rho − min_rho)·(lr_t − min_lr)/(max_lr − min_lr), written into every
    group after each scheduler step; the run matches the hand reference with that rho."""
    model = make_model()
    opt = sk.GSAM([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}],
                  torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1, momentum=0.9, backend="cpp")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)
    rho_sched = sk.ProportionalRho(opt, max_lr=0.1, min_lr=0.01, max_rho=0.08, min_rho=0.02)
    assert all(g["rho"] == pytest.approx(0.08) for g in opt.param_groups)  # set at construction, lr = max_lr
    ref = HandSAM([p.detach() for p in model.parameters()], base="sgd", base_kwargs=SGD, rho=0.08, gsam_alpha=0.4)
    oracle = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    for t, (x, y) in enumerate(make_batches(4)):
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

        def grads(ws):
            leaves = [w.clone().requires_grad_() for w in ws]
            out = torch.func.functional_call(oracle, dict(zip(names, leaves)), (x,))
            return list(torch.autograd.grad(loss_fn(out, y), leaves))
        ref.step(grads(ref.ws), grads, sam=True)
        sched.step()
        rho = rho_sched.step()
        lr = 0.01 + (0.1 - 0.01) * (1 + torch.cos(torch.tensor(torch.pi * (t + 1) / 4, dtype=torch.float64))) / 2
        expected = 0.02 + (0.08 - 0.02) * (float(lr) - 0.01) / (0.1 - 0.01)
        assert rho == pytest.approx(expected, rel=1e-12)
        assert [g["rho"] for g in opt.param_groups] == [rho, rho]
        ref.lr, ref.rho = float(lr), rho
        for p, w in zip(model.parameters(), ref.ws):
            torch.testing.assert_close(p.detach(), w, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kw", [dict(max_lr=0.1, min_lr=0.2, max_rho=0.1, min_rho=0.0),
                                dict(max_lr=0.1, min_lr=0.1, max_rho=0.1, min_rho=0.0),
                                dict(max_lr=0.1, min_lr=0.0, max_rho=0.01, min_rho=0.1)])
def test_proportional_rho_rejects_bad_ranges(kw):
    opt = sk.GSAM(make_model().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="ProportionalRho"):
        sk.ProportionalRho(opt, **kw)
    assert all(g["rho"] == 0.05 for g in opt.param_groups)


# --------------------------------------------------------------------------- centralization

@pytest.mark.parametrize("backend", BACKENDS)
def test_gc_centralizes_conv_filters_by_hand(backend):
    """Conv weight (out, in, kh, kw): each filter minus its mean over (in, kh, kw); the bias untouched;
    e = rho·Φ(g)/‖Φ(g)‖ with the norm of the centralized gradient (the paper's equation)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.1, use_gc=True, lr=0.1, backend=backend)
    loss_fn(model(x), y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    gc = []
    for t in g:
        if t.dim() == 4:
            t = t - t.sum(dim=(1, 2, 3), keepdim=True) / (t.shape[1] * t.shape[2] * t.shape[3])
        elif t.dim() == 2:
            t = t - t.sum(dim=1, keepdim=True) / t.shape[1]
        gc.append(t)
    n = norm(gc)
    opt.first_step()
    for p, w0, c in zip(model.parameters(), w, gc):
        torch.testing.assert_close(p.detach() - w0, 0.1 * c / (n + 1e-12), atol=1e-13, rtol=1e-10)
    assert float(norm([p.detach() - w0 for p, w0 in zip(model.parameters(), w)])) == pytest.approx(0.1, rel=1e-10)
    opt.restore()


def test_gc_refuses_sparse_gradients_before_any_change():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = sk.SAM(emb.parameters(), torch.optim.SGD, lr=0.1, use_gc=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.first_step()
    assert torch.equal(emb.weight.detach(), before)


# --------------------------------------------------------------------------- pytorch-optimizer

def _po():
    return pytest.importorskip("pytorch_optimizer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gsam_matches_pytorch_optimizer(backend):
    po = _po()
    model = make_model()
    theirs = copy.deepcopy(model)
    ours = sk.GSAM(model.parameters(), torch.optim.SGD, rho=RHO, alpha=0.4, backend=backend, **SGD)
    base = torch.optim.SGD(theirs.parameters(), **SGD)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(base, lambda t: 1.0)
    rho_sched = po.ProportionScheduler(lr_sched, max_lr=SGD["lr"], min_lr=SGD["lr"], max_value=RHO, min_value=RHO)
    ref = po.GSAM(theirs.parameters(), base, theirs, rho_sched, alpha=0.4)
    for x, y in make_batches(4):
        loss_fn(model(x), y).backward()
        ours.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        ours.second_step(zero_grad=True)
        ref.set_closure(loss_fn, x, y)
        ref.step()
        ref.update_rho_t()
        for p, q in zip(model.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-8, rtol=1e-6)  # theirs: fp32 norms


@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_wsam_matches_pytorch_optimizer(decouple, backend):
    po = _po()
    model = make_model()
    theirs = copy.deepcopy(model)
    ours = sk.WSAM(model.parameters(), torch.optim.SGD, rho=RHO, gamma=0.9, decouple=decouple, backend=backend, **SGD)
    ref = po.WSAM(theirs, theirs.parameters(), torch.optim.SGD, rho=RHO, gamma=0.9, decouple=decouple, **SGD)
    for x, y in make_batches(4):
        ours.zero_grad()
        ours.step(closure_of(model, x, y))
        ref.zero_grad()
        ref.step(closure_of(theirs, x, y))
        for p, q in zip(model.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gcsam_matches_pytorch_optimizer_up_to_its_norm(backend):
    """pytorch-optimizer's SAM(use_gc=True) divides the centralized gradient by the RAW gradient's
    norm; given rho·‖g‖/‖Φ(g)‖ (computed here by hand from the first-pass gradients) it takes our step."""
    po = _po()
    model = make_model()
    theirs = copy.deepcopy(model)
    ours = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, use_gc=True, backend=backend, **SGD)
    ref = po.SAM(theirs.parameters(), torch.optim.SGD, rho=RHO, use_gc=True, **SGD)
    for x, y in make_batches(4):
        loss_fn(model(x), y).backward()
        ours.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        ours.second_step(zero_grad=True)
        loss_fn(theirs(x), y).backward()
        g = [q.grad.detach().double() for q in theirs.parameters()]
        gc = [t - t.mean(dim=1, keepdim=True) if t.dim() == 2 else t for t in g]
        for group in ref.param_groups:
            group["rho"] = RHO * float(norm(g) / norm(gc))
        ref.first_step(zero_grad=True)
        loss_fn(theirs(x), y).backward()
        ref.second_step(zero_grad=True)
        for p, q in zip(model.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------- telemetry

@pytest.mark.parametrize("name", ["GSAM", "WSAM", "WSAM-coupled", "GCSAM"])
def test_telemetry_reads_the_passes_before_the_mixing(name):
    """grad_norm, sam_grad_norm and their cosine are of g1 and g2 as the passes gave them (GCSAM: of
    the centralized g1, which the ascent used), not of the mixed descent gradient; ‖e‖ = rho."""
    from tests.optim.test_telemetry import NORM_RTOL, closure_step, hand, model_and_data
    model, data = model_and_data()
    kw = dict(rho=RHO, lr=0.1, momentum=0.9, telemetry=True)
    opt = {"GSAM": lambda: sk.GSAM(model.parameters(), torch.optim.SGD, alpha=0.4, **kw),
           "WSAM": lambda: sk.WSAM(model.parameters(), torch.optim.SGD, gamma=0.9, **kw),
           "WSAM-coupled": lambda: sk.WSAM(model.parameters(), torch.optim.SGD, gamma=0.9, decouple=False, **kw),
           "GCSAM": lambda: sk.SAM(model.parameters(), torch.optim.SGD, use_gc=True, **kw)}[name]()
    for x, y in data[:2]:
        seen = closure_step(model, opt, x, y)
    if name == "GCSAM":
        seen["g1"] = [g - g.mean(dim=1, keepdim=True) if g.dim() == 2 else g for g in seen["g1"]]
    st, h = opt.stats(), hand(seen)
    for key in ("grad_norm", "sam_grad_norm", "grad_cosine"):
        assert st[key] == pytest.approx(h[key], rel=NORM_RTOL), key
    assert st["perturbation_norm"] == pytest.approx(RHO, rel=1e-6)


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("name", ["GSAM", "WSAM", "WSAM-coupled", "GCSAM"])
def test_compiled_steps_without_recompiles_at_constant_lr(name):
    """torch.compile(fullgraph=True) of the steps, constant lr (the matrix's compile loop, with an lr
    schedule, fails for every variant: lr is a graph constant): against the hand reference, and no
    compile after the warm-up (e.g. no guard on a gradient's identity)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from tests.optim.variants import variant
    torch._dynamo.reset()
    run = Run(variant(name), "cpp", dtype=torch.float32, steps=8, finite_check=False)
    counter = CompileCounterWithBackend("aot_eager")
    step_with = {n: torch.compile(getattr(run.opt, n), fullgraph=True, backend=counter)
                 for n in ("first_step", "second_step", "base_step")}
    for t, (x, y) in enumerate(run.data):
        rec = run.manual([(x, y)], step_with=step_with)
        run.reference_step(rec, [(x, y)])
        if t == 3:
            after_warmup = counter.frame_count
    run.check("compiled", tol=(1e-5, 1e-4))
    assert counter.frame_count == after_warmup <= 4


@pytest.mark.parametrize("cls", [sk.GSAM, sk.WSAM])
def test_sam_on_groups_refused_before_any_change(cls):
    """perturb=False groups (SAM-ON) would enter the mix with g(w) = 0: refused at first_step, weights at w."""
    model = make_model()
    ps = list(model.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "perturb": False}], torch.optim.SGD, lr=0.1)
    x, y = make_batches(1)[0]
    loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="perturb=False"):
        opt.first_step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(ps, before))
