"""bSAM's three passes (Moellenhoff and Khan, ICLR 2023; the official code's update, see
reference.py): ``bsam_noise_``, ``bsam_ascent_``, ``bsam_descent_`` (the restore fused with the
descent). fp16/bf16 are computed in fp32 and rounded once on store.

AMP as the fused descents (:mod:`.optimizer_steps`): ``grad_scale`` divided out as g·(1/S) with an
fp32 reciprocal, a non-zero ``found_inf`` read on the device; both compiled out when absent.
"""
import triton
import triton.language as tl

from . import _tables
from ._tables import block_offsets, chunk_bounds, div_ieee, load, round_to, scalar, sqrt_ieee, store, tensor_ptr
from .optimizer_steps import _amp_pointers, _amp_scalars, _restore_range


@triton.jit
def _noise_block(p_ptr, b_ptr, s_ptr, z_ptr, offs, mask, n, one, DT: tl.constexpr, CDT: tl.constexpr):
    w = load(p_ptr + offs, mask)
    store(b_ptr + offs, w, mask)
    sigma = div_ieee(one, sqrt_ieee(load(s_ptr + offs, mask).to(CDT) * n))
    store(p_ptr + offs, round_to(w.to(CDT) + load(z_ptr + offs, mask).to(CDT) * sigma, DT), mask)


@triton.jit
def _bsam_noise_kernel(p_ptrs, b_ptrs, s_ptrs, z_ptrs, sizes, blocks, num_data: tl.float64, DT: tl.constexpr,
                       CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """backup = w; w = w + z·(1/sqrt(s·N))."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    s_ptr = tensor_ptr(s_ptrs, t, DT, ALIGNED)
    z_ptr = tensor_ptr(z_ptrs, t, DT, ALIGNED)
    n = scalar(num_data, CDT)
    one = scalar(1.0, CDT)
    for off in range(start, split, BLOCK):
        _noise_block(p_ptr, b_ptr, s_ptr, z_ptr, block_offsets(off, BLOCK), None, n, one, DT, CDT)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        _noise_block(p_ptr, b_ptr, s_ptr, z_ptr, offs, offs < end, n, one, DT, CDT)


@triton.jit
def _ascent_block(p_ptr, b_ptr, g_ptr, s_ptr, sn_ptr, offs, mask, rho, b2, one_b2, shift, inv, skip,
                  DT: tl.constexpr, CDT: tl.constexpr, HAS_SCALE: tl.constexpr, PERTURB: tl.constexpr):
    g = load(g_ptr + offs, mask).to(CDT)
    if HAS_SCALE:
        g = g * inv
    s = load(s_ptr + offs, mask).to(CDT)
    b = load(b_ptr + offs, mask)
    if PERTURB:
        store(p_ptr + offs, tl.where(skip, b, round_to(b.to(CDT) + div_ieee(g, s) * rho, DT)), mask)
    else:
        store(p_ptr + offs, b, mask)
    store(sn_ptr + offs, round_to(s * b2 + one_b2 * (sqrt_ieee(s) * tl.abs(g) + shift), DT), mask)


@triton.jit
def _bsam_ascent_kernel(p_ptrs, b_ptrs, g_ptrs, s_ptrs, sn_ptrs, sizes, blocks, scale_ptr, found_ptr,
                        rho: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64, shift: tl.float64,
                        DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                        ALIGNED: tl.constexpr, PERTURB: tl.constexpr, HAS_SCALE: tl.constexpr,
                        HAS_FOUND: tl.constexpr):
    """w = backup + (g/s)·rho (backup when not PERTURB or skipped); s_next = s·beta2 + (1-beta2)·(sqrt(s)·|g| + shift)."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    s_ptr = tensor_ptr(s_ptrs, t, DT, ALIGNED)
    sn_ptr = tensor_ptr(sn_ptrs, t, DT, ALIGNED)
    rho_c = scalar(rho, CDT)
    b2 = scalar(beta2, CDT)
    one_b2 = scalar(one_minus_beta2, CDT)
    shift_c = scalar(shift, CDT)
    inv, skip = _amp_scalars(scale_ptr, found_ptr, CDT, HAS_SCALE, HAS_FOUND)
    for off in range(start, split, BLOCK):
        _ascent_block(p_ptr, b_ptr, g_ptr, s_ptr, sn_ptr, block_offsets(off, BLOCK), None, rho_c, b2, one_b2, shift_c,
                      inv, skip, DT, CDT, HAS_SCALE, PERTURB)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        _ascent_block(p_ptr, b_ptr, g_ptr, s_ptr, sn_ptr, offs, offs < end, rho_c, b2, one_b2, shift_c, inv, skip,
                      DT, CDT, HAS_SCALE, PERTURB)


@triton.jit
def _descent_block(p_ptr, b_ptr, g_ptr, m_ptr, s_ptr, offs, mask, neg_lr, b1, one_b1, decay, inv,
                   DT: tl.constexpr, CDT: tl.constexpr, HAS_WD: tl.constexpr, HAS_SCALE: tl.constexpr):
    w = load(b_ptr + offs, mask).to(CDT)
    g = load(g_ptr + offs, mask).to(CDT)
    if HAS_SCALE:
        g = g * inv
    m = load(m_ptr + offs, mask).to(CDT) * b1 + one_b1 * g
    if HAS_WD:
        m = m + decay * w
    store(m_ptr + offs, round_to(m, DT), mask)
    store(p_ptr + offs, round_to(w + neg_lr * div_ieee(m, load(s_ptr + offs, mask).to(CDT)), DT), mask)


@triton.jit
def _bsam_descent_kernel(p_ptrs, b_ptrs, g_ptrs, m_ptrs, s_ptrs, sn_ptrs, sizes, blocks, scale_ptr, found_ptr,
                         neg_lr: tl.float64, beta1: tl.float64, one_minus_beta1: tl.float64, decay: tl.float64,
                         DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                         ALIGNED: tl.constexpr, HAS_WD: tl.constexpr, HAS_SCALE: tl.constexpr,
                         HAS_FOUND: tl.constexpr):
    """w = backup; m = m·beta1 + (1-beta1)·g (+ (1-beta1)·wd·w); w = w + (-lr)·(m/s). Skipped:
    w = backup, s_next = s, m untouched."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, DT, ALIGNED)
    s_ptr = tensor_ptr(s_ptrs, t, DT, ALIGNED)
    sn_ptr = tensor_ptr(sn_ptrs, t, DT, ALIGNED)
    lr_c = scalar(neg_lr, CDT)
    b1 = scalar(beta1, CDT)
    one_b1 = scalar(one_minus_beta1, CDT)
    dec = scalar(decay, CDT)
    inv, skip = _amp_scalars(scale_ptr, found_ptr, CDT, HAS_SCALE, HAS_FOUND)
    if skip:
        _restore_range(p_ptr, b_ptr, start, end, BLOCK)
        _restore_range(sn_ptr, s_ptr, start, end, BLOCK)
    else:
        for off in range(start, split, BLOCK):
            _descent_block(p_ptr, b_ptr, g_ptr, m_ptr, s_ptr, block_offsets(off, BLOCK), None, lr_c, b1, one_b1, dec,
                           inv, DT, CDT, HAS_WD, HAS_SCALE)
        for off in range(split, end, BLOCK):
            offs = block_offsets(off, BLOCK)
            _descent_block(p_ptr, b_ptr, g_ptr, m_ptr, s_ptr, offs, offs < end, lr_c, b1, one_b1, dec, inv, DT, CDT,
                           HAS_WD, HAS_SCALE)


def bsam_noise_(params, backups, s, noise, num_data):
    """backups ← w; w ← w + z / sqrt(N·s) (see reference.bsam_noise_)."""
    _tables.launch_over(_bsam_noise_kernel, [params, backups, s, noise], num_data)


def bsam_ascent_(params, backups, grads, s, s_next, *, rho, beta2, damping, weight_decay, perturb, grad_scale=None,
                 found_inf=None):
    """w ← backup + rho·g/s; s_next ← beta2·s + (1 − beta2)·(sqrt(s)·|g| + damping + weight_decay)
    (see reference.bsam_ascent_)."""
    amp = _amp_pointers(grad_scale, found_inf, params)
    _tables.launch_over(_bsam_ascent_kernel, [params, backups, grads, s, s_next], *amp, rho, beta2, 1 - beta2,
                        damping + weight_decay, PERTURB=perturb, HAS_SCALE=grad_scale is not None,
                        HAS_FOUND=found_inf is not None)


def bsam_descent_(params, backups, grads, exp_avgs, s, s_next, *, lr, beta1, weight_decay, grad_scale=None,
                  found_inf=None):
    """params ← backups, then m ← beta1·m + (1 − beta1)·(g + weight_decay·w); w ← w − lr·m/s
    (see reference.bsam_descent_)."""
    amp = _amp_pointers(grad_scale, found_inf, params)
    _tables.launch_over(_bsam_descent_kernel, [params, backups, grads, exp_avgs, s, s_next], *amp, -lr, beta1,
                        1 - beta1, (1 - beta1) * weight_decay, HAS_WD=weight_decay != 0,
                        HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None)
