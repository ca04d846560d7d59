"""pytest-benchmark: sam_step, sam_optimizer_step, sam_adamw_step.

Every implementation side by side; options in conftest.py.
"""
import pytest

from utils import IMPLS, run_op_benchmark


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["sam_step", "sam_optimizer_step", "sam_adamw_step"])
def test_sam_step(benchmark, op, impl, case, device, dtype, with_compile):
    run_op_benchmark(benchmark, op, impl, case, device, dtype, with_compile)
