"""Fixtures of the CUDA-emulation tests: the unmodified CUDA sources compiled for the CPU
(build.py) and loaded once per session; ``torch.ops.sam_kernels_emu`` holds the ops, on CPU
tensors. CUDA_EMU_VARIANT=sanitize loads the ASan + UBSan build instead (test_sanitize.py runs
these tests that way). The opt-in markers run only when ``-m`` names them."""
from __future__ import annotations

import os

import pytest
import torch

from tests.cuda_emu.build import build

OPT_IN = ("cuda_emu_sanitize", "cuda_emu_large")


def pytest_collection_modifyitems(config, items):
    expr = config.getoption("markexpr") or ""
    for item in items:
        for name in OPT_IN:
            if item.get_closest_marker(name) is not None and name not in expr:
                item.add_marker(pytest.mark.skip(reason=f"opt-in: run with -m {name}"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The emulation runs on one thread; the reference ops here too: on tensors this small torch's
    intra-op threads only add their synchronization (several times the work on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def emu():
    """``torch.ops.sam_kernels_emu`` (the emulated CUDA ops), built first unless cached."""
    torch.ops.load_library(str(build(os.environ.get("CUDA_EMU_VARIANT", "default"))))
    return torch.ops.sam_kernels_emu


@pytest.fixture(scope="session")
def probes(emu):
    """``torch.ops.cuda_emu``: the harness's probes of the launcher and of the emulated runtime."""
    return torch.ops.cuda_emu


@pytest.fixture(params=["small", "auto"])
def tables(request, monkeypatch):
    """Both kernel-argument table sizes: 4 KB forced, and the default (32 KB: the emulated driver
    allows them) for groups a 4 KB table does not hold."""
    monkeypatch.setenv("SAM_KERNELS_CUDA_TABLES", request.param)
    return request.param
