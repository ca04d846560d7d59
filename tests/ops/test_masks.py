"""topk_mask and nm_mask: every backend against the eager reference on the op table's samples,
bitwise (ties, NaN, Inf, both zeros, dense and misaligned layouts)."""
from __future__ import annotations

import pytest

from tests.ops.opinfo import COMPILED, backend_param, check_against_eager, require, samples


@backend_param(COMPILED)
@pytest.mark.parametrize("sample", samples("topk_mask", "nm_mask"))
def test_matches_eager(backend, sample):
    check_against_eager(require(backend), sample)
