"""perturb_ and restore_: every backend against the eager reference on the op table's samples, and
by hand: the backup, entries outside the mask, non-finite norms and skipped AMP steps, telemetry
(perturbation_sq in float64, grad_copies bitwise), the keep mask's statistics, restore."""
from __future__ import annotations

import math

import pytest
import torch

from sam_kernels.ops.reference import keep_mask, tensor_key
from tests.ops.opinfo import (ALL, COMPILED, Inputs, backend_param, check_against_eager, require, run,
                              same_bits, samples, shapes_for)
from tests.utils import assert_lists_equal

NOTHING_MOVES = ("nan-norm", "inf-norm", "inf-grad", "amp-skip")


@backend_param(COMPILED)
@pytest.mark.parametrize("sample", samples("perturb_", "restore_"))
def test_matches_eager(backend, sample):
    check_against_eager(require(backend), sample)


@backend_param(ALL)
@pytest.mark.parametrize("sample", samples("perturb_", extended=False))
def test_perturb_by_hand(backend, sample):
    """backups ← w bitwise; entries outside the mask bitwise unchanged; nothing moves on a non-finite
    norm or a skipped AMP step; perturbation_sq += Σ (w_new − w)² of the stored values (float64 by
    hand); grad_copies ← grads bitwise."""
    require(backend)
    torch.manual_seed(0)
    _, after, before = run(backend, sample)
    c = sample.meta
    params, w = after["params"], before["params"]
    assert_lists_equal(after["backups"], w, "backups")
    if c["condition"] in NOTHING_MOVES:
        assert_lists_equal(params, w, "params of a step that must not move")
    if after.get("masks") is not None:
        for i, (p, p0, m) in enumerate(zip(params, w, after["masks"])):
            assert bool(same_bits(p, p0)[~m].all()), f"masked-out entries of params[{i}] changed"
    if after.get("perturbation_sq") is not None:
        start = float(before["perturbation_sq"])
        moved = sum(float(((p.double() - p0.double()) ** 2).sum()) for p, p0 in zip(params, w))
        got = after["perturbation_sq"]
        if moved == 0.0:
            assert float(got) == 0.0 if start == 0.0 else float(got) == start
            assert not torch.signbit(got).any(), "an added +0 leaves +0.0 (also from a -0.0 start)"
        else:
            rel = 1e-10 if params[0].dtype == torch.float64 else 1e-5  # the kernels sum in the compute dtype
            tol = rel * moved + 4 * torch.finfo(got.dtype).eps * abs(start + moved)  # + the output's rounding
            assert abs(float(got) - (start + moved)) <= tol
    if after.get("grad_copies") is not None:
        for i, (copy, g) in enumerate(zip(after["grad_copies"], before["grads"])):
            assert bool(same_bits(copy, g).all()), f"grad_copies[{i}] is not the gradient, bitwise"


@backend_param(ALL)
@pytest.mark.parametrize("sample", samples("perturb_", extended=False))
def test_into_backups_is_the_in_place_ascent(backend, sample):
    """``into_backups=True`` on the same inputs: the backups get, bitwise, what the in-place ascent
    leaves in the params, with the same telemetry outputs; the params are only read."""
    require(backend)
    torch.manual_seed(0)
    args, kwargs = sample.make(backend)
    torch.manual_seed(0)
    args2, kwargs2 = sample.make(backend)
    w = [p.clone() for p in args[0]]
    backend.call("perturb_", args, kwargs)
    backend.call("perturb_", args2, dict(kwargs2, into_backups=True))
    assert_lists_equal(args2[0], w, "params (only read)")
    assert_lists_equal(args2[2], args[0], "backups = the in-place ascent's params")
    for name in ("perturbation_sq", "grad_copies"):
        if kwargs.get(name) is not None:
            got, want = kwargs2[name], kwargs[name]
            assert_lists_equal(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want],
                               name)


@backend_param(ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_restore_by_hand(backend, dtype):
    device = require(backend).device
    x = Inputs(shapes_for("odd", backend) + [(3,)], dtype, device)
    params, backups = x.randn(), x.randn()
    backups[-1][:] = torch.tensor([float("nan"), -0.0, float("-inf")]).to(dtype)
    backend.call("restore_", (params, backups), {})
    assert_lists_equal(params, backups, "restored params")


@backend_param(COMPILED)
def test_perturb_norm_finite_only_in_fp64(backend):
    """A float64 norm beyond float32's range is finite: fp32 weights move by rho·g·0 like the reference
    (-0.0 becomes +0.0), which a finiteness test after rounding the norm to fp32 would skip."""
    device = require(backend).device
    params = [torch.tensor([-0.0, 1.0, -0.0, 2.0], device=device)]
    grads = [torch.tensor([1.0, -1.0, 3.0, 0.5], device=device)]
    sq = torch.tensor(1e300, dtype=torch.float64, device=device)
    mine = [params[0].clone()]
    backend.call("perturb_", (mine, grads, [torch.empty_like(params[0])], 0.05), dict(sq_norm=sq))
    assert torch.equal(mine[0], torch.tensor([0.0, 1.0, 0.0, 2.0], device=device))
    assert not torch.signbit(mine[0]).any(), "-0.0 + 0.0 is +0.0"


@backend_param(ALL)
@pytest.mark.parametrize("keep_prob", [0.2, 0.75])
def test_keep_prob_fraction_and_seeds(backend, keep_prob):
    device = require(backend).device
    n = 100_000 if not backend.interpreted else 20_000
    sq = torch.tensor(1.0, device=device)

    def kept(seed):
        p = [torch.zeros(n, device=device)]
        backend.call("perturb_", (p, [torch.ones(n, device=device)], [torch.empty(n, device=device)], 1.0),
                     dict(sq_norm=sq, keep_prob=keep_prob, seed=seed))
        return p[0] != 0

    a, b, c = kept(5), kept(5), kept(6)
    assert torch.equal(a, keep_mask(n, tensor_key(5, 0), keep_prob, torch.device(device))), "not the reference hash"
    assert abs(int(a.sum()) - n * keep_prob) < 5 * math.sqrt(n * keep_prob * (1 - keep_prob))
    assert torch.equal(a, b) and not torch.equal(a, c)


@backend_param(ALL)
def test_grad_copies_rejected_before_writing(backend):
    device = require(backend).device
    x = Inputs([(7,), (3, 5)], torch.float32, device)
    params, grads = x.randn(), x.randn()
    before = [p.clone() for p in params]
    for bad in ([g.double() for g in grads], [grads[0].clone()], [torch.zeros(8, device=device), grads[1].clone()]):
        with pytest.raises((TypeError, ValueError)):
            backend.call("perturb_", (params, grads, [torch.empty_like(p) for p in params], 0.05),
                         dict(grad_copies=bad))
        assert_lists_equal(params, before, "params after a rejected call")
