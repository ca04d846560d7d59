"""The loop matrix runs tiny models: one intra-op thread is faster than two (and than a shared machine's many).

``cuda_emu_backend``: the CUDA kernels, built for the CPU by the emulation (tests/cuda_emu), as the
dispatch backend ``cuda_emu`` (tests/loops/cuda_emu_backend.py)."""
import os

import pytest
import torch

from sam_kernels.ops import dispatch, fake


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def _cuda_emu_module():
    """Loads the emulation library (built first unless cached); the backend module over its ops."""
    from tests.cuda_emu.build import build

    torch.ops.load_library(str(build(os.environ.get("CUDA_EMU_VARIANT", "default"))))
    from tests.loops import cuda_emu_backend as module  # its OPS are read from the library just loaded
    fake.register(module.NAMESPACE)  # torch.compile traces the emulated ops as it does the real ones
    return module


@pytest.fixture(scope="module")
def cuda_emu_backend(_cuda_emu_module):
    """The emulated CUDA ops registered as dispatch backend ``cuda_emu`` for one test module (other
    modules see only the built-in backends); the backend's name."""
    dispatch.register_backend(_cuda_emu_module.NAME, _cuda_emu_module.__name__)
    yield _cuda_emu_module.NAME
    dispatch.unregister_backend(_cuda_emu_module.NAME)
