"""Correctness before speed: one call of an implementation against the eager reference.

The error is reported as the worst |actual − expected| / (atol + rtol·|expected|) over every
output element: ≤ 1 passes. Tolerances are looser than the tests' (tests/utils.py) because the
baselines compute in the storage dtype (the per-parameter loop rounds bf16 after every kernel)
and global sums over 10⁸ elements are reassociated differently by each implementation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .op_specs import OpSpec, State

TOLERANCES = {  # dtype: (atol, rtol)
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _err_ratio(actual: torch.Tensor, expected: torch.Tensor, exact: bool, tol: tuple[float, float]) -> float:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return float("inf")
    if exact or actual.dtype == torch.bool:
        same = torch.equal(actual.contiguous().view(-1).view(torch.uint8),
                           expected.contiguous().view(-1).view(torch.uint8)) if actual.dtype != torch.bool \
            else torch.equal(actual, expected)
        return 0.0 if same else float("inf")
    if actual.numel() == 0:
        return 0.0
    atol, rtol = tol
    a, e = actual.double(), expected.double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return float("inf")
    ok = ~nan_e
    return float(((a[ok] - e[ok]).abs() / (atol + rtol * e[ok].abs())).max()) if ok.any() else 0.0


def _as_list(x) -> list[torch.Tensor]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def compare(spec: OpSpec, dtype: torch.dtype, state: State, result, ref_state: State,
            ref_result) -> tuple[float, Optional[str]]:
    """(worst error ratio, None) or (ratio, what differs) for one call's outputs and return value.

    ``dtype`` is the storage dtype of the inputs: it sets the tolerance, also for fp32 results.
    """
    tol = TOLERANCES[dtype]
    worst, where = 0.0, None
    pairs = [(name, state[name], ref_state[name]) for name in spec.outputs]
    if spec.outputs == ():  # reductions and masks: the return value is the output
        pairs.append(("result", _as_list(result), _as_list(ref_result)))
    for name, actual, expected in pairs:
        if len(actual) != len(expected):
            return float("inf"), f"{name}: {len(actual)} tensors, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            a = a.to(e.dtype) if name == "result" and a.is_floating_point() and e.is_floating_point() else a
            r = _err_ratio(a.detach(), e.detach(), spec.exact, tol)
            if r > worst:
                worst, where = r, f"{name}[{i}]"
    return worst, (where if worst > 1.0 else None)
