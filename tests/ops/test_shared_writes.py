"""The CPU ops refuse calls whose entries share memory themselves, before writing (the Python layer
then names the entries; tests/loops/test_aliased_params.py checks its messages)."""
import pytest
import torch

import sam_kernels as sk
from tests.ops.shared_writes_cases import check_allowed, check_refused

pytestmark = pytest.mark.skipif(not sk.backends()["cpp"]["available"], reason="the C++ extension is not built")


def test_cpu_ops_refuse_memory_shared_across_entries():
    check_refused(torch.ops.sam_kernels)


def test_cpu_ops_allow_a_tensor_shared_within_its_entry():
    check_allowed(torch.ops.sam_kernels)
