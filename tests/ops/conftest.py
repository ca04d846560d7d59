"""Fixtures of the op tests."""
from __future__ import annotations

import pytest


@pytest.fixture(params=["small", "auto"])
def tables(request, monkeypatch):
    """CUDA kernels: both kernel-argument table sizes, 4 KB forced and the default (32 KB where the
    driver allows)."""
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", request.param)
    return request.param
