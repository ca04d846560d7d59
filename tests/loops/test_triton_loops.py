"""The Triton backend in the main loops, under the Triton interpreter on CPU (slow: a small subset of
rows, the kernels' other cases are covered by tests/ops). Each against the hand reference.

tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA device; with one, Triton runs on the
GPU and these CPU runs are skipped by ``require_backend`` (as in tests/ops)."""
from __future__ import annotations

import pytest

from tests.loops.harness import Run
from tests.loops.matrix import cases
from tests.optim.variants import variant
from tests.utils import require_backend

ROWS = [variant(n) for n in ("SAM", "ASAM", "StableSAM", "LookSAM", "SparseSAM-nm", "GSAM", "WSAM", "GCSAM")]


def triton_cases(loop):
    return cases(loop, variants=ROWS, backends=("triton",))


@pytest.mark.parametrize("info,backend", triton_cases("manual"))
def test_triton_manual(info, backend):
    require_backend("triton", "cpu")
    Run(info, backend).train("manual", steps=3)


@pytest.mark.parametrize("info,backend", triton_cases("closure"))
def test_triton_closure(info, backend):
    require_backend("triton", "cpu")
    Run(info, backend).train("closure", steps=3)
