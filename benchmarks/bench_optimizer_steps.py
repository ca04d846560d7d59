"""pytest-benchmark: sgd_restore_step_, adamw_restore_step_.

Every implementation side by side; options in conftest.py.
"""
import pytest

from utils import IMPLS, run_op_benchmark


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["sgd_restore_step_", "adamw_restore_step_"])
def test_optimizer_steps(benchmark, op, impl, case, device, dtype, with_compile):
    run_op_benchmark(benchmark, op, impl, case, device, dtype, with_compile)
