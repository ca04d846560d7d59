"""Test setup shared by every test module.

Triton kernels run on CPU under the Triton interpreter; TRITON_INTERPRET must be set before
Triton defines the kernels, so it is set here, before any test module imports sam_kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
