"""grad_sq_norm and dot: every backend against the eager reference on the op table's samples, and
what the reductions promise by hand (fixed order: independent of the thread count)."""
from __future__ import annotations

import pytest
import torch

from tests.ops.opinfo import ALL, COMPILED, Inputs, backend_param, check_against_eager, require, samples, shapes_for
from tests.utils import assert_lists_equal


@backend_param(COMPILED)
@pytest.mark.parametrize("sample", samples("grad_sq_norm", "dot"))
def test_matches_eager(backend, sample):
    check_against_eager(require(backend), sample)


@backend_param(ALL)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sq_norm_by_hand(backend, adaptive):
    """Σ (m ⊙ T ⊙ g)² in float64 by hand (T = |w| + eta), a masked-out NaN selected away; 0 for zero-size lists."""
    device = require(backend).device
    x = Inputs(shapes_for("odd", backend), torch.float64, device)
    grads, params, masks = x.randn(), x.randn(), x.masks()
    for g, m in zip(grads, masks):
        g[~m] = float("nan")
    want = sum(float(((m * ((p.abs() + 0.02) if adaptive else 1.0) * torch.where(m, g, 0.0)) ** 2).sum())
               for g, p, m in zip(grads, params, masks))
    got = backend.call("grad_sq_norm", (grads,), dict(params=params if adaptive else None, masks=masks, eta=0.02))
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(float(got) - want) <= 1e-12 * want
    empty = backend.call("grad_sq_norm", ([torch.zeros(0, device=device), torch.zeros(0, 3, device=device)],), {})
    assert empty.dtype == torch.float32 and float(empty) == 0.0


@backend_param(COMPILED)
def test_reductions_do_not_depend_on_thread_count(backend):
    device = require(backend).device
    x = Inputs(shapes_for("odd", backend) + shapes_for("many_small", backend), torch.float32, device)
    grads, params = x.randn(), x.randn()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(torch.stack([backend.call("grad_sq_norm", (grads,), {}),
                                        backend.call("grad_sq_norm", (grads,), dict(params=params)),
                                        backend.call("dot", (grads, params), {})]))
    finally:
        torch.set_num_threads(threads)
    assert_lists_equal([results[0]], [results[1]], "reductions with 1 thread vs several")
