"""``model.double()`` between steps or between first_step and second_step: every variant's state
(base optimizer buffers, LookSAM's g / g_v, SparseSAM's masks, ...) follows its parameter's dtype and
device as torch.optim's ``load_state_dict`` casts it, so the run equals a fresh optimizer that
loads the state dict onto the cast model; and a hand float64/float32 SAM run for SGD with momentum."""
import copy

import pytest
import torch
from torch import nn

import sam_kernels as sk
from tests.utils import backend_available

BACKENDS = [b for b in ("eager", "cpp") if backend_available(b, "cpu")]
RHO, LR, MOM = 0.1, 0.1, 0.9
CAST_AT, STEPS = 2, 5

VARIANTS = {
    "SAM": lambda p, be: sk.SAM(p, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, backend=be),
    "SAM-AdamW": lambda p, be: sk.SAM(p, torch.optim.AdamW, rho=RHO, lr=LR, backend=be),
    "SAM-AdamW-amsgrad": lambda p, be: sk.SAM(p, torch.optim.AdamW, rho=RHO, lr=LR, amsgrad=True, backend=be),
    "ASAM": lambda p, be: sk.SAM(p, torch.optim.SGD, rho=RHO, adaptive=True, lr=LR, momentum=MOM, backend=be),
    # seed 2 draws plain, SAM, plain, SAM, plain: the step after the cast is a plain one
    "SSSAM": lambda p, be: sk.SSSAM(p, torch.optim.SGD, rho=RHO, p=0.5, seed=2, lr=LR, momentum=MOM, backend=be),
    "StableSAM": lambda p, be: sk.StableSAM(p, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, backend=be),
    "LookSAM": lambda p, be: sk.LookSAM(p, torch.optim.SGD, rho=RHO, k=2, lr=LR, momentum=MOM, backend=be),
    "AESAM": lambda p, be: sk.AESAM(p, torch.optim.SGD, rho=RHO, total_steps=STEPS, lr=LR, backend=be),
    "AELookSAM": lambda p, be: sk.AELookSAM(p, torch.optim.SGD, rho=RHO, total_steps=STEPS, lr=LR, backend=be),
    "SparseSAM": lambda p, be: sk.SparseSAM(p, torch.optim.SGD, rho=RHO, mask="random", sparsity=0.5, seed=0,
                                            lr=LR, momentum=MOM, backend=be),
    "ESAM": lambda p, be: sk.ESAM(p, torch.optim.SGD, rho=RHO, beta=0.6, gamma=1.0, seed=2, lr=LR, momentum=MOM,
                                  backend=be),
    "GSAM": lambda p, be: sk.GSAM(p, torch.optim.SGD, rho=RHO, alpha=0.4, lr=LR, momentum=MOM, backend=be),
    "WSAM": lambda p, be: sk.WSAM(p, torch.optim.SGD, rho=RHO, gamma=0.9, lr=LR, momentum=MOM, backend=be),
    "GCSAM": lambda p, be: sk.SAM(p, torch.optim.SGD, rho=RHO, use_gc=True, lr=LR, momentum=MOM, backend=be),
}


def _loss(model, x):
    return model(x.to(next(model.parameters()).dtype)).square().mean()


def _run(name, backend, when, reload):
    """STEPS manual-loop steps; at step CAST_AT the model goes to float64 ``when`` = "between" (before
    the first backward) or "mid" (after first_step, or before base_step on a plain step). ``reload``:
    the README rule instead: save, cast a copy, build a fresh optimizer on it, load, go on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    opt = VARIANTS[name](model.parameters(), backend)

    def cast(model, opt):
        if not reload:
            return model.double(), opt
        sd = copy.deepcopy(opt.state_dict())
        model = copy.deepcopy(model).double()
        fresh = VARIANTS[name](model.parameters(), backend)
        fresh.load_state_dict(sd)
        return model, fresh

    for step in range(STEPS):
        if step == CAST_AT and when == "between":
            model, opt = cast(model, opt)
        _loss(model, x).backward()
        if opt.wants_sam():
            opt.first_step(zero_grad=True)
            if step == CAST_AT and when == "mid":
                model, opt = cast(model, opt)
            _loss(model, x).backward()
            opt.second_step(zero_grad=True)
        else:
            if step == CAST_AT and when == "mid":
                grads = [p.grad for p in model.parameters()]
                model, opt = cast(model, opt)
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.double()
            opt.base_step(zero_grad=True)
    return model, opt


# Triton (interpreted on CPU: slow) on the variants whose own buffers exercise the cast.
CASES = [(n, b) for n in VARIANTS for b in BACKENDS] + [
    (n, "triton") for n in ("SAM", "LookSAM", "SSSAM") if backend_available("triton", "cpu")]


@pytest.mark.parametrize("when", ["between", "mid"])
@pytest.mark.parametrize("name,backend", CASES)
def test_input_07_cast_equals_fresh_optimizer_loaded_onto_cast_model(name, backend, when):
    model, opt = _run(name, backend, when, reload=False)
    ref, ref_opt = _run(name, backend, when, reload=True)
    assert opt.stats()["sam_steps"] == ref_opt.stats()["sam_steps"] >= 1
    for p, r in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.float64
        assert torch.equal(p.detach(), r.detach()), (p - r).abs().max()
    # Every state tensor follows its param; the step counts stay as torch keeps them, and a backup is
    # scratch between steps (renewed in its param's dtype when the next SAM step takes it).
    for p in model.parameters():
        for k, v in {**opt.state[p], **opt.base_optimizer.state[p]}.items():
            if isinstance(v, torch.Tensor) and k not in ("step", "backup") and v.is_floating_point():
                assert v.dtype == torch.float64, k
    if name == "SparseSAM":
        assert all(m.dtype == torch.bool for m in opt.masks)


def _hand_sam_sgd_momentum(ws, x, casts_at):
    """SAM (e = rho·g/‖g‖) around SGD(momentum) in plain torch, float32 until step ``casts_at``,
    then float64 with the momentum buffers cast (torch.optim's load rule)."""
    ws = [w.clone() for w in ws]
    bufs = None
    for step in range(STEPS):
        if step == casts_at:
            ws = [w.double() for w in ws]
            bufs = [b.double() for b in bufs]

        def grads(at):
            at = [t.clone().requires_grad_(True) for t in at]
            h = torch.tanh(x.to(at[0].dtype) @ at[0].T + at[1]) @ at[2].T + at[3]
            h.square().mean().backward()
            return [t.grad for t in at]

        g = grads(ws)
        s = RHO / (torch.sqrt(sum(t.square().sum() for t in g)) + 1e-12)
        h = grads([w + s * t for w, t in zip(ws, g)])
        bufs = [t.clone() for t in h] if bufs is None else [MOM * b + t for b, t in zip(bufs, h)]
        ws = [w - LR * b for w, b in zip(ws, bufs)]
    return ws


@pytest.mark.parametrize("when", ["between", "mid"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_07_sam_sgd_cast_matches_hand(backend, when):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    w0 = [p.detach().clone() for p in model.parameters()]
    model, _ = _run("SAM", backend, when, reload=False)
    # "mid": the cast comes after first_step, so step CAST_AT's ascent and first gradient are float32
    # and exact in float64: the hand run casts at the start of that step either way, up to rounding.
    expected = _hand_sam_sgd_momentum(w0, x, CAST_AT)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=2e-6, rtol=1e-5)


def test_input_07_adamw_generic_path_after_cast_steps():
    """torch's own Adam raises on float32 moments with float64 params; here they are cast first."""
    model, opt = _run("SAM-AdamW-amsgrad", "eager", "between", reload=False)
    for p in model.parameters():
        assert opt.base_optimizer.state[p]["max_exp_avg_sq"].dtype == torch.float64
