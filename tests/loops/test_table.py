"""The variant table and the hand reference themselves.

- every loop of ``LOOPS`` is run by the matrix, and every refusal names a loop of it;
- the hand base optimizers equal torch's own (rho = 0: a SAM step is then the base step), so a
  matrix failure points at the SAM maths or the step machinery, not at a transcription of torch.optim.
"""
from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from torch.func import functional_call

import tests.loops
from tests.loops import matrix
from tests.optim.hand_reference import HandSAM
from tests.optim.variants import LOOPS, VARIANTS, loss_fn, make_batches, make_model


def test_every_loop_is_in_the_matrix():
    seen = set()
    original = matrix.cases

    def recording(loop, *args, **kwargs):
        seen.add(loop.split("/")[0])
        return original(loop, *args, **kwargs)
    matrix.cases = recording
    try:
        for mod in pkgutil.iter_modules(tests.loops.__path__):
            if mod.name.startswith("test_") and mod.name != "test_table":
                importlib.reload(importlib.import_module(f"tests.loops.{mod.name}"))
    finally:
        matrix.cases = original
    assert set(LOOPS) <= seen, f"loops without a test: {sorted(set(LOOPS) - seen)}"


@pytest.mark.parametrize("info", VARIANTS, ids=[v.name for v in VARIANTS])
def test_refusals_name_loops_of_the_matrix(info):
    assert set(info.refuses) <= set(LOOPS)
    for exc, match in info.refuses.values():
        assert issubclass(exc, Exception) and match


@pytest.mark.parametrize("base,cls,kw", [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1)),
    ("asgd", torch.optim.ASGD, dict(lr=0.1)),
])
def test_hand_base_optimizers_equal_torch(base, cls, kw):
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    hand = HandSAM([p.detach() for p in model.parameters()], base=base, base_kwargs=kw, rho=0.0)
    opt = cls(model.parameters(), **kw)
    oracle = make_model()

    def grads(ws):
        leaves = [w.clone().requires_grad_() for w in ws]
        return list(torch.autograd.grad(loss_fn(functional_call(oracle, dict(zip(names, leaves)), (x,)), y), leaves))
    for x, y in make_batches(4):
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        hand.step(grads(hand.ws), grads, sam=True)
        # ASGD keeps its step size eta as a float32 tensor: float32 rounding of eta
        rtol = 1e-7 if base == "asgd" else 1e-10
        for p, w in zip(model.parameters(), hand.ws):
            torch.testing.assert_close(p.detach(), w, atol=1e-12, rtol=rtol)
