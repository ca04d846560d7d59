"""Element-wise ops of the SAM variants: ``renormalize_`` (Stable SAM), ``fisher_accumulate_`` (Sparse
SAM), ``looksam_store_`` / ``looksam_apply_`` (LookSAM), ``mix_`` (GSAM, WSAM).

Global norms and dots arrive as device scalars (computed by ``norm.py``); each program turns them
into its coefficient, so nothing synchronizes with the host.
"""
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
