"""Group-level wrappers over ``torch.ops.sam_kernels``, with the signatures of the eager reference.

The compiled ops dispatch on the tensors' device, so these wrappers serve both the ``cpp`` (CPU)
and the ``cuda`` backends; each backend module keeps only the ops its device has kernels for.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..._extension import has_kernel
from ..contract import OPS, OpInfo, ops_of


def _wrapper(op: OpInfo, namespace: str = "sam_kernels") -> Callable:
    """Calls ``torch.ops.<namespace>.<op>`` with the reference's arguments. Where the reference
    takes None for a list the schema requires (SGD's buffers without momentum), it passes []; a
    mask op's results come back as a list."""
    compiled = getattr(getattr(torch.ops, namespace), op.name).default
    params = inspect.signature(op.reference).parameters
    required_lists = [a.name for a in op.parsed.arguments if str(a.type) == "List[Tensor]"]
    nullable = [(op.arguments.index(n), n) for n in required_lists if "Optional" in str(params[n].annotation)]

    def run(*args, **kwargs):
        if nullable:
            args = list(args)
            for i, name in nullable:
                if i < len(args) and args[i] is None:
                    args[i] = []
                elif kwargs.get(name, ()) is None:
                    kwargs[name] = []
        out = compiled(*args, **kwargs)
        return list(out) if op.kind == "mask" else out

    run.__name__ = run.__qualname__ = op.name
    run.__doc__ = f"torch.ops.{namespace}.{op.name}: {op.doc}"
    return run


def ops_with_kernel(dispatch_key: str, backend: str) -> dict[str, Callable]:
    """Wrappers of ``backend``'s ops (from the table) whose kernel for ``dispatch_key`` is registered."""
    return {op.name: _wrapper(op) for op in ops_of(backend) if has_kernel(op.name, dispatch_key)}


def wrapper(name: str, namespace: str = "sam_kernels") -> Callable:
    """The group-level wrapper of the compiled op ``name`` (whatever devices it has kernels for);
    ``namespace``: the ``torch.ops`` namespace holding it (another build of the same sources
    registers the op table's schemas under its own)."""
    return _wrapper(OPS[name], namespace)
