"""The loop matrix runs tiny models: one intra-op thread is faster than two (and than a shared machine's many)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
