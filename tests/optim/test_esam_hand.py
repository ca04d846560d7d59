"""ESAM's whole step against a hand transcription of the authors' code (dydjw9/Efficient_SAM,
utils/Esam.py) in plain float64 torch: per-tensor selection with probability beta, e = rho·g/(‖g_sel‖·beta)
on the selected tensors (0 elsewhere), the second pass on the k = int(B·gamma) samples whose loss rose
most at w + e (the authors keep those strictly above the k-th largest, k − 1 samples: a documented
deviation), averaged, then SGD with momentum from w."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sam_kernels as sk

RHO, BETA, GAMMA, LR, MOMENTUM, SEED = 0.3, 0.6, 0.5, 0.1, 0.9, 0  # seed 0: every step selects a mix


def forward(ws, x):
    w1, b1, w2, b2, w3, b3 = ws
    h = torch.relu(x @ w1.T + b1)
    h = torch.relu(h @ w2.T + b2)
    return h @ w3.T + b3


def hand_esam(ws, batches):
    """The authors' maths, step by step; the selection draws as documented (torch.rand < beta from a
    CPU generator seeded with ``seed``, one draw per tensor per step)."""
    gen = torch.Generator().manual_seed(SEED)
    ws = [w.clone() for w in ws]
    bufs = None
    for x, y in batches:
        sel = (torch.rand(len(ws), generator=gen) < BETA).tolist()
        assert 0 < sum(sel) < len(ws), "each step must select some tensors, not all (else the test proves less)"
        w = [t.clone().requires_grad_(True) for t in ws]
        l0 = F.cross_entropy(forward(w, x), y, reduction="none")
        g = torch.autograd.grad(l0.mean(), w)
        norm = math.sqrt(sum(float(gi.pow(2).sum()) for gi, s in zip(g, sel) if s))
        e = [RHO * gi / (norm * BETA + 1e-12) if s else torch.zeros_like(gi) for gi, s in zip(g, sel)]
        we = [(t + ei).detach().requires_grad_(True) for t, ei in zip(ws, e)]
        with torch.no_grad():
            l1 = F.cross_entropy(forward(we, x), y, reduction="none")
        k = int(len(x) * GAMMA)
        top = torch.argsort(l1 - l0.detach(), descending=True)[:k]
        g2 = torch.autograd.grad(F.cross_entropy(forward(we, x[top]), y[top]), we)
        bufs = [gi.clone() for gi in g2] if bufs is None else [MOMENTUM * b + gi for b, gi in zip(bufs, g2)]
        ws = [t - LR * b for t, b in zip(ws, bufs)]
    return ws


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_esam_steps_match_the_authors_maths(backend):
    if backend == "cpp" and not sk.backends()["cpp"]["available"]:
        pytest.skip("no cpp backend in this build")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g))
               for _ in range(4)]
    expected = hand_esam([p.detach() for p in model.parameters()], batches)
    opt = sk.ESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=BETA, gamma=GAMMA, seed=SEED, lr=LR,
                  momentum=MOMENTUM, backend=backend)
    for x, y in batches:
        def closure(indices=None):
            xs, ys = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xs), ys, reduction="none")
        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    for p, w in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
