"""Helpers shared by the tests: per-dtype tolerances, verbose comparisons, backend cases."""
from __future__ import annotations

import pytest
import torch

import sam_kernels

# (dtype, atol, rtol): element-wise results are computed in fp32 and rounded once, so
# low-precision tolerances only need to absorb one rounding plus fp32 reassociation.
DTYPES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.float64, 1e-12, 1e-10),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 1e-2, 1e-2),
]
DTYPE_IDS = [str(d[0]).replace("torch.", "") for d in DTYPES]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """allclose with a message naming the worst element; NaN/Inf must match exactly."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ"
    fin = torch.isfinite(e)
    assert torch.equal(a[~fin & ~torch.isnan(e)], e[~fin & ~torch.isnan(e)]), f"{what}: Inf values differ"
    if fin.any():
        err = (a[fin] - e[fin]).abs()
        bound = atol + rtol * e[fin].abs()
        bad = err > bound
        if bad.any():
            i = int(torch.argmax(err - bound))
            raise AssertionError(f"{what}: {int(bad.sum())} of {fin.sum().item()} elements out of tolerance; worst "
                                 f"actual={a[fin][i].item()!r} expected={e[fin][i].item()!r} atol={atol} rtol={rtol}")


def assert_lists_close(actual, expected, atol, rtol, what=""):
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors != {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, atol, rtol, f"{what}[{i}]")


def assert_lists_equal(actual, expected, what=""):
    """Bitwise equality (NaN payloads included) of two tensor lists."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        if a.numel() == 0:  # nothing to compare (and a 0-size view may keep strides that forbid .view)
            continue
        bits = lambda t: t.clone(memory_format=torch.contiguous_format).view(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(bits(a), bits(e)), \
            f"{what}[{i}] differs bitwise"


def backend_available(name: str, device: str) -> bool:
    info = sam_kernels.backends()[name]
    return info["available"] and device in info["devices"]


def require_backend(name: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not backend_available(name, device):
        pytest.skip(f"backend {name} unavailable on {device}: {sam_kernels.backends()[name]['reason']}")
