"""Element-wise ops of the SAM variants: ``renormalize_`` (Stable SAM), ``fisher_accumulate_`` (Sparse
SAM), ``looksam_store_`` / ``looksam_apply_`` (LookSAM), ``mix_`` (GSAM, WSAM),
``ema_update_`` (Friendly-SAM, VaSSO), ``centralize_`` (GCSAM; per row of dim 0).

Global norms and dots arrive as device scalars (computed by ``norm.py``); each program turns them
into its coefficient, so nothing synchronizes with the host.
"""
import torch
import triton
import triton.language as tl

from . import _tables
from ._tables import block_offsets, chunk_bounds, div_ieee, load, round_to, scalar, sqrt_ieee, store, tensor_ptr


@triton.jit
def _scale_block(g_ptr, offs, mask, r, DT: tl.constexpr, CDT: tl.constexpr):
    store(g_ptr + offs, round_to(load(g_ptr + offs, mask).to(CDT) * r, DT), mask)


@triton.jit
def _renormalize_kernel(g_ptrs, sizes, blocks, ref_sq_norm, sq_norm, eps: tl.float64, DT: tl.constexpr,
                        CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """g = g·r, r = sqrt(ref_sq_norm)/(sqrt(sq_norm) + eps)."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    r = div_ieee(sqrt_ieee(tl.load(ref_sq_norm).to(CDT)), sqrt_ieee(tl.load(sq_norm).to(CDT)) + scalar(eps, CDT))
    for off in range(start, split, BLOCK):
        _scale_block(g_ptr, block_offsets(off, BLOCK), None, r, DT, CDT)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        _scale_block(g_ptr, offs, offs < end, r, DT, CDT)


@triton.jit
def _fisher_block(f_ptr, g_ptr, offs, mask, c, DT: tl.constexpr, CDT: tl.constexpr):
    g = load(g_ptr + offs, mask).to(CDT)
    store(f_ptr + offs, round_to(load(f_ptr + offs, mask).to(CDT) + c * g * g, DT), mask)


@triton.jit
def _fisher_accumulate_kernel(f_ptrs, g_ptrs, sizes, blocks, scale: tl.float64, DT: tl.constexpr, CDT: tl.constexpr,
                              BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """f = f + scale·g·g."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    f_ptr = tensor_ptr(f_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    c = scalar(scale, CDT)
    for off in range(start, split, BLOCK):
        _fisher_block(f_ptr, g_ptr, block_offsets(off, BLOCK), None, c, DT, CDT)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        _fisher_block(f_ptr, g_ptr, offs, offs < end, c, DT, CDT)


@triton.jit
def _axpy_block(out_ptr, x_ptr, y_ptr, offs, mask, c, DT: tl.constexpr, CDT: tl.constexpr):
    """out = x + y·c (out may alias x or y: each element is read before it is written)."""
    x = load(x_ptr + offs, mask).to(CDT)
    y = load(y_ptr + offs, mask).to(CDT)
    store(out_ptr + offs, round_to(x + y * c, DT), mask)


@triton.jit
def _looksam_store_kernel(v_ptrs, g_ptrs, s_ptrs, sizes, blocks, gs_dot_g, g_sq_norm, eps: tl.float64,
                          DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                          ALIGNED: tl.constexpr):
    """g_v = g_s + g·(-c), c = ⟨g, g_s⟩/(‖g‖² + eps). ``g_v`` may alias ``g_s``."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    v_ptr = tensor_ptr(v_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    s_ptr = tensor_ptr(s_ptrs, t, DT, ALIGNED)
    c = -div_ieee(tl.load(gs_dot_g).to(CDT), tl.load(g_sq_norm).to(CDT) + scalar(eps, CDT))
    for off in range(start, split, BLOCK):
        _axpy_block(v_ptr, s_ptr, g_ptr, block_offsets(off, BLOCK), None, c, DT, CDT)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        _axpy_block(v_ptr, s_ptr, g_ptr, offs, offs < end, c, DT, CDT)


@triton.jit
def _looksam_apply_kernel(g_ptrs, v_ptrs, sizes, blocks, alpha: tl.float64, g_sq_norm, gv_sq_norm, eps: tl.float64,
                          DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                          ALIGNED: tl.constexpr):
    """g = g + g_v·c, c = alpha·sqrt(‖g‖²)/(sqrt(‖g_v‖²) + eps)."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, DT, ALIGNED)
    c = div_ieee(sqrt_ieee(tl.load(g_sq_norm).to(CDT)) * scalar(alpha, CDT),
                 sqrt_ieee(tl.load(gv_sq_norm).to(CDT)) + scalar(eps, CDT))
    for off in range(start, split, BLOCK):
        _axpy_block(g_ptr, g_ptr, v_ptr, block_offsets(off, BLOCK), None, c, DT, CDT)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        _axpy_block(g_ptr, g_ptr, v_ptr, offs, offs < end, c, DT, CDT)


@triton.jit
def _mix_kernel(g_ptrs, o_ptrs, sizes, blocks, a, b, DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr,
                CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """g = a·g + b·o (``o`` may alias ``g``)."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    o_ptr = tensor_ptr(o_ptrs, t, DT, ALIGNED)
    ca = tl.load(a).to(CDT)
    cb = tl.load(b).to(CDT)
    for off in range(start, split, BLOCK):
        offs = block_offsets(off, BLOCK)
        x = load(g_ptr + offs, None).to(CDT)
        y = load(o_ptr + offs, None).to(CDT)
        store(g_ptr + offs, round_to(ca * x + cb * y, DT), None)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        mask = offs < end
        x = load(g_ptr + offs, mask).to(CDT)
        y = load(o_ptr + offs, mask).to(CDT)
        store(g_ptr + offs, round_to(ca * x + cb * y, DT), mask)


@triton.jit
def _ema_block(m_ptr, g_ptr, d_ptr, offs, mask, w, c, inv, skip, DT: tl.constexpr, CDT: tl.constexpr,
               HAS_DIR: tl.constexpr, HAS_SCALE: tl.constexpr):
    g = load(g_ptr + offs, mask).to(CDT)
    m = load(m_ptr + offs, mask).to(CDT)
    if HAS_DIR:
        store(d_ptr + offs, round_to(g - m * c, DT), mask)
    x = g
    if HAS_SCALE:
        x = g * inv
    if not skip:
        store(m_ptr + offs, round_to(m + (x - m) * w, DT), mask)


@triton.jit
def _ema_update_kernel(m_ptrs, g_ptrs, d_ptrs, sizes, blocks, weight: tl.float64, sigma: tl.float64, scale_ptr,
                       found_ptr, DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                       ALIGNED: tl.constexpr, HAS_DIR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr):
    """d = g − m·(sigma·S) (HAS_DIR); m = m + (g·(1/S) − m)·weight unless found_inf (S = grad_scale or 1)."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    m_ptr = tensor_ptr(m_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    d_ptr = tensor_ptr(d_ptrs, t, DT, ALIGNED)
    s = tl.full((), 1.0, tl.float32)
    if HAS_SCALE:
        s = tl.load(scale_ptr)
    inv = div_ieee(tl.full((), 1.0, tl.float32), s).to(CDT)  # fp32 reciprocal, as reference.unscale_factor
    c = s.to(CDT) * scalar(sigma, CDT)
    skip = tl.full((), 0, tl.int1)
    if HAS_FOUND:
        skip = tl.load(found_ptr) != 0.0
    w = scalar(weight, CDT)
    for off in range(start, split, BLOCK):
        _ema_block(m_ptr, g_ptr, d_ptr, block_offsets(off, BLOCK), None, w, c, inv, skip, DT, CDT, HAS_DIR, HAS_SCALE)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        _ema_block(m_ptr, g_ptr, d_ptr, offs, offs < end, w, c, inv, skip, DT, CDT, HAS_DIR, HAS_SCALE)


def ema_update_(emas, grads, directions, weight, sigma, grad_scale=None, found_inf=None):
    """d ← g − sigma·S·m (when ``directions``); m ← m + weight·(g/S − m) unless ``found_inf``."""
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or t.device != emas[0].device):
            raise TypeError(f"ema_update_: {name} must be a 0-dim float32 tensor on {emas[0].device}, got {t.dtype} "
                            f"{tuple(t.shape)} on {t.device}")
    scale = emas[0] if grad_scale is None else grad_scale  # placeholders where absent: compiled out
    found = emas[0] if found_inf is None else found_inf
    _tables.launch_over(_ema_update_kernel, [emas, grads, directions], weight, sigma, scale, found,
                        HAS_DIR=directions is not None, HAS_SCALE=grad_scale is not None,
                        HAS_FOUND=found_inf is not None)


def renormalize_(grads, ref_sq_norm, sq_norm, eps):
    """g ← g·sqrt(ref)/(sqrt(sq_norm)+eps) (Stable SAM); both norms global, given."""
    _tables.launch_over(_renormalize_kernel, [grads], ref_sq_norm, sq_norm, eps)


def fisher_accumulate_(fisher, grads, scale):
    """fisher += scale·g²."""
    _tables.launch_over(_fisher_accumulate_kernel, [fisher, grads], scale)


def looksam_store_(g_v, grads, sam_grads, gs_dot_g, g_sq_norm, eps):
    """g_v ← g_s − (⟨g, g_s⟩/(‖g‖² + eps))·g, with the global dot and norm given."""
    _tables.launch_over(_looksam_store_kernel, [g_v, grads, sam_grads], gs_dot_g, g_sq_norm, eps)


def looksam_apply_(grads, g_v, alpha, g_sq_norm, gv_sq_norm, eps):
    """g ← g + alpha·(‖g‖/(‖g_v‖ + eps))·g_v, with both global norms given."""
    _tables.launch_over(_looksam_apply_kernel, [grads, g_v], alpha, g_sq_norm, gv_sq_norm, eps)


def mix_(grads, others, a, b):
    """g ← a·g + b·o with the 0-dim factors given."""
    _tables.launch_over(_mix_kernel, [grads, others], a, b)


@triton.jit
def _centralize_kernel(g_ptrs, sizes, blocks, lengths, rows: tl.int64, DT: tl.constexpr, CDT: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Rows [start, start + rows) of tensor t: each row (``lengths[t]`` contiguous elements) minus its
    mean, summed in BLOCK lanes of CDT then ``tl.sum`` (a fixed order), then rewritten."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(blocks + 2 * b)
    start = tl.load(blocks + 2 * b + 1)
    end = tl.minimum(start + rows, tl.load(sizes + t))
    length = tl.load(lengths + t)
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(DT))
    for r in range(start, end):
        row = r * length
        acc = tl.zeros((BLOCK,), CDT)
        for off in range(0, length, BLOCK):
            offs = off + tl.arange(0, BLOCK).to(tl.int64)
            acc += tl.load(g_ptr + row + offs, mask=offs < length, other=0).to(CDT)
        mean = div_ieee(tl.sum(acc, 0), length.to(CDT))
        for off in range(0, length, BLOCK):
            offs = off + tl.arange(0, BLOCK).to(tl.int64)
            mask = offs < length
            x = tl.load(g_ptr + row + offs, mask=mask, other=0).to(CDT)
            tl.store(g_ptr + row + offs, round_to(x - mean, DT), mask=mask)


def centralize_(grads):
    """g ← g − mean(g over dims 1..) per row of dim 0, for the tensors of more than one dimension.

    One program per run of whole rows (about CHUNK elements; one row at least). Every row must be a
    contiguous run of storage (dim 0 outermost); ValueError otherwise, before anything is written.
    """
    picked = [g for g in grads if g.dim() > 1 and g.numel() > 0]
    for g in picked:
        if g.shape[0] > 1 and g.stride(0) * g.shape[0] != g.numel():
            raise ValueError(f"centralize_: a tensor of shape {tuple(g.shape)} with strides {g.stride()} has rows of "
                             f"dim 0 that are not contiguous runs of storage; run it on the eager backend")
    if not picked:
        return
    lengths = [g.numel() // g.shape[0] for g in picked]
    longest = max(lengths)
    rows = max(1, _tables.CHUNK // longest)
    tab = _tables.table([picked], sizes=[g.shape[0] for g in picked], chunk=rows)
    block = min(_tables.BLOCK, max(16, triton.next_power_of_2(longest)))
    dtype = picked[0].dtype
    _tables.launch(_centralize_kernel, tab.n_blocks, tab.ptrs[0], tab.sizes, tab.blocks,
                   _tables.int_column(lengths, picked[0].device), rows, DT=_tables.tl_dtype(dtype),
                   CDT=_tables.compute_dtype(dtype), BLOCK=block)
