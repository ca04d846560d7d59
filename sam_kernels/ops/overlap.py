"""Memory shared between the tensors of one op call (ours).

The fused kernels read and write entry after entry (and, on a GPU, all at once): when a tensor an op
writes shares memory with a tensor of ANOTHER entry (an aliased parameter listed twice, a gradient
that is a view of another parameter, two buffers over one storage), what an entry reads depends on
whether another entry was already written, so the result depends on the launch. Such calls are
rejected with ``ValueError`` before anything is written. Within one entry, the lists may hold the
same tensor or the same view (a parameter that is its own backup; a gradient that is its parameter):
every kernel reads an element's inputs before it writes that element.

The check compares data pointers, one set per call of an op that writes: tensors that start at the
same address. Views of one storage that overlap from different start addresses are not seen here
(the optimizer rejects such parameters when it is built, see ``sam_kernels.optim.aliases``). The
compiled ops make the same check in C++ before writing (``check_no_shared_writes`` in
csrc/common.h, where the lists are already unpacked); a call they refuse comes here, for the message
that names the entries.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Optional, Sequence

import torch

from .contract import OPS
from .dtensor import is_dtensor

Tensors = Sequence[torch.Tensor]

WRITES: dict[str, tuple[str, tuple[str, ...]]] = {
    op.name: (op.arguments[0], op.writes) for op in OPS.values() if op.kind == "update"}
"""op -> (the name of its first list, the arguments it writes), from the op table's schemas."""

_data_ptr = torch.Tensor.data_ptr


def check(op: str, primary: Tensors, lists: dict[str, Optional[Tensors]]) -> None:
    """``ValueError`` when a tensor ``op`` writes shares its start address with a tensor of another
    entry (or with another view at its own entry). Malformed lists are left to the list checks."""
    spec = WRITES.get(op)
    if spec is None or not isinstance(primary, (list, tuple)) or not primary or torch.compiler.is_compiling():
        return
    first = primary[0]
    if not isinstance(first, torch.Tensor) or is_dtensor(first) or first.device.type == "meta":
        return
    present = [(n, lst) for n, lst in lists.items()
               if isinstance(lst, (list, tuple)) and len(lst) == len(primary)]
    try:
        ptrs = list(map(_data_ptr, chain(primary, *(lst for _, lst in present))))
        if len(set(ptrs)) == len(ptrs):
            return
        # the same tensor as the entry's first (a param that is its own backup) counts once
        ptrs = list(map(_data_ptr, primary))
        for _, lst in present:
            ptrs.extend([t.data_ptr() for t, p in zip(lst, primary) if t is not p])
    except (AttributeError, RuntimeError, TypeError):  # a non-tensor entry, no storage: the list checks speak
        return
    if len(set(ptrs)) != len(ptrs):
        _explain(op, spec, primary, present)


def _explain(op: str, spec: tuple, primary: Tensors, present: list) -> None:
    first_name, written = spec
    seen: dict = defaultdict(list)
    for name, lst in [(first_name, primary), *present]:
        for i, t in enumerate(lst):
            if t.numel():
                seen[t.data_ptr()].append((name, i, t, name in written))
    for found in seen.values():
        if len(found) < 2 or not any(w for *_, w in found):
            continue  # read-only sharing cannot change a result
        name0, i0, t0, _ = found[0]
        for name1, i1, t1, _ in found[1:]:
            if i1 != i0 or t1.stride() != t0.stride() or t1.dtype != t0.dtype:
                raise ValueError(
                    f"{op}: {name0}[{i0}] and {name1}[{i1}] share memory, and {op} writes one of them: the result "
                    f"would depend on the order of the writes. Give each entry memory of its own (parameters "
                    f"tied after a sam_kernels optimizer was built: call its find_aliases())")
