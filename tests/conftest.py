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


@pytest.fixture(autouse=True)
def _small_models_take_the_large_paths(monkeypatch):
    """The tests' models are small: the size floors below which a step keeps the separate finite read
    (``IN_PASS_MIN_MEAN_NUMEL``) or a gradient its spare buffer (``handover.MIN_NUMEL``) are lifted,
    so that every loop runs the paths a large model runs. The floors' own tests undo this."""
    from sam_kernels.optim import base_step, handover
    monkeypatch.setattr(base_step, "IN_PASS_MIN_MEAN_NUMEL", 0)
    monkeypatch.setattr(handover, "MIN_NUMEL", 0)
