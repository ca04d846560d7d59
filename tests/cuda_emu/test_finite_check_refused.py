"""The CUDA kernels do not take the fused descent's finite check (``momentum_out`` / ``nonfinite``):
they refuse it with NotImplementedError before writing anything (the optimizer keeps the separate
read on GPU parameters; the eager and CPU kernels take it: tests/ops/test_finite_descent.py)."""
from __future__ import annotations

import pytest
import torch


def test_sgd_finite_check_arguments_refused(emu):
    torch.manual_seed(0)
    make = lambda: [torch.randn(5), torch.randn(3, 4)]  # noqa: E731
    params, backups, grads, bufs, outs = make(), make(), make(), make(), make()
    grads[1][0, 0] = float("nan")
    flag = torch.zeros(())
    before = [[t.clone() for t in lst] for lst in (params, bufs, outs)]
    with pytest.raises(NotImplementedError, match="not implemented by the CUDA kernels"):
        emu.sgd_restore_step_(params, backups, grads, bufs, 0.1, 0.9, 0.0, 0.0, False, False, False, None, None,
                              None, None, outs, flag)
    for lst, kept in zip((params, bufs, outs), before):
        assert all(torch.equal(a, b) for a, b in zip(lst, kept))
    assert float(flag) == 0.0
