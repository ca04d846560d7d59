"""Sparsity masks: ``topk_mask`` (global unstructured) and ``nm_mask`` (N:M structured).

Both equal reference.py exactly. The reference ranks ``torch.nan_to_num(float64(score), nan=-inf)``,
and nan_to_num also clamps ±inf to ±DBL_MAX, so: NaN ranks strictly lowest (below -inf), ±inf tie
with ±DBL_MAX, -0.0 ties with +0.0, and ties go to the lower flattened position (list order, then
row-major; for N:M, within the group, with a partial group's padding ranked like NaN, after it). The kernels rank the same values through an int64 key whose integer order is that
float64 order. These ops run once per mask refresh, not in the hot path, and take the whole score
list (possibly several dtypes: one launch per dtype group).

topk_mask: a Triton kernel writes the keys of all scores into one buffer in global position order,
then an MSD radix select finds the k-th largest key T in 8 rounds of 8 bits (per round: a histogram
pass over the keys still matching the digits chosen so far, integer atomics so counts are exact,
then a one-program pass that picks the digit and updates (prefix, rank) in a device buffer). It
leaves ``need`` = k - #{key > T}; the mask pass keeps key > T and the first ``need`` keys equal to
T in position order (tie ranks: per-chunk tie counts, their exclusive cumulative sum, an in-chunk
cumsum). Exact count, deterministic, no host synchronization.
"""
import itertools
import math

import torch
import triton
import triton.language as tl

from ... import reference
from . import _tables
from ._tables import block_offsets, chunk_bounds, tensor_ptr


_DBL_MAX = tl.constexpr(1.7976931348623157e308)


@triton.jit
def _order_key(x):
    """int64 key of float64 ``x``: integer order = the reference's ranking order (see module doc).

    b = bits of the ranked value; negative floats get their magnitude bits flipped (b ^ (2^63 - 1)).
    """
    x = tl.where(x == float("inf"), _DBL_MAX, x)
    x = tl.where(x == float("-inf"), -_DBL_MAX, x)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int64, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


@triton.jit
def _order_keys_kernel(s_ptrs, sizes, blocks, offsets, keys, DT: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """keys[offset_t + i] = order key of s_t[i]."""
    t, start, _, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    s_ptr = tensor_ptr(s_ptrs, t, DT, ALIGNED)
    out = keys + tl.load(offsets + t)
    for off in range(start, end, BLOCK):  # once per refresh: the masked loop is fine
        offs = block_offsets(off, BLOCK)
        x = tl.load(s_ptr + offs, mask=offs < end, other=0.0).to(tl.float64)
        tl.store(out + offs, _order_key(x), mask=offs < end)


@triton.jit
def _nm_mask_kernel(s_ptrs, o_ptrs, sizes, blocks, cols, n, DT: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                    GROUPS: tl.constexpr, ALIGNED: tl.constexpr):
    """keep[r, g·M + j] = rank_j < n, rank_j = #{i < M: key_i > key_j or (key_i == key_j and i < j)}.

    Each program ranks GROUPS groups of M consecutive entries of one (rows, cols) tensor view
    (MP = M rounded up to a power of two). As in the reference, a trailing partial group is padded
    to M entries that rank like NaN (lowest) but after every real entry, so it keeps min(n, r) of
    its r entries. Padding is ranked, never stored.
    """
    t, start, _, end = chunk_bounds(blocks, sizes, GROUPS, GROUPS)
    s_ptr = tensor_ptr(s_ptrs, t, DT, ALIGNED)
    o_ptr = tensor_ptr(o_ptrs, t, tl.int8, ALIGNED)
    n_cols = tl.load(cols + t)
    groups_per_row = (n_cols + M - 1) // M
    grp = start + tl.arange(0, GROUPS).to(tl.int64)
    j = tl.arange(0, MP)
    col = (grp % groups_per_row)[:, None] * M + j[None, :]
    real = (grp < end)[:, None] & (j < M)[None, :] & (col < n_cols)
    idx = (grp // groups_per_row)[:, None] * n_cols + col
    key = _order_key(tl.load(s_ptr + idx, mask=real, other=float("nan")).to(tl.float64))
    ki = key[:, None, :]
    kj = key[:, :, None]
    before = ((ki > kj) | ((ki == kj) & (j[None, None, :] < j[None, :, None]))) & (j < M)[None, None, :]
    rank = tl.sum(before.to(tl.int32), axis=2)
    tl.store(o_ptr + idx, (rank < n).to(tl.int8), mask=real)


@triton.jit
def _radix_histogram_kernel(keys, n, state, hist, shift, high_mask, flip, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """hist[d] += #{i: (key_i ^ prefix) & high_mask == 0, digit_i == d}, digit = ((key >> shift) & 255) ^ flip.

    high_mask selects the bits already decided (none in round 0); flip = 0x80 in round 0 turns the
    signed top byte into an unsigned digit. Unmatched lanes go to bin 256 of a 512-bin histogram
    (never added), which avoids histogram's ``mask`` argument (missing from older Triton).
    """
    start = tl.program_id(0).to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, n)
    prefix = tl.load(state)
    counts = tl.zeros((512,), tl.int32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < end
        key = tl.load(keys + offs, mask=inb, other=0)
        match = inb & (((key ^ prefix) & high_mask) == 0)
        digit = ((key >> shift) & 0xFF) ^ flip
        counts += tl.histogram(tl.where(match, digit, 256).to(tl.int32), 512)
    bins = tl.arange(0, 512)
    tl.atomic_add(hist + bins, counts, mask=bins < 256)


@triton.jit
def _radix_select_kernel(hist, state, shift, flip):
    """One program: d = the largest digit with #{matching keys with digit >= d} >= need;
    prefix |= (d ^ flip) << shift; need -= #{matching keys with digit > d}."""
    bins = tl.arange(0, 512)
    h = tl.load(hist + bins, mask=bins < 256, other=0).to(tl.int64)
    need = tl.load(state + 1)
    at_or_above = tl.sum(h, 0) - tl.cumsum(h, 0) + h
    d = tl.max(tl.where((at_or_above >= need) & (bins < 256), bins, -1), 0)
    above = tl.sum(tl.where(bins > d, h, 0), 0)
    tl.store(state, tl.load(state) | ((d ^ flip).to(tl.int64) << shift))
    tl.store(state + 1, need - above)


@triton.jit
def _tie_count_kernel(keys, n, state, ties, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """ties[p] = #{i in chunk p: key_i == T}."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, n)
    threshold = tl.load(state)
    count = tl.zeros((BLOCK,), tl.int64)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK).to(tl.int64)
        count += ((tl.load(keys + offs, mask=offs < end, other=0) == threshold) & (offs < end)).to(tl.int64)
    tl.store(ties + tl.program_id(0), tl.sum(count, 0))


@triton.jit
def _topk_keep_kernel(keys, n, state, ties_before, keep, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """keep_i = key_i > T or (key_i == T and #{j < i: key_j == T} < need)."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, n)
    threshold = tl.load(state)
    need = tl.load(state + 1)
    seen = tl.load(ties_before + tl.program_id(0))
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < end
        key = tl.load(keys + offs, mask=inb, other=0)
        tie = (key == threshold) & inb
        rank = seen + tl.cumsum(tie.to(tl.int64), 0) - 1
        tl.store(keep + offs, ((key > threshold) | (tie & (rank < need))).to(tl.int8), mask=inb)
        seen += tl.sum(tie.to(tl.int64), 0)


def _by_dtype(tensors):
    """{dtype: indices of the non-empty tensors of that dtype}, in list order."""
    groups: dict = {}
    for i, s in enumerate(tensors):
        if s.numel():
            groups.setdefault(s.dtype, []).append(i)
    return groups


def topk_mask(scores, k):
    """Bool masks keeping exactly the ``k`` largest scores over all tensors (see reference.topk_mask)."""
    device = scores[0].device
    numels = [s.numel() for s in scores]
    total = sum(numels)
    keys = torch.empty(total, dtype=torch.int64, device=device)
    offsets = [0, *itertools.accumulate(numels)]
    for dtype, idx in _by_dtype(scores).items():
        group = [scores[i] for i in idx]
        tab = _tables.table([group])
        _tables.launch(_order_keys_kernel, tab.n_blocks, tab.ptrs[0], tab.sizes, tab.blocks,
                       _tables.int_column([offsets[i] for i in idx], device), keys, DT=_tables.tl_dtype(dtype),
                       BLOCK=_tables.BLOCK, CHUNK=_tables.CHUNK, ALIGNED=tab.aligned)
    keep = torch.zeros(total, dtype=torch.bool, device=device)
    if k > 0:
        _select_top(keys, k, keep)
    return [m.view_as(s) for m, s in zip(keep.split(numels), scores)]


def _select_top(keys: torch.Tensor, k: int, keep: torch.Tensor) -> None:
    """keep ← the k (>= 1) largest keys, ties to the lower position (radix select, see module doc)."""
    n = keys.numel()
    chunk = _tables.CHUNK
    programs = triton.cdiv(n, chunk)
    state = torch.tensor([0, k], dtype=torch.int64).to(keys.device)  # (prefix, need): mutated on the device
    hist = torch.zeros(8, 512, dtype=torch.int32, device=keys.device)
    for r in range(8):
        shift = 56 - 8 * r
        high_mask = 0 if r == 0 else -(1 << (shift + 8))  # the bits above this digit
        flip = 0x80 if r == 0 else 0
        _tables.launch(_radix_histogram_kernel, programs, keys, n, state, hist[r], shift, high_mask, flip,
                       BLOCK=_tables.BLOCK, CHUNK=chunk)
        _tables.launch(_radix_select_kernel, 1, hist[r], state, shift, flip)
    ties = torch.empty(programs, dtype=torch.int64, device=keys.device)
    _tables.launch(_tie_count_kernel, programs, keys, n, state, ties, BLOCK=_tables.BLOCK, CHUNK=chunk)
    ties_before = torch.cumsum(ties, 0) - ties
    _tables.launch(_topk_keep_kernel, programs, keys, n, state, ties_before, keep, BLOCK=_tables.BLOCK, CHUNK=chunk)


_MAX_M = 128
"""Above this the m x m rank tile of ``_nm_mask_kernel`` stops fitting in registers: the reference runs."""


def nm_mask(scores, n, m):
    """Bool masks keeping the ``n`` largest of every ``m`` consecutive entries along the reduction dim."""
    if m > _MAX_M:
        return reference.nm_mask(scores, n, m)
    out = [torch.empty(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    mp = triton.next_power_of_2(m)
    groups = max(1, 4096 // (mp * mp))
    for dtype, idx in _by_dtype(scores).items():
        cols = [reference.nm_groups(scores[i]).shape[1] for i in idx]
        sizes = [scores[i].numel() // c * math.ceil(c / m) for i, c in zip(idx, cols)]
        tab = _tables.table([[scores[i] for i in idx], [out[i] for i in idx]], sizes=sizes, chunk=groups)
        _tables.launch(_nm_mask_kernel, tab.n_blocks, tab.ptrs[0], tab.ptrs[1], tab.sizes, tab.blocks,
                       _tables.int_column(cols, scores[0].device), n, DT=_tables.tl_dtype(dtype), M=m, MP=mp,
                       GROUPS=groups, ALIGNED=tab.aligned)
    return out
