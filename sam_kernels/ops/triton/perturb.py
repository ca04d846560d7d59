"""``perturb_`` (backup + ascent step, optional mask / ASAM / random keep) and ``restore_``."""
import triton
import triton.language as tl

from . import _tables
from ._tables import block_offsets, chunk_bounds, div_ieee, scalar, sqrt_ieee, tensor_ptr


@triton.jit
def _fmix32(x):
    """murmur3 finalizer on uint32 (wrap-around products), as reference.fmix32."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _perturb_kernel(p_ptrs, g_ptrs, b_ptrs, m_ptrs, sizes, blocks, keys, sq_norm, rho: tl.float64, eps: tl.float64,
                    eta: tl.float64, keep_prob: tl.float64, keep_threshold, DT: tl.constexpr, CDT: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                    ADAPTIVE: tl.constexpr, KEEP: tl.constexpr):
    """backup = w;  w = w + s·(T²·g) where selected, s = rho/(sqrt(sq_norm)+eps) (/keep_prob if KEEP).

    T = |w| + eta if ADAPTIVE else 1. Selected = s finite & mask (if MASKED) & keep (if KEEP), with
    keep iff fmix32(fmix32(lo32(i) ^ key) ^ hi32(i)) >> 8 < keep_threshold, i the element index in
    its tensor (reference.keep_mask). Unselected weights are not stored at all: bitwise unchanged.
    """
    t, start, end = chunk_bounds(blocks, sizes, CHUNK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    s = div_ieee(scalar(rho, CDT), sqrt_ieee(tl.load(sq_norm).to(CDT)) + scalar(eps, CDT))
    if KEEP:
        s = div_ieee(s, scalar(keep_prob, CDT))
        key = tl.load(keys + t).to(tl.uint32)
    finite = tl.abs(s) < float("inf")  # False for +-inf and NaN
    for off in range(start, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        inb = offs < end
        w_raw = tl.load(p_ptr + offs, mask=inb)
        tl.store(b_ptr + offs, w_raw, mask=inb)
        w = w_raw.to(CDT)
        e = tl.load(g_ptr + offs, mask=inb).to(CDT)
        if ADAPTIVE:
            tw = tl.abs(w) + scalar(eta, CDT)
            e = (tw * tw) * e
        e = e * s
        sel = tl.where(finite, inb, False)  # not `inb & finite`: the interpreter cannot broadcast a bool scalar in &
        if MASKED:
            sel = sel & (tl.load(tensor_ptr(m_ptrs, t, tl.int8, ALIGNED) + offs, mask=inb, other=0) != 0)
        if KEEP:
            lo = (offs & 0xFFFFFFFF).to(tl.uint32)
            hi = (offs >> 32).to(tl.uint32)
            u = _fmix32(_fmix32(lo ^ key) ^ hi) >> 8
            sel = sel & (u.to(tl.int64) < keep_threshold)
        tl.store(p_ptr + offs, (w + e).to(DT), mask=sel)


@triton.jit
def _copy_kernel(dst_ptrs, src_ptrs, sizes, blocks, DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """dst = src (no arithmetic: bitwise)."""
    t, start, end = chunk_bounds(blocks, sizes, CHUNK)
    dst = tensor_ptr(dst_ptrs, t, DT, ALIGNED)
    src = tensor_ptr(src_ptrs, t, DT, ALIGNED)
    for off in range(start, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        inb = offs < end
        tl.store(dst + offs, tl.load(src + offs, mask=inb), mask=inb)


def perturb_(params, grads, backups, sq_norm, rho, eps, masks, adaptive, eta, keep_prob, keys):
    """backups ← params; params += s·(m ⊙ T² ⊙ g)·keep/keep_prob (see reference.perturb_)."""
    keep = keep_prob < 1.0
    key_col = _tables.int_column(keys, params[0].device) if keep else sq_norm  # unused unless KEEP
    _tables.launch_over(_perturb_kernel, [params, grads, backups, masks], key_col, sq_norm, rho, eps, eta, keep_prob,
                        int(keep_prob * (1 << 24)), MASKED=masks is not None, ADAPTIVE=adaptive, KEEP=keep)


def restore_(params, backups):
    """params ← backups, bitwise."""
    tab = _tables.table([params, backups])
    if tab.n_blocks:
        _tables.launch(_copy_kernel, tab.n_blocks, tab.ptrs[0], tab.ptrs[1], tab.sizes, tab.blocks,
                       DT=_tables.tl_dtype(params[0].dtype), BLOCK=_tables.BLOCK, CHUNK=_tables.CHUNK,
                       ALIGNED=tab.aligned)
