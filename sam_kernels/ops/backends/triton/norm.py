"""Global reductions: ``grad_sq_norm`` and ``dot``, deterministic two-pass multi-tensor kernels.

Pass 1 (one launch over the group's table) writes one fp32 partial per program (fp64 for fp64
tensors); pass 2 (one program) adds the partials in a fixed order into a 0-dim tensor. The
result stays on the device: nothing synchronizes with the host.
"""
import torch
import triton
import triton.language as tl

from ...reference import acc_dtype
from . import _tables
from ._tables import block_offsets, chunk_bounds, load, scalar, tensor_ptr


@triton.jit
def _sq_norm_block(g_ptr, p_ptr, m_ptr, offs, mask, eta, CDT: tl.constexpr, ADAPTIVE: tl.constexpr,
                   MASKED: tl.constexpr):
    """(m·T·g)² for one block of offsets (0 on masked-off lanes)."""
    x = load(g_ptr + offs, mask).to(CDT)
    if ADAPTIVE:
        x = (tl.abs(load(p_ptr + offs, mask).to(CDT)) + eta) * x
    if MASKED:
        x = tl.where(load(m_ptr + offs, mask) != 0, x, 0.0)  # masked-out NaN/Inf contribute nothing
    return x * x


@triton.jit
def _sq_norm_partials_kernel(g_ptrs, p_ptrs, m_ptrs, sizes, blocks, partials, eta: tl.float64, DT: tl.constexpr,
                             CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
                             ADAPTIVE: tl.constexpr, MASKED: tl.constexpr):
    """partials[b] = Σ_chunk (m·T·g)², T = |w| + eta if ADAPTIVE else 1, m = mask if MASKED else 1.

    The mask multiplies (as reference.py does), so a non-finite grad outside the mask still
    poisons the norm instead of being silently dropped.
    """
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, tl.int8, ALIGNED)
    eta_c = scalar(eta, CDT)
    acc = tl.zeros((BLOCK,), CDT)
    for off in range(start, split, BLOCK):
        acc += _sq_norm_block(g_ptr, p_ptr, m_ptr, block_offsets(off, BLOCK), None, eta_c, CDT, ADAPTIVE, MASKED)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        acc += _sq_norm_block(g_ptr, p_ptr, m_ptr, offs, offs < end, eta_c, CDT, ADAPTIVE, MASKED)
    tl.store(partials + tl.program_id(0), tl.sum(acc, 0))


@triton.jit
def _dot_block(a_ptr, b_ptr, offs, mask, CDT: tl.constexpr):
    return load(a_ptr + offs, mask).to(CDT) * load(b_ptr + offs, mask).to(CDT)


@triton.jit
def _dot_partials_kernel(a_ptrs, b_ptrs, sizes, blocks, partials, DT: tl.constexpr, CDT: tl.constexpr,
                         BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """partials[b] = Σ_chunk a·b in CDT."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    a_ptr = tensor_ptr(a_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    acc = tl.zeros((BLOCK,), CDT)
    for off in range(start, split, BLOCK):
        acc += _dot_block(a_ptr, b_ptr, block_offsets(off, BLOCK), None, CDT)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        acc += _dot_block(a_ptr, b_ptr, offs, offs < end, CDT)
    tl.store(partials + tl.program_id(0), tl.sum(acc, 0))


@triton.jit
def _sum_partials_kernel(partials, out, n, BLOCK: tl.constexpr):
    """out = Σ partials[0..n), one program, fixed order (deterministic)."""
    acc = tl.zeros((BLOCK,), out.dtype.element_ty)
    for off in range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sum(acc, 0))


def _reduce(kernel, lists, *args, **constexprs) -> torch.Tensor:
    """Pass 1 (partials per program) then pass 2 (fixed-order sum): 0-dim fp32, fp64 for fp64 tensors."""
    first = lists[0][0]
    partials = torch.empty(_tables.table(lists).n_blocks, dtype=acc_dtype(first.dtype), device=first.device)
    _tables.launch_over(kernel, lists, partials, *args, **constexprs)
    out = torch.empty((), dtype=partials.dtype, device=partials.device)
    _tables.launch(_sum_partials_kernel, 1, partials, out, partials.numel(), BLOCK=_tables.BLOCK)
    return out


def grad_sq_norm(grads, params, masks, eta):
    """Σ (m ⊙ T ⊙ g)² over the group (see reference.grad_sq_norm), 0-dim fp32 (fp64 for fp64)."""
    return _reduce(_sq_norm_partials_kernel, [grads, params, masks], eta, ADAPTIVE=params is not None,
                   MASKED=masks is not None)


def dot(a, b):
    """Σ ⟨a_i, b_i⟩ over the group, 0-dim fp32 (fp64 for fp64)."""
    return _reduce(_dot_partials_kernel, [a, b])
