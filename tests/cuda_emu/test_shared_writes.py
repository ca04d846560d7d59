"""The CUDA ops (emulated) refuse calls whose entries share memory, before writing."""
import pytest

from tests.ops.shared_writes_cases import check_allowed, check_refused

pytestmark = pytest.mark.cuda_emu


def test_cuda_ops_refuse_memory_shared_across_entries(emu):
    check_refused(emu)


def test_cuda_ops_allow_a_tensor_shared_within_its_entry(emu):
    check_allowed(emu)
