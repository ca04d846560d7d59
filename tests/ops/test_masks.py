"""topk_mask and nm_mask: every backend against the eager reference on the op table's samples,
bitwise (ties, NaN, Inf, both zeros, dense and misaligned layouts)."""
from __future__ import annotations

import pytest
import torch

from tests.ops.opinfo import ALL, COMPILED, backend_param, check_against_eager, require, samples


@backend_param(COMPILED)
@pytest.mark.parametrize("sample", samples("topk_mask", "nm_mask"))
def test_matches_eager(backend, sample):
    check_against_eager(require(backend), sample)


@backend_param(ALL)
@pytest.mark.parametrize("row,kept", [
    ([1.0, float("nan"), 2.0, 3.0], [False, False, True, True]),      # NaN inside a group ranks last
    ([float("nan"), 1.0, 0.0, -1.0], [False, True, True, False]),     # and when it leads the group
    ([float("nan"), float("nan"), -5.0, float("-inf")], [False, False, True, True]),
])
def test_nm_mask_ranks_nan_last(backend, row, kept):
    """2:4 by hand: the two largest scores of each group, NaN below every number (-inf included)."""
    backend = require(backend)
    mask = backend.call("nm_mask", ([torch.tensor(row, device=backend.device)], 2, 4), {})[0]
    assert mask.cpu().tolist() == kept
