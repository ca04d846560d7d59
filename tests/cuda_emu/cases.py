"""Inputs and comparisons shared by the CUDA-emulation tests."""
from __future__ import annotations

import torch

from sam_kernels.ops import reference as ref

CHUNK = 65536  # elements per block (multi_tensor_apply.cuh)

# One group: one-element and tiny tensors, a zero-size one, exact vector multiples, a tensor of
# several chunks with a tail, one of exactly one chunk.
SIZES = [1, 3, 0, 8, 1000, CHUNK, 2 * CHUNK + 5, 17]

# Reductions accumulate in fp32 (fp64 for fp64) in another order than the eager reference.
def reduce_rtol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def randn(sizes, dtype, seed, scale=1.0, misaligned=False):
    """Seeded normal tensors (drawn in fp64, then cast). ``misaligned``: views at storage offset 1,
    off the 16-byte grid (the kernels' scalar path)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        t = (torch.randn(n + misaligned, dtype=torch.float64, generator=g) * scale).to(dtype)
        out.append(t[1:] if misaligned else t)
    return out


def masks_for(sizes, seed, misaligned=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        m = torch.rand(n + misaligned, generator=g) < 0.6
        out.append(m[1:] if misaligned else m)
    return out


def clone(ts):
    """Copies with the same storage offset (a misaligned view stays misaligned)."""
    out = []
    for t in ts:
        base = torch.empty(t.numel() + t.storage_offset(), dtype=t.dtype)
        c = base[t.storage_offset():].view(t.shape)
        c.copy_(t)
        out.append(c)
    return out


def keys(n, seed=1234):
    return [ref.tensor_key(seed, i) for i in range(n)]


def nonempty(ts, sizes):
    return [t for t, n in zip(ts, sizes) if n]
