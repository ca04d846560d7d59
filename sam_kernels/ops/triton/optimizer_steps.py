"""Restore fused with the base optimizer's step: ``sgd_restore_step_`` and ``adamw_restore_step_``.

One pass reads the backup (not the perturbed weights), the gradient taken at w + e and the
optimizer state, and writes the new weights and state once. The maths follows torch.optim's
single-tensor/foreach formulas operation by operation (reference.py); scalars that depend only on
hyper-parameters (bias corrections, step sizes) are computed on the host as Python floats.
"""
import triton
import triton.language as tl

from . import _tables
from ._tables import block_offsets, chunk_bounds, div_ieee, scalar, sqrt_ieee, tensor_ptr


@triton.jit
def _sgd_restore_step_kernel(p_ptrs, b_ptrs, g_ptrs, buf_ptrs, sizes, blocks, neg_lr: tl.float64,
                             momentum: tl.float64, one_minus_dampening: tl.float64, weight_decay: tl.float64,
                             DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                             ALIGNED: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                             INIT_BUFFERS: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr):
    """w = backup; d = ±g (+ wd·w); buf = d if INIT else momentum·buf + (1-dampening)·d;
    d = d + momentum·buf if NESTEROV else buf; w = w + (-lr)·d (torch.optim.SGD)."""
    t, start, end = chunk_bounds(blocks, sizes, CHUNK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    buf_ptr = tensor_ptr(buf_ptrs, t, DT, ALIGNED)
    mom = scalar(momentum, CDT)
    for off in range(start, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        inb = offs < end
        w = tl.load(b_ptr + offs, mask=inb).to(CDT)
        d = tl.load(g_ptr + offs, mask=inb).to(CDT)
        if MAXIMIZE:
            d = -d
        if HAS_WD:
            d = d + scalar(weight_decay, CDT) * w
        if HAS_MOMENTUM:
            if INIT_BUFFERS:
                buf = d
            else:
                buf = tl.load(buf_ptr + offs, mask=inb).to(CDT) * mom + scalar(one_minus_dampening, CDT) * d
            tl.store(buf_ptr + offs, buf.to(DT), mask=inb)
            if NESTEROV:
                d = d + mom * buf
            else:
                d = buf
        tl.store(p_ptr + offs, (w + scalar(neg_lr, CDT) * d).to(DT), mask=inb)


@triton.jit
def _adamw_restore_step_kernel(p_ptrs, b_ptrs, g_ptrs, m_ptrs, v_ptrs, sizes, blocks, decay: tl.float64,
                               lerp_weight: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
                               bias_correction2_sqrt: tl.float64, eps: tl.float64, neg_step_size: tl.float64,
                               DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                               ALIGNED: tl.constexpr, MAXIMIZE: tl.constexpr):
    """w = backup·(1 - lr·wd); m = lerp(m, ±g, 1-beta1); v = v·beta2 + (1-beta2)·g·g;
    w = w + (-lr/bc1)·m / (sqrt(v)/sqrt(bc2) + eps) (torch.optim.AdamW)."""
    t, start, end = chunk_bounds(blocks, sizes, CHUNK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, DT, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, DT, ALIGNED)
    wt = scalar(lerp_weight, CDT)
    for off in range(start, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        inb = offs < end
        w = tl.load(b_ptr + offs, mask=inb).to(CDT) * scalar(decay, CDT)
        g = tl.load(g_ptr + offs, mask=inb).to(CDT)
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + offs, mask=inb).to(CDT)
        # torch's lerp: two formulas, chosen by |weight| < 0.5, for accuracy at both ends.
        m = tl.where(tl.abs(wt) < 0.5, m + wt * (g - m), g - (g - m) * (1.0 - wt))
        v = tl.load(v_ptr + offs, mask=inb).to(CDT) * scalar(beta2, CDT)
        v = v + scalar(one_minus_beta2, CDT) * g * g
        denom = div_ieee(sqrt_ieee(v), scalar(bias_correction2_sqrt, CDT)) + scalar(eps, CDT)
        w = w + div_ieee(scalar(neg_step_size, CDT) * m, denom)
        tl.store(m_ptr + offs, m.to(DT), mask=inb)
        tl.store(v_ptr + offs, v.to(DT), mask=inb)
        tl.store(p_ptr + offs, w.to(DT), mask=inb)


def sgd_restore_step_(params, backups, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
                      maximize, init_buffers):
    """params ← backups, then torch.optim.SGD's update (see reference.sgd_restore_step_)."""
    has_momentum = momentum != 0
    _tables.launch_over(_sgd_restore_step_kernel, [params, backups, grads, momentum_buffers if has_momentum else None],
                        -lr, momentum, 1 - dampening, weight_decay, HAS_WD=weight_decay != 0,
                        HAS_MOMENTUM=has_momentum, INIT_BUFFERS=init_buffers, NESTEROV=nesterov, MAXIMIZE=maximize)


def adamw_restore_step_(params, backups, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay,
                        maximize):
    """params ← backups, then torch.optim.AdamW's update (``step`` counted after its increment)."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    _tables.launch_over(_adamw_restore_step_kernel, [params, backups, grads, exp_avgs, exp_avg_sqs],
                        1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt, eps,
                        -lr / bias_correction1, MAXIMIZE=maximize)
