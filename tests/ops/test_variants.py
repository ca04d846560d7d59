"""The variants' element-wise ops (renormalize_, fisher_accumulate_, looksam_store_, looksam_apply_, mix_,
ema_update_) and GCSAM's per-row centralize_:
every backend against the eager reference on the op table's samples."""
from __future__ import annotations

import pytest

from tests.ops.opinfo import COMPILED, backend_param, check_against_eager, require, samples


@backend_param(COMPILED)
@pytest.mark.parametrize("sample", samples("renormalize_", "fisher_accumulate_", "looksam_store_", "looksam_apply_", "mix_",
                                           "ema_update_", "centralize_"))
def test_matches_eager(backend, sample):
    check_against_eager(require(backend), sample)
