"""``sam_kernels.ops``: the fused per-parameter work of a SAM step, one contract per op.

Each op takes lists of tensors, groups them by (device, dtype, layout agreement) and runs the
backend chosen by :mod:`sam_kernels.ops.dispatch` (see ``backends()``); ``last_call`` /
``recording()`` tell which backend ran which part; ``reference`` holds the eager spec.
"""
from . import api, contract, reference
from .dispatch import backends, get_backend, last_call, last_used, recording, set_backend
from .dtensor import accepts_dtensor

# One public function per op of the table; DTensor arguments (FSDP2) run on their local shards
# with global reductions (see ops/dtensor.py).
globals().update({name: accepts_dtensor(getattr(api, name)) for name in contract.OPS})

__all__ = [*contract.OPS, "backends", "set_backend", "get_backend", "last_call", "last_used", "recording",
           "reference"]
