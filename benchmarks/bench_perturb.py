"""pytest-benchmark: perturb_, restore_.

Every implementation side by side; options in conftest.py.
"""
import pytest

from utils import IMPLS, run_op_benchmark


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["perturb_", "restore_"])
def test_perturb(benchmark, op, impl, case, device, dtype, with_compile):
    run_op_benchmark(benchmark, op, impl, case, device, dtype, with_compile)
