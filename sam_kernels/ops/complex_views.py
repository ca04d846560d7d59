"""Complex tensors as real views: the ops treat real and imaginary parts as two floats, as torch's
optimizers do."""
from __future__ import annotations

from typing import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def as_real(primary: Tensors, lists: dict) -> tuple[Tensors, dict, dict]:
    """Complex entries as ``torch.view_as_real`` views (a mask of a complex entry is broadcast over
    the real/imaginary pair); (primary, lists, {id(original list): converted list})."""
    cplx = [isinstance(t, torch.Tensor) and t.is_complex() for t in primary]
    if not any(cplx):
        return primary, lists, {}

    def real(lst, masks=False):
        if masks:
            return [m.unsqueeze(-1).expand(*m.shape, 2) if c and isinstance(m, torch.Tensor) else m
                    for m, c in zip(lst, cplx)]
        return [torch.view_as_real(t) if isinstance(t, torch.Tensor) and t.is_complex() else t for t in lst]

    converted = {id(primary): real(primary)}
    out = {}
    for name, lst in lists.items():
        if lst is None or not isinstance(lst, (list, tuple)) or len(lst) != len(primary):
            out[name] = lst  # _check_lists names the problem
            continue
        converted[id(lst)] = out[name] = real(lst, masks=name == "masks")
    return converted[id(primary)], out, converted
