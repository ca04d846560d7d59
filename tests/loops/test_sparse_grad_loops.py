"""Sparse gradients (``nn.Embedding(sparse=True)``): the SAM step is defined for them (the norm over
the stored values, a sparse e), and torch's SGD (with or without momentum) and Adagrad accept them.
The hand reference densifies: a stored-values norm equals the dense norm, and every base rule used
here gives zero update where the gradient has no entry."""
from __future__ import annotations

import pytest
import torch

from tests.loops.harness import Run
from tests.loops.matrix import cases, refusal


class Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 4, sparse=True)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx.long()).mean(1)))


def token_batches(steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 20, (6, 5), generator=g).double(), torch.randint(0, 3, (6,), generator=g))
            for _ in range(steps)]


class DenseGrads(Run):
    """The reference's gradients densified; the inputs are token ids (kept exact in float64)."""

    def grads(self, ws, micro, indices=None):
        return [g.to_dense() if g.is_sparse else g for g in super().grads(ws, micro, indices)]


def make_run(info, backend):
    run = DenseGrads(info, backend, model_fn=lambda dtype: Bag().to(dtype))
    run.data = token_batches()
    return run


@pytest.mark.parametrize("info,backend", cases("sparse_grad"))
def test_sparse_embedding_manual(info, backend):
    make_run(info, backend).train("manual")


@pytest.mark.parametrize("info,backend", cases("sparse_grad", refused=True))
def test_sparse_embedding_refused(info, backend):
    run = make_run(info, backend)
    before = [p.detach().clone() for p in run.model.parameters()]
    with refusal(info, "sparse_grad"):
        run.manual(run.data[:1])
    for p, w in zip(run.model.parameters(), before):
        assert torch.equal(p.detach(), w)
