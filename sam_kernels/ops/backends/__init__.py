"""The backends of :mod:`sam_kernels.ops.dispatch`, one module each.

A backend module exposes ``OPS`` (op name -> group-level function with the signature of the
op's eager reference, for the ops of :data:`..contract.OPS` that it serves), ``DEVICES`` (device
types it runs on) and ``unavailable_reason() -> str | None``; ``CHECKS_LISTS = True`` where its
functions check the lists completely and reject a call before writing anything.

- ``eager``: the reference (:mod:`..reference`), every device;
- ``extension``: wrappers over ``torch.ops.sam_kernels`` shared by ``cpp`` (CPU) and ``cuda``;
- ``triton``: multi-tensor Triton kernels, one module per op family.
"""
