"""Multi-tensor machinery shared by every Triton op: pointer tables, their cache, the launcher.

One kernel launch covers every tensor of a group, whatever their number (DESIGN.md §6). The host
describes the group with int64 tables in device memory:

- ``ptrs[l, t]``: data pointer of tensor ``t`` of list ``l``; a kernel loads it and casts it to a
  typed pointer (``tl.load(ptrs + t).to(tl.pointer_type(DT))``), which also works under
  ``TRITON_INTERPRET=1`` for CPU tensors (checked with Triton 3.8);
- ``sizes[t]``: how many units tensor ``t`` has (elements, or N:M groups for ``nm_mask``);
- ``blocks[b] = (t, start)``: program ``b`` handles units ``[start, min(start + chunk, sizes[t]))``
  of tensor ``t``. Zero-size tensors get no block.

A table is a pure function of (device, pointers, sizes, chunk), so it is cached under that
key: the same parameter set reuses it, and a re-created tensor (new pointer, e.g. grads after
``zero_grad(set_to_none=True)``) builds a new one automatically. A cache hit is always correct,
even when freed memory is reused by other tensors at the same addresses.

Each program walks its chunk BLOCK elements at a time: unmasked iterations over the full blocks,
then at most one masked tail. When every pointer is 16-byte aligned (checked on the host, passed
as the ALIGNED constexpr) the pointers are hinted with ``tl.multiple_of``, so the full blocks get
128-bit vector loads/stores; offsets are int64 (tensors beyond 2^31 elements).

BLOCK/CHUNK are fixed, not autotuned: every kernel here works in place on tensors reached through
the tables, so the autotuner (which benchmarks each config by re-running the kernel and can only
restore the tensors it is passed directly) would apply the updates several times. They are not
tuned on a GPU yet (none was available); the cost model is memory bandwidth, so they matter little
beyond giving every SM several programs.

Host float arguments are declared ``tl.float64`` and rounded once to the compute dtype in the
kernel (:func:`scalar`): fp64 groups get full-precision hyper-parameters, fp32 groups the same
rounding torch applies to Python scalars. Floats are never constexpr (no recompiles).
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ...reference import acc_dtype

BLOCK = 1024
"""Elements per loop iteration of a program (a power of two)."""
CHUNK = 8 * BLOCK
"""Elements per program (a multiple of BLOCK): small enough to fill a GPU with programs for ~10M-parameter models."""
NUM_WARPS = 4

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def tl_dtype(dtype: torch.dtype):
    """Triton element type of a float storage dtype."""
    return _TL_DTYPES[dtype]


def compute_dtype(dtype: torch.dtype):
    """Triton compute/accumulation type: fp64 for fp64 tensors, else fp32 (reference.acc_dtype)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class Table:
    ptrs: torch.Tensor
    """int64 [n_lists, n_tensors] data pointers; ``ptrs[l]`` is the row a kernel gets for list ``l``."""
    sizes: torch.Tensor
    """int64 [n_tensors] units per tensor."""
    blocks: torch.Tensor
    """int64 [n_blocks, 2] (tensor index, first unit) per program."""
    n_blocks: int
    aligned: bool
    """Every pointer is 16-byte aligned: kernels may hint vectorized access."""


_CACHE: "OrderedDict[tuple, Table]" = OrderedDict()
_CACHE_SIZE = 64


def table(lists: Sequence[Optional[Sequence[torch.Tensor]]], *, sizes: Optional[Sequence[int]] = None,
          chunk: Optional[int] = None) -> Table:
    """The (cached) table of aligned tensor lists (None entries are skipped).

    ``sizes`` defaults to the numels, ``chunk`` (units per program) to CHUNK, read at call time.
    """
    chunk = CHUNK if chunk is None else chunk
    lists = [lst for lst in lists if lst is not None]
    first = lists[0]
    device = first[0].device
    sizes = tuple(t.numel() for t in first) if sizes is None else tuple(sizes)
    ptrs = tuple(t.data_ptr() for lst in lists for t in lst)
    key = (device, chunk, ptrs, sizes)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    n = len(first)
    size_t = torch.tensor(sizes, dtype=torch.int64)
    counts = (size_t + chunk - 1) // chunk
    tensor_of_block = torch.repeat_interleave(torch.arange(n), counts)
    first_block = torch.cumsum(counts, 0) - counts
    start = (torch.arange(tensor_of_block.numel()) - first_block[tensor_of_block]) * chunk
    blocks = torch.stack([tensor_of_block, start], 1)
    # One host->device copy for the whole table; the fields are views into it.
    packed = torch.cat([torch.tensor(ptrs, dtype=torch.int64), size_t, blocks.reshape(-1)])
    packed = packed.to(device, non_blocking=True)
    n_ptrs = len(ptrs)
    entry = Table(
        ptrs=packed[:n_ptrs].view(len(lists), n),
        sizes=packed[n_ptrs:n_ptrs + n],
        blocks=packed[n_ptrs + n:].view(-1, 2),
        n_blocks=int(blocks.shape[0]),
        aligned=all(p % 16 == 0 for p in ptrs),
    )
    return _remember(key, entry)


def int_column(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small per-tensor int64 device column that is not part of a table (RNG keys, offsets), cached too."""
    key = (device, "column", tuple(values))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    return _remember(key, torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True))


def _remember(key, value):
    """Insert into the LRU cache, evicting the least recently used entry beyond _CACHE_SIZE."""
    _CACHE[key] = value
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


# Floating-point contraction (a*b + c -> FMA) in every kernel of this backend: on, as nvcc does for
# the CUDA kernels and for torch's own eager CUDA kernels (their default), so the backends round
# alike. Chosen here, per launch, rather than left to TRITON_DEFAULT_FP_FUSION (the default this
# overrides), so a user's environment does not change these kernels' numerics; only Triton's
# TRITON_FORCE_DISABLE_FP_FUSION still turns it off. docs/verification.md.
FP_FUSION = True


def launch(kernel, n_programs: int, *args, **kwargs) -> None:
    """Launch ``kernel`` on a 1-D grid; every Triton launch of this backend goes through here."""
    kernel[(n_programs,)](*args, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION, **kwargs)


def launch_over(kernel, lists: Sequence[Optional[Sequence[torch.Tensor]]], *args, rows_after_args: int = 0,
                **constexprs) -> Table:
    """Launch an element-wise/partial-reduction ``kernel`` once over the table of ``lists``; returns the table.

    The kernel takes one pointer row per entry of ``lists`` (an optional list passed as None, which
    the kernel compiles out through a constexpr flag, gets row 0 in its place), then ``sizes, blocks,
    *args`` and the constexprs DT, CDT, BLOCK, CHUNK, ALIGNED and ``constexprs``. The rows of the
    last ``rows_after_args`` lists come after ``args`` instead: an optional list added to a kernel
    as its last parameter leaves the kernel's code without it as it was. An all-empty group
    launches nothing.
    """
    tab = table(lists)
    if tab.n_blocks:
        present = iter(tab.ptrs)
        rows = [tab.ptrs[0] if lst is None else next(present) for lst in lists]
        split = len(rows) - rows_after_args
        dtype = lists[0][0].dtype
        launch(kernel, tab.n_blocks, *rows[:split], tab.sizes, tab.blocks, *args, *rows[split:], DT=tl_dtype(dtype),
               CDT=compute_dtype(dtype), BLOCK=BLOCK, CHUNK=CHUNK, ALIGNED=tab.aligned, **constexprs)
    return tab


# --------------------------------------------------------------------------- telemetry outputs

def check_sums_tensor(op: str, name: str, out, numel: int, params: Sequence[torch.Tensor]) -> None:
    """A telemetry output a kernel adds into (csrc/common.h check_sums_tensor): a contiguous float32/
    float64 tensor of ``numel`` elements, at most 1-D, on the params' device. Raises TypeError
    (not a tensor, other dtype) or ValueError (shape, layout, device)."""
    if not isinstance(out, torch.Tensor) or out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be a float32 or float64 tensor, got "
                        f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.numel() != numel or out.dim() > 1 or not out.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous tensor of {numel} element(s) (at most 1-D), got shape "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    if out.device != params[0].device:
        raise ValueError(f"{op}: {name} is on {out.device} but the params are on {params[0].device}")


def partials_for(lists: Sequence[Optional[Sequence[torch.Tensor]]], out: Optional[torch.Tensor],
                 width: int) -> torch.Tensor:
    """The [n_blocks, width] per-program partial sums of a kernel that adds into ``out`` over the
    table of ``lists`` (fp32, fp64 for fp64 tensors: the compute type); without ``out``, a
    placeholder pointer (the kernel's flag compiles its use out)."""
    first = lists[0][0]
    if out is None:
        return first
    return torch.empty(table(lists).n_blocks, width, dtype=acc_dtype(first.dtype), device=first.device)


def add_partials(partials: torch.Tensor, out: torch.Tensor, n_blocks: int, used: int) -> None:
    """out[j] += Σ_b partials[b, j] for j < ``used`` (one program, fixed order: deterministic; the
    rest of ``out`` keeps its bits), then bumps ``out``'s version: it is written through a raw
    pointer, which autograd cannot see (the compiled ops bump it in the dispatcher)."""
    if n_blocks:
        launch(add_partials_kernel, 1, partials, out, n_blocks, WIDTH=partials.shape[1], USED=used, BLOCK=BLOCK)
    if not out.is_inference():
        torch.autograd.graph.increment_version(out)


@triton.jit
def add_partials_kernel(partials, out, n, WIDTH: tl.constexpr, USED: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] += Σ_b partials[b, j], b = 0..n-1, for j < USED: the column total in the partials'
    dtype, BLOCK lanes then tl.sum (a fixed order), rounded once to out's dtype and added there."""
    for j in tl.static_range(USED):
        acc = tl.zeros((BLOCK,), partials.dtype.element_ty)
        for off in range(0, n, BLOCK):
            rows = off + tl.arange(0, BLOCK)
            acc += tl.load(partials + WIDTH * rows + j, mask=rows < n, other=0.0)
        tl.store(out + j, tl.load(out + j) + tl.sum(acc, 0).to(out.dtype.element_ty))


# --------------------------------------------------------------------------- device-side helpers

@triton.jit
def chunk_bounds(blocks, sizes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor index, first unit, end of the full BLOCKs, end unit) of this program's chunk, int64.

    Kernels run unmasked iterations over [start, split) and at most one masked one over
    [split, end): only unmasked accesses get vectorized (128-bit) by the compiler.
    """
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(blocks + 2 * b)
    start = tl.load(blocks + 2 * b + 1)
    end = tl.minimum(start + CHUNK, tl.load(sizes + t))
    split = start + (end - start) // BLOCK * BLOCK
    return t, start, split, end


@triton.jit
def load(ptr, mask):
    """``tl.load``; ``mask`` is None on full blocks (unmasked, vectorizable), else masked lanes read 0."""
    if mask is None:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0)


@triton.jit
def store(ptr, value, mask):
    """``tl.store``; ``mask`` is None on full blocks (unmasked, vectorizable)."""
    if mask is None:
        tl.store(ptr, value)
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def tensor_ptr(ptrs, t, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to tensor ``t`` of the list whose pointer row is ``ptrs``."""
    p = tl.load(ptrs + t).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def block_offsets(off, BLOCK: tl.constexpr):
    """int64 offsets off..off+BLOCK-1; ``off`` is a multiple of BLOCK (chunks start at multiples of CHUNK)."""
    offs = off + tl.arange(0, BLOCK).to(tl.int64)
    return tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)


@triton.jit
def scalar(x, DT: tl.constexpr):
    """A host float argument (declared ``tl.float64``) as a DT scalar, rounded once like torch does."""
    return tl.full((), x, DT)


@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32/fp64 ``x`` rounded once to the storage type DT, to nearest even.

    bf16 is rounded explicitly on the bits, like torch (NaN becomes the quiet NaN 0x7FC0): the
    Triton 3.8 interpreter truncates fp32 -> bf16 casts; this keeps interpreter and GPU results
    bit-identical to torch's rounding.
    """
    if DT == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def sqrt_ieee(x):
    """Correctly rounded sqrt (``tl.sqrt`` is approximate for fp32 on GPUs; fp64 sqrt is exact)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def div_ieee(x, y):
    """Correctly rounded division (``/`` is approximate for fp32 on GPUs), as torch computes it."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)
