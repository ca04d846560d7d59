"""What the CUDA-kernel test files share (their ``tables`` fixture is in conftest.py): the skip when
the extension was built without CUDA kernels (the files are GPU-marked; without a GPU they skip
anyway) and seeded inputs."""
from __future__ import annotations

import pytest
import torch

from sam_kernels._extension import extension_error, has_kernel


def need_cuda_kernel(op: str) -> None:
    """Skip unless ``op`` has a CUDA kernel (a GPU is there but the extension was built CPU-only)."""
    if torch.cuda.is_available() and not has_kernel(op, "CUDA"):
        pytest.skip(extension_error() or "sam_kernels._C was built without CUDA kernels")


def randn(sizes, dtype, seed, scale=1.0, device="cuda"):
    """Seeded normal tensors of ``sizes`` (drawn in fp64 on the device, then cast: the same values
    whatever ``dtype``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(n, device=device, dtype=torch.float64, generator=g) * scale).to(dtype) for n in sizes]


def capture(step) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``step()``, run once on a side stream first (allocator, lazy init), as
    torch's documentation does it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
