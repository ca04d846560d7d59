"""pytest-benchmark: topk_mask, nm_mask.

Every implementation side by side; options in conftest.py.
"""
import pytest

from utils import IMPLS, run_op_benchmark


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["topk_mask", "nm_mask"])
def test_masks(benchmark, op, impl, case, device, dtype, with_compile):
    run_op_benchmark(benchmark, op, impl, case, device, dtype, with_compile)
