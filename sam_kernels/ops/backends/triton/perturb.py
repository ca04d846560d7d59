"""``perturb_`` (backup + ascent step, optional mask / ASAM / random keep) and ``restore_``.

Telemetry (reference.perturb_): with ``perturbation_sq`` (the PERTURBATION_SQ flag), each program
also sums (w_new − w)² over its chunk in CDT, w_new as stored (rounded to DT), while both are in
registers; it writes the total into row ``program_id`` of a [n_blocks, 1] partials buffer, and one
program (:func:`_tables.add_partials_kernel`) adds the rows in a fixed order into
``perturbation_sq``. The only extra traffic is those n_blocks partials; without the argument the
flag compiles the reduction out (the PTX is unchanged but for the unused pointer parameter).

With ``grad_copies`` (the GRAD_COPIES flag), each block stores the grads it loaded, as loaded (no
cast through the compute type: bitwise, NaN payloads and -0.0 included), for every element
whatever the selection or the norm: one extra write in the pass that reads the grads, instead of
a separate copy that reads them again. Without it the flag compiles the store out; the copies'
pointer row is the kernel's last parameter, so the PTX is unchanged but for that unused parameter
(a row among the others renumbers the parameters, and LLVM then orders the code differently).
"""
import torch
import triton
import triton.language as tl

from . import _tables
from ._tables import block_offsets, chunk_bounds, div_ieee, load, round_to, scalar, sqrt_ieee, store, tensor_ptr


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
def _perturb_block(p_ptr, g_ptr, b_ptr, m_ptr, c_ptr, offs, mask, s, finite, eta, key, keep_threshold, acc,
                   DT: tl.constexpr, CDT: tl.constexpr, MASKED: tl.constexpr, ADAPTIVE: tl.constexpr,
                   KEEP: tl.constexpr, PERTURBATION_SQ: tl.constexpr, GRAD_COPIES: tl.constexpr,
                   INTO: tl.constexpr):
    """One block; returns ``acc`` + (w_new − w)² lane by lane with PERTURBATION_SQ (else ``acc``).
    INTO (``into_backups``): w_new goes to the backups and w is only read."""
    w_raw = load(p_ptr + offs, mask)
    if not INTO:
        store(b_ptr + offs, w_raw, mask)
    w = w_raw.to(CDT)
    g_raw = load(g_ptr + offs, mask)
    if GRAD_COPIES:
        store(c_ptr + offs, g_raw, mask)
    e = g_raw.to(CDT)
    if ADAPTIVE:
        tw = tl.abs(w) + eta
        e = (tw * tw) * e
    e = e * s
    # All lanes while s is finite; where(), not `& finite`: the interpreter cannot broadcast a bool scalar in &.
    sel = tl.where(finite, offs == offs, False)
    if MASKED:
        sel = sel & (load(m_ptr + offs, mask) != 0)
    if KEEP:
        lo = (offs & 0xFFFFFFFF).to(tl.uint32)
        hi = (offs >> 32).to(tl.uint32)
        u = _fmix32(_fmix32(lo ^ key) ^ hi) >> 8
        sel = sel & (u.to(tl.int64) < keep_threshold)
    # Unselected lanes get their loaded bits back: bitwise unchanged, and the store stays vectorizable.
    w_new = tl.where(sel, round_to(w + e, DT), w_raw)
    if INTO:
        store(b_ptr + offs, w_new, mask)
    else:
        store(p_ptr + offs, w_new, mask)
    if PERTURBATION_SQ:
        # where(), not the difference alone: an unselected NaN/inf weight must add exactly 0 too.
        # Masked-off tail lanes load w = g = 0, so they add 0.
        applied = tl.where(sel, w_new.to(CDT) - w, 0.0)
        acc += applied * applied
    return acc


@triton.jit
def _perturb_kernel(p_ptrs, g_ptrs, b_ptrs, m_ptrs, sizes, blocks, keys, sq_norm, rho: tl.float64,
                    eps: tl.float64, eta: tl.float64, keep_prob: tl.float64, keep_threshold, partials, c_ptrs,
                    DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                    ALIGNED: tl.constexpr, MASKED: tl.constexpr, ADAPTIVE: tl.constexpr, KEEP: tl.constexpr,
                    PERTURBATION_SQ: tl.constexpr, GRAD_COPIES: tl.constexpr, INTO: tl.constexpr):
    """backup = w;  w = w + s·(T²·g) where selected (INTO: backup = that w + s·(T²·g), w not written), s = rho/(sqrt(sq_norm)+eps) (/keep_prob if KEEP).

    T = |w| + eta if ADAPTIVE else 1. Selected = s finite & mask (if MASKED) & keep (if KEEP), with
    keep iff fmix32(fmix32(lo32(i) ^ key) ^ hi32(i)) >> 8 < keep_threshold, i the element index in
    its tensor (reference.keep_mask). Unselected weights are rewritten with their own bits.
    PERTURBATION_SQ: partials[b] = Σ (w_new − w)² over the chunk (exactly 0 from unselected entries).
    GRAD_COPIES: grad copy = g, the loaded bits, for every element of the chunk.
    """
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, tl.int8, ALIGNED)
    c_ptr = tensor_ptr(c_ptrs, t, DT, ALIGNED)
    stored = tl.load(sq_norm)
    sq = stored.to(CDT)
    s = div_ieee(scalar(rho, CDT), sqrt_ieee(sq) + scalar(eps, CDT))
    key = tl.zeros((), tl.uint32)
    if KEEP:
        s = div_ieee(s, scalar(keep_prob, CDT))
        key = tl.load(keys + t).to(tl.uint32)
    # False for +-inf and NaN. The norm is tested too, as stored (like the reference): an Inf
    # gradient gives s = 0, and 0·inf = NaN.
    finite = (tl.abs(s) < float("inf")) & (tl.abs(stored) < float("inf"))
    eta_c = scalar(eta, CDT)
    acc = tl.zeros((BLOCK,), CDT)
    for off in range(start, split, BLOCK):
        acc = _perturb_block(p_ptr, g_ptr, b_ptr, m_ptr, c_ptr, block_offsets(off, BLOCK), None, s, finite, eta_c,
                             key, keep_threshold, acc, DT, CDT, MASKED, ADAPTIVE, KEEP, PERTURBATION_SQ, GRAD_COPIES, INTO)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        acc = _perturb_block(p_ptr, g_ptr, b_ptr, m_ptr, c_ptr, offs, offs < end, s, finite, eta_c, key,
                             keep_threshold, acc, DT, CDT, MASKED, ADAPTIVE, KEEP, PERTURBATION_SQ, GRAD_COPIES, INTO)
    if PERTURBATION_SQ:
        tl.store(partials + tl.program_id(0).to(tl.int64), tl.sum(acc, 0))


@triton.jit
def _copy_kernel(dst_ptrs, src_ptrs, sizes, blocks, DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """dst = src (no arithmetic: bitwise)."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    dst = tensor_ptr(dst_ptrs, t, DT, ALIGNED)
    src = tensor_ptr(src_ptrs, t, DT, ALIGNED)
    for off in range(start, split, BLOCK):
        offs = block_offsets(off, BLOCK)
        tl.store(dst + offs, tl.load(src + offs))
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < end), mask=offs < end)


def perturb_(params, grads, backups, sq_norm, rho, eps, masks, adaptive, eta, keep_prob, keys, perturbation_sq=None,
             grad_copies=None, into_backups=False):
    """backups ← params; params += s·(m ⊙ T² ⊙ g)·keep/keep_prob (see reference.perturb_; ``into_backups``:
    backups ← params + s·(...), params only read); with
    ``perturbation_sq`` (1 element, fp32/fp64), adds Σ (w_new − w)² over the stored values into it;
    with ``grad_copies`` (a list aligned with ``grads``: same shapes, dtype, device, memory order),
    grad_copies ← grads bitwise, every element. A bad ``perturbation_sq`` or ``grad_copies`` raises
    TypeError/ValueError before anything is launched."""
    if perturbation_sq is not None:
        _tables.check_sums_tensor("perturb_", "perturbation_sq", perturbation_sq, 1, params)
    if grad_copies is not None:
        _check_grad_copies(grads, grad_copies)
    keep = keep_prob < 1.0
    key_col = _tables.int_column(keys, params[0].device) if keep else sq_norm  # unused unless KEEP
    lists = [params, grads, backups, masks, grad_copies]
    partials = _tables.partials_for(lists, perturbation_sq, 1)
    tab = _tables.launch_over(_perturb_kernel, lists, key_col, sq_norm, rho, eps, eta, keep_prob,
                              int(keep_prob * (1 << 24)), partials, MASKED=masks is not None, ADAPTIVE=adaptive,
                              KEEP=keep, PERTURBATION_SQ=perturbation_sq is not None,
                              GRAD_COPIES=grad_copies is not None, INTO=bool(into_backups), rows_after_args=1)
    if perturbation_sq is not None:
        _tables.add_partials(partials, perturbation_sq, tab.n_blocks, 1)
    if grad_copies is not None:  # written through raw pointers (triton.WRITES bumps positional lists only)
        written = [t for t in grad_copies if not t.is_inference()]
        if written:
            torch.autograd.graph.increment_version(written)


def _check_grad_copies(grads, grad_copies):
    """``grad_copies`` as csrc/common.h's check_list against ``grads`` (read and written through the
    same table offsets: same shape, dtype, device and memory order), before anything is launched.
    Raises TypeError (not a list of tensors, other dtype) or ValueError (length, shape, device, layout)."""
    if not isinstance(grad_copies, (list, tuple)):
        raise TypeError(f"perturb_: grad_copies must be a list of tensors, got {type(grad_copies).__name__}")
    if len(grad_copies) != len(grads):
        raise ValueError(f"perturb_: grad_copies has {len(grad_copies)} tensors, expected {len(grads)}")
    for i, (c, g) in enumerate(zip(grad_copies, grads)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"perturb_: grad_copies[{i}] is {type(c).__name__}, not a tensor")
        if c.dtype != g.dtype:
            raise TypeError(f"perturb_: grad_copies[{i}] has dtype {c.dtype}, expected {g.dtype}")
        if c.layout != torch.strided or c.shape != g.shape or c.device != g.device or \
                _memory_order(c) != _memory_order(g):
            raise ValueError(f"perturb_: grad_copies[{i}] is {tuple(c.shape)} with strides "
                             f"{c.stride() if c.layout == torch.strided else c.layout} on {c.device}, but grads[{i}] "
                             f"is {tuple(g.shape)} with strides {g.stride()} on {g.device}")


def _memory_order(t):
    """Strides of the dims of size > 1 (where equal, two same-shape dense tensors align element-wise)."""
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz != 1)


def restore_(params, backups):
    """params ← backups, bitwise."""
    tab = _tables.table([params, backups])
    if tab.n_blocks:
        _tables.launch(_copy_kernel, tab.n_blocks, tab.ptrs[0], tab.ptrs[1], tab.sizes, tab.blocks,
                       DT=_tables.tl_dtype(params[0].dtype), BLOCK=_tables.BLOCK, CHUNK=_tables.CHUNK,
                       ALIGNED=tab.aligned)
