"""The SAM optimizer on each kernel backend against backend="eager": a tiny model, 10 steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk
from tests.utils import require_backend

CASES = [("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


def train(backend, device, base, kw, adaptive):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
    opt = sk.SAM(model.parameters(), base, rho=0.1, adaptive=adaptive, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(12, 6, generator=g).to(device)
        y = torch.randint(0, 3, (12,), generator=g).to(device)
        F.cross_entropy(model(x), y).backward()
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
        opt.zero_grad()
    return [p.detach().cpu() for p in model.parameters()], dict(sk.ops.last_used)


@pytest.mark.parametrize("backend,device", CASES, ids=[f"{b}-{d}" for b, d in CASES])
@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                     (torch.optim.AdamW, dict(lr=1e-2))], ids=["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_on_backend_matches_eager(backend, device, base, kw, adaptive):
    require_backend(backend, device)
    got, used = train(backend, device, base, kw, adaptive)
    want, _ = train("eager", device, base, kw, adaptive)
    assert used["perturb_"] == backend and used["grad_sq_norm"] == backend
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mask,pattern,op", [("random", "nm", "nm_mask"), ("random", "unstructured", "topk_mask"),
                                             ("dynamic", "unstructured", "topk_mask"),
                                             ("fisher", "unstructured", "fisher_accumulate_")])
def test_sparse_sam_masks_run_on_the_chosen_backend(mask, pattern, op):
    """SparseSAM(backend=...) builds its masks with that backend too (they once took the global
    choice): every mask op call of the steps runs eagerly when eager is asked for, while the
    global choice names another backend."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    extra = {"dynamic": dict(horizon=4), "random": {},
             "fisher": dict(model=model, loss_fn=F.cross_entropy, fisher_data=[(x, y)], num_samples=3)}[mask]
    opt = sk.SparseSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, mask=mask, pattern=pattern,
                       sparsity=0.5, update_unit="step", update_freq=1, backend="eager", **extra)
    sk.ops.set_backend("cpp")
    try:
        with sk.ops.dispatch.recording() as log:
            for _ in range(2):
                F.cross_entropy(model(x), y).backward()
                opt.step(lambda: F.cross_entropy(model(x), y).backward())
                opt.zero_grad()
    finally:
        sk.ops.set_backend(None)
    masks = [p for r in log if r.op == op for p in r.parts]
    assert len(masks) >= 2 and {p.backend for p in masks} == {"eager"}
