"""pytest-benchmark: grad_sq_norm, dot.

Every implementation side by side; options in conftest.py.
"""
import pytest

from utils import IMPLS, run_op_benchmark


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["grad_sq_norm", "dot"])
def test_norm(benchmark, op, impl, case, device, dtype, with_compile):
    run_op_benchmark(benchmark, op, impl, case, device, dtype, with_compile)
