"""AMP arguments of the fused ops (``grad_scale``, ``found_inf``) on every backend.

The oracle is the same op on UNSCALED gradients: with a power-of-2 scale (what GradScaler uses)
dividing it out is exact, so the fused descents must agree with the unscaled call as tightly as
two backends agree anyway, and an overflow must leave params bitwise at the backups and the
optimizer state bitwise unchanged.
"""
from __future__ import annotations

import pytest
import torch

import sam_kernels.ops as ops
from tests.ops.opinfo import ALL, Inputs, dispatch_rows, require, shapes_for
from tests.utils import DTYPE_IDS, DTYPES, assert_lists_close, assert_lists_equal

SCALE = 1024.0


@pytest.fixture(params=dispatch_rows(ALL), ids=[b.id for b in dispatch_rows(ALL)])
def case(request):
    row = require(request.param)
    return row.name, row.device, row


def make(shapes, dtype, device):
    return Inputs(shapes, dtype, device).randn()


def clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def amp_inputs(case, dtype, shapes_name="odd"):
    backend, device, row = case
    shapes = shapes_for(shapes_name, row)
    params = make(shapes, dtype, device)
    grads = make(shapes, dtype, device)
    scale = torch.tensor(SCALE, device=device)
    scaled = [g * SCALE for g in grads]  # exact: a power of 2 within range
    return params, grads, scaled, scale


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("momentum,init", [(0.0, False), (0.9, True), (0.9, False)], ids=["plain", "init", "momentum"])
def test_sgd_unscales_in_kernel(case, dtype, atol, rtol, momentum, init):
    backend, device, _ = case
    params, grads, scaled, scale = amp_inputs(case, dtype)
    backups = [p + 0.5 for p in params]
    bufs = make([p.shape for p in params], dtype, device) if momentum and not init else None
    kw = dict(lr=0.1, momentum=momentum, dampening=0.1, weight_decay=1e-3, nesterov=False, maximize=False)
    p_amp, p_ref = clone(params), clone(params)
    b_amp = ops.sgd_restore_step_(p_amp, backups, scaled, clone(bufs), grad_scale=scale,
                                  found_inf=torch.zeros((), device=device), backend=backend, **kw)
    b_ref = ops.sgd_restore_step_(p_ref, backups, grads, clone(bufs), backend="eager", **kw)
    assert_lists_close(p_amp, p_ref, atol, rtol, "params")
    if momentum:
        assert_lists_close(b_amp, b_ref, atol, rtol, "momentum_buffers")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
def test_sgd_found_inf_restores_and_keeps_state(case, dtype, atol, rtol, momentum):
    backend, device, _ = case
    params, _, scaled, scale = amp_inputs(case, dtype)
    scaled[0].view(-1)[0] = float("inf")  # the overflow itself; the skip must not depend on where it is
    backups = make([p.shape for p in params], dtype, device)
    bufs = make([p.shape for p in params], dtype, device) if momentum else None
    bufs_before = clone(bufs)
    out = ops.sgd_restore_step_(params, backups, scaled, bufs, lr=0.1, momentum=momentum, grad_scale=scale,
                                found_inf=torch.ones((), device=device), backend=backend)
    assert_lists_equal(params, backups, "params at the backups")
    if momentum:
        assert_lists_equal(out, bufs_before, "momentum buffers untouched")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_sgd_skipped_first_step_leaves_zero_buffers(case, dtype, atol, rtol):
    backend, device, _ = case
    params, _, scaled, scale = amp_inputs(case, dtype)
    backups = clone(params)
    out = ops.sgd_restore_step_(params, backups, scaled, None, lr=0.1, momentum=0.9, grad_scale=scale,
                                found_inf=torch.ones((), device=device), backend=backend)
    assert_lists_equal(params, backups)
    assert all(b is not None and b.numel() == p.numel() and not b.any() for b, p in zip(out, params))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("found", [0.0, 1.0], ids=["step", "overflow"])
def test_adamw_amp(case, dtype, atol, rtol, found):
    backend, device, _ = case
    params, grads, scaled, scale = amp_inputs(case, dtype)
    backups = [p - 0.25 for p in params]
    m = make([p.shape for p in params], dtype, device)
    v = [x.abs() for x in make([p.shape for p in params], dtype, device)]
    kw = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
    p_amp, m_amp, v_amp = clone(params), clone(m), clone(v)
    ops.adamw_restore_step_(p_amp, backups, scaled, m_amp, v_amp, grad_scale=scale,
                            found_inf=torch.tensor(found, device=device), backend=backend, **kw)
    if found:
        assert_lists_equal(p_amp, backups, "params at the backups")
        assert_lists_equal(m_amp, m, "exp_avg untouched")
        assert_lists_equal(v_amp, v, "exp_avg_sq untouched")
        return
    p_ref, m_ref, v_ref = clone(params), clone(m), clone(v)
    ops.adamw_restore_step_(p_ref, backups, grads, m_ref, v_ref, backend="eager", **kw)
    assert_lists_close(p_amp, p_ref, atol, rtol, "params")
    assert_lists_close(m_amp, m_ref, atol, rtol, "exp_avg")
    assert_lists_close(v_amp, v_ref, atol, rtol, "exp_avg_sq")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_perturb_unscaled_norm(case, dtype, atol, rtol, adaptive):
    """e from scaled grads and grad_scale equals e from the unscaled grads (eps placed as if unscaled)."""
    backend, device, _ = case
    params, grads, scaled, scale = amp_inputs(case, dtype)
    grads = [g * 1e-9 for g in grads]  # tiny gradients: eps matters, so eps·S vs eps is visible
    scaled = [g * SCALE for g in grads]
    eps = 1e-7
    p_amp, p_ref = clone(params), clone(params)
    ops.perturb_(p_amp, scaled, clone(params), 0.05, adaptive=adaptive, eps=eps, grad_scale=scale, backend=backend)
    ops.perturb_(p_ref, grads, clone(params), 0.05, adaptive=adaptive, eps=eps, backend="eager")
    assert_lists_close(p_amp, p_ref, atol, rtol, "perturbed params")


def test_perturb_found_inf_leaves_weights(case):
    backend, device, _ = case
    params, _, scaled, scale = amp_inputs(case, torch.float32)
    before = clone(params)
    backups = clone(params)
    ops.perturb_(params, scaled, backups, 0.05, grad_scale=scale, found_inf=torch.ones((), device=device),
                 backend=backend)
    assert_lists_equal(params, before)
    assert_lists_equal(backups, before)


def test_amp_scalar_checks():
    p = [torch.randn(5)]
    with pytest.raises(TypeError, match="grad_scale"):
        ops.sgd_restore_step_(p, clone(p), clone(p), None, lr=0.1, grad_scale=2.0)
