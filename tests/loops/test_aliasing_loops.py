"""Tied and aliased parameters.

- tied: one Parameter used by two layers (``model.parameters()`` lists it once; autograd sums its
  gradients): nothing special, the matrix's reference applies.
- aliased: two Parameters over one storage (``b.weight.data = a.weight.data``, both listed). torch.optim
  treats each list entry on its own and both write the same memory, so the storage moves by the sum of
  the entries' updates. The expected SAM step, by hand: e_i = rho·g_i/‖g‖ per entry (the norm over the
  entries, as ``clip_grad_norm_`` takes it), the storage at w + Σe_i for the second pass, restored to w,
  then the base step's update of each entry added to the storage.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from tests.loops.matrix import cases
from tests.optim.hand_reference import EPS, HandSGD, norm
from tests.optim.variants import LR, MOMENTUM, RHO, loss_fn, make_batches


class Net(torch.nn.Module):
    """a and b are 4x4 Linears; ``tie`` shares one Parameter, ``alias`` two Parameters over one storage."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        kw = dict(dtype=torch.float64)
        self.a, self.b, self.head = torch.nn.Linear(4, 4, **kw), torch.nn.Linear(4, 4, **kw), torch.nn.Linear(4, 3, **kw)
        if mode == "tie":
            self.b.weight = self.a.weight
        else:
            self.b.weight.data = self.a.weight.data

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def model_fn(mode):
    return lambda dtype: Net(mode)


@pytest.mark.parametrize("info,backend", cases("aliased/tied"))
def test_tied_parameter(info, backend):
    from tests.loops.harness import Run
    run = Run(info, backend, model_fn=model_fn("tie"))
    run.data = [(x, y) for x, y in make_batches(4)]
    run.train("manual")


@pytest.mark.parametrize("info,backend", cases("aliased"))
def test_aliased_storage_restored_with_lr_zero(info, backend):
    """With lr = 0 a step must leave every weight bitwise where it was, the shared storage included."""
    model = Net("alias")
    before = [p.detach().clone() for p in model.parameters()]
    opt = info.build(model, backend, lr=0.0)
    for x, y in make_batches(3):
        with (opt.ascent_pass() if hasattr(opt, "ascent_pass") else torch.enable_grad()):
            loss_fn(model(x), y).backward()
        if info.one_pass:
            opt.step()
            opt.zero_grad()
        elif opt.wants_sam():
            opt.first_step(zero_grad=True)
            for _ in range(info.ascent_steps - 1):
                loss_fn(model(x), y).backward()
                opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.base_step(zero_grad=True)
    if info.one_pass:
        opt.restore()  # the model holds w - rho·v/‖v‖ between its steps: back to w
    assert model.a.weight.data_ptr() == model.b.weight.data_ptr()
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p.detach(), w), f"{info.name}: a weight moved with lr = 0"


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_aliased_storage_sam_step_by_hand(backend):
    import sam_kernels as sk
    model = Net("alias")
    names = [n for n, _ in model.named_parameters()]
    storage = model.a.weight.detach().clone()
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in ("a.weight", "b.weight")}
    oracle = Net("alias")
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, backend=backend)
    base = HandSGD(LR, MOMENTUM)

    def entry_weights(w, rest):
        return [w if n in ("a.weight", "b.weight") else rest[n] for n in names]

    def grads(ws):
        leaves = [w.detach().clone().requires_grad_() for w in ws]
        return list(torch.autograd.grad(loss_fn(functional_call(oracle, dict(zip(names, leaves)), (x,)), y), leaves))

    for t, (x, y) in enumerate(make_batches(3)):
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

        ws = entry_weights(storage, others)
        g1 = grads(ws)
        n = norm(g1)
        e = [RHO * g / (n + EPS) for g in g1]
        shared = storage + sum(ei for ei, nm in zip(e, names) if nm in ("a.weight", "b.weight"))
        pert = {nm: w + ei for nm, w, ei in zip(names, ws, e) if nm not in ("a.weight", "b.weight")}
        g2 = grads(entry_weights(shared, pert))
        entries = [w.clone() for w in ws]
        base.step(entries, g2)
        storage = storage + sum(en - w for en, w, nm in zip(entries, ws, names) if nm in ("a.weight", "b.weight"))
        others = {nm: en for nm, en in zip(names, entries) if nm not in ("a.weight", "b.weight")}
        torch.testing.assert_close(model.a.weight.detach(), storage, atol=1e-10, rtol=1e-9,
                                   msg=lambda m: f"step {t}, shared storage: {m}")
        for nm, p in model.named_parameters():
            if nm in others:
                torch.testing.assert_close(p.detach(), others[nm], atol=1e-10, rtol=1e-9)
