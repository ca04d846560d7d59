"""pytest-benchmark: renormalize_, fisher_accumulate_, looksam_store_, looksam_apply_.

Every implementation side by side; options in conftest.py.
"""
import pytest

from utils import IMPLS, run_op_benchmark


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["renormalize_", "fisher_accumulate_", "looksam_store_", "looksam_apply_"])
def test_variants(benchmark, op, impl, case, device, dtype, with_compile):
    run_op_benchmark(benchmark, op, impl, case, device, dtype, with_compile)
