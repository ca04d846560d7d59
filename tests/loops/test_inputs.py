"""The eleven failing inputs of the loop issue, each as its own test with the value computed by hand
(tests/optim/hand_reference.py: plain torch, never the package's reference ops).

Inputs 10 (Lightning) and 11 (DDP) live with their integrations: tests/integrations/test_lightning.py
(``test_input_10_*``) and tests/distributed/test_msam.py (``test_input_11_*``).
"""
from __future__ import annotations

import io

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import sam_kernels as sk
from tests.loops.harness import Record, Run, inject_inf
from tests.loops.test_sparse_grad_loops import Bag, DenseGrads, token_batches
from tests.optim.hand_reference import HandSAM
from tests.optim.variants import LR, MOMENTUM, RHO, VARIANTS, VariantInfo, loss_fn, make_model, variant

SCALE = 1024.0


def sam_row(base: str, base_cls, base_kwargs: dict, **sam_kw) -> VariantInfo:
    """A one-off row: SAM around ``base_cls`` and its hand reference."""
    def factory(params, model=None, backend=None, **extra):
        return sk.SAM(params, base_cls, rho=RHO, backend=backend, **{**base_kwargs, **sam_kw, **extra})
    return VariantInfo(f"SAM-{base}", factory, False,
                       lambda ws: HandSAM(ws, base=base, base_kwargs=base_kwargs, rho=RHO))


SAM_SGD = sam_row("sgd", torch.optim.SGD, dict(lr=LR))
SAM_ASGD = sam_row("asgd", torch.optim.ASGD, dict(lr=LR))


def run_record(sam: bool) -> Record:
    return Record(sam=sam)


def amp_run(info, backend="cpp", **kw):
    return Run(info, backend, dtype=torch.float32, scaler=torch.amp.GradScaler("cpu", init_scale=SCALE), **kw)


# --------------------------------------------------------------------------- 1. torch.compile

@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_input_01_compile_recipe_runs_past_step_6(compiler, monkeypatch):
    """README's compile block verbatim, 20 batches: the hand reference's weights, at most one compile
    per function after the first SAM step (Dynamo's recompile limit lowered to 4: a failure comes fast)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 4)
    torch._dynamo.reset()
    run = Run(SAM_SGD, "cpp", dtype=torch.float32, steps=20, finite_check=False)
    counter = CompileCounterWithBackend(compiler)
    first_step = torch.compile(run.opt.first_step, fullgraph=True, backend=counter)
    second_step = torch.compile(run.opt.second_step, fullgraph=True, backend=counter)
    warm = None
    for t, (x, y) in enumerate(run.data):
        loss_fn(run.model(x), y).backward()
        first_step()
        run.opt.zero_grad()
        loss_fn(run.model(x), y).backward()
        second_step()
        run.opt.zero_grad()
        run.reference_step(run_record(True), [(x, y)])
        if t == 1:
            warm = counter.frame_count
    run.check("20 compiled steps", tol=(1e-5, 1e-4))
    assert counter.frame_count == warm, f"{counter.frame_count - warm} recompiles after step 1"


# --------------------------------------------------------------------------- 2. unscale_ placement

@pytest.mark.parametrize("row", [SAM_SGD, SAM_ASGD], ids=["SGD", "ASGD"])
def test_input_02a_unscale_first_pass(row):
    """scaler.unscale_(opt) + clip_grad_norm_(params, 10) on the FIRST pass, then first_step, a scaled second
    backward, scaler.step(opt): the plain SAM step (clip 10 does not bite here: checked)."""
    run = amp_run(row)
    for t, (x, y) in enumerate(run.data[:3]):
        run.scaler.scale(loss_fn(run.model(x), y)).backward()
        run.scaler.unscale_(run.opt)
        total = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 10.0)
        assert total < 10.0
        run.opt.first_step(zero_grad=True)
        run.scaler.scale(loss_fn(run.model(x), y)).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad()
        run.reference_step(run_record(True), [(x, y)])
        run.check(f"step {t}")


@pytest.mark.parametrize("row", [SAM_SGD, SAM_ASGD], ids=["SGD", "ASGD"])
def test_input_02b_unscale_inside_closure(row):
    run = amp_run(row)
    for t, (x, y) in enumerate(run.data[:3]):
        run.scaler.scale(loss_fn(run.model(x), y)).backward()

        def closure():
            loss = loss_fn(run.model(x), y)
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.opt)
            return loss
        run.scaler.step(run.opt, closure)
        run.scaler.update()
        run.opt.zero_grad()
        run.reference_step(run_record(True), [(x, y)])
        run.check(f"step {t}")


# --------------------------------------------------------------------------- 3. ESAM under fp16

ESAM_AMP = VariantInfo("ESAM", variant("ESAM").factory, False, variant("ESAM").hand_reference,
                       per_sample_closure=True, probe=variant("ESAM").probe)


def test_input_03a_esam_manual_amp_loop():
    run = amp_run(ESAM_AMP)
    run.train("manual")


def test_input_03b_esam_closure_amp_loop():
    run = amp_run(ESAM_AMP)
    run.train("closure")


# --------------------------------------------------------------------------- 4. mid-step checkpoint

def test_input_04_midstep_checkpoint_keeps_pending_overflow():
    run = amp_run(SAM_SGD)
    for t, (x, y) in enumerate(run.data[:3]):
        run.scaler.scale(loss_fn(run.model(x), y)).backward()
        if t == 1:
            inject_inf(run.model)
        run.opt.first_step(zero_grad=True)
        if t == 1:
            buf = io.BytesIO()
            torch.save({"model": run.model.state_dict(), "opt": run.opt.state_dict(),
                        "scaler": run.scaler.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=False)
            run.model = make_model(torch.float32)
            run.model.load_state_dict(saved["model"])
            run.scaler = torch.amp.GradScaler("cpu")
            run.scaler.load_state_dict(saved["scaler"])
            run.opt = SAM_SGD.build(run.model, "cpp", grad_scaler=run.scaler)
            run.opt.load_state_dict(saved["opt"])
        run.scaler.scale(loss_fn(run.model(x), y)).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad()
        if t == 1:
            run.ref.skip()
            assert run.scaler.get_scale() == SCALE / 2
        else:
            run.reference_step(run_record(True), [(x, y)])
        run.check(f"step {t}")


# --------------------------------------------------------------------------- 5. two Parameters, one storage

@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_input_05_two_parameters_one_storage(backend):
    """``b.weight.data = a.weight.data``, SAM around SGD with rho = 0.5 and lr = 0: every weight stays at w."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4, dtype=torch.float64), torch.nn.Linear(4, 4, dtype=torch.float64)
    b.weight.data = a.weight.data
    params = [a.weight, a.bias, b.weight, b.bias]
    w = [p.detach().clone() for p in params]
    opt = sk.SAM(params, torch.optim.SGD, rho=0.5, lr=0.0, backend=backend)
    x = torch.randn(6, 4, dtype=torch.float64)
    for t in range(3):
        b(torch.tanh(a(x))).square().sum().backward()
        opt.first_step(zero_grad=True)
        b(torch.tanh(a(x))).square().sum().backward()
        opt.second_step(zero_grad=True)
        for p, w0 in zip(params, w):
            assert torch.equal(p.detach(), w0), f"step {t}: moved by {(p - w0).abs().max().item()}"


# --------------------------------------------------------------------------- 6. zeroed-not-None gradients

def test_input_06_closure_after_zero_grad_set_to_none_false():
    run = Run(SAM_SGD, "cpp")
    for t, (x, y) in enumerate(run.data[:3]):
        run.opt.zero_grad(set_to_none=False)

        def closure():
            run.opt.zero_grad(set_to_none=False)
            loss = loss_fn(run.model(x), y)
            loss.backward()
            return loss
        run.opt.step(closure)
        run.reference_step(run_record(True), [(x, y)])
        run.check(f"step {t}")


# --------------------------------------------------------------------------- 7. casts mid-run

@pytest.mark.parametrize("name", ["LookSAM", "AELookSAM", "SAM-AdamW"])
def test_input_07a_trains_on_after_model_double(name):
    """LookSAM's own buffers follow the cast; AdamW (whose torch form raises there) goes on, as the hand reference."""
    run = Run(variant(name), "cpp", dtype=torch.float32)
    for t, (x, y) in enumerate(run.data):
        if t == 2:
            run.model.double()
            run.oracle.double()
            run.dtype = torch.float64
        rec = run.manual([(x, y)])
        run.reference_step(rec, [(x, y)])
        run.check(f"step {t}", tol=(2e-6, 2e-5))


def test_input_07b_sssam_after_cast_equals_a_fresh_optimizer_loaded_onto_the_cast_model():
    """README's rule: a cast mid-run is the same as loading the state into a fresh optimizer on the cast model."""
    info = variant("SSSAM")
    runs = [Run(info, "cpp", dtype=torch.float32) for _ in range(2)]
    for t, (x, y) in enumerate(runs[0].data):
        if t == 2:
            for run in runs:
                run.model.double()
            fresh = info.build(runs[1].model, "cpp")
            fresh.load_state_dict(runs[1].opt.state_dict())
            runs[1].opt = fresh
        recs = [run.manual([(x, y)]) for run in runs]
        assert recs[0].sam == recs[1].sam
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q), (p - q).abs().max().item()


# --------------------------------------------------------------------------- 8. sparse gradients

@pytest.mark.parametrize("momentum", [0.0, MOMENTUM])
def test_input_08_sparse_embedding(momentum):
    row = sam_row("sgd", torch.optim.SGD, dict(lr=LR, momentum=momentum))
    run = DenseGrads(row, "cpp", model_fn=lambda dtype: Bag().to(dtype))
    run.data = token_batches()
    run.train("manual")


# --------------------------------------------------------------------------- 9. state-dict hooks

@pytest.mark.parametrize("info", VARIANTS, ids=[v.name for v in VARIANTS])
def test_input_09_state_dict_pre_hook_adds_an_entry(info):
    """PyTorch's optimizer test: a pre-hook adds ``state["test"] = 1``; a post-hook then sees it and removes it."""
    model = make_model()
    opt = info.build(model)

    def pre(o):
        o.state["test"] = 1

    def post(o, sd):
        sd["ran_pre_hook"] = sd["state"].pop("test", None) == 1
        return sd
    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_pre_hook"] and "test" not in sd["state"]

