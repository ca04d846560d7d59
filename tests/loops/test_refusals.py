"""Loops a variant refuses (``VariantInfo.refuses``): the loop raises the row's error before any
weight changes. (Sparse gradients: ``test_sparse_grad_loops``; SAM-ON groups: ``test_sam_on_loops``.)"""
from __future__ import annotations

import pytest
import torch

from tests.loops.harness import Run
from tests.loops.matrix import cases, refusal
from tests.loops.test_aliasing_loops import Net
from tests.loops.test_amp_loops import amp_run
from tests.optim.variants import VARIANTS, loss_fn, make_batches

TESTED_HERE = ("closure", "amp_closure", "aliased")


def test_every_refusal_has_a_test():
    for info in VARIANTS:
        # sparse_grad: test_sparse_grad_loops; sam_on: test_sam_on_loops; compile: test_compile_loops
        assert set(info.refuses) <= {*TESTED_HERE, "sparse_grad", "sam_on", "compile"}, info.name


def _unchanged(model, before):
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p.detach(), w)


@pytest.mark.parametrize("info,backend", cases("closure", refused=True))
def test_closure_refused(info, backend):
    """A backward, then step(closure)."""
    run = Run(info, backend)
    before = [p.detach().clone() for p in run.model.parameters()]
    with refusal(info, "closure"):
        run.closure(run.data[:1])
    _unchanged(run.model, before)


@pytest.mark.parametrize("info,backend", cases("amp_closure", refused=True))
def test_amp_closure_refused(info, backend):
    """A scaled backward, then scaler.step(opt, closure)."""
    run = amp_run(info, backend)
    before = [p.detach().clone() for p in run.model.parameters()]
    with refusal(info, "amp_closure"):
        run.closure(run.data[:1])
    _unchanged(run.model, before)


@pytest.mark.parametrize("info,backend", cases("aliased", refused=True))
def test_aliased_refused(info, backend):
    """Two Parameters over one storage: refused at construction or at the first step."""
    model = Net("alias")
    before = [p.detach().clone() for p in model.parameters()]
    (x, y), = make_batches(1)
    with refusal(info, "aliased"):
        opt = info.build(model, backend)
        with (opt.ascent_pass() if hasattr(opt, "ascent_pass") else torch.enable_grad()):
            loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
    _unchanged(model, before)
