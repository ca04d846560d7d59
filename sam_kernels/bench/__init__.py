"""Benchmarks of sam_kernels: ``python -m sam_kernels.bench`` (``--help`` says what it answers).

Modules: ``cases`` (parameter lists), ``steps`` (one SAM optimizer step written each way a user
could: sam_kernels, torch.compile, foreach, the popular class's loop, pytorch-optimizer),
``baselines`` (those hand-written steps and per-op loops), ``op_specs`` (bytes floors and how each
implementation calls each op), ``state`` and ``check`` (per-op inputs and correctness),
``measure`` (paired interleaved rounds, ratio intervals), ``verdict`` (targets), ``session`` (one
suite on one case), ``results`` (rows, tables, plot), ``noise`` (the footer's facts),
``environment``; ``telemetry_bench`` (telemetry modes side by side, same measurement).

Result rows (JSON lines, one object per implementation and case; ``OUT/<device>.jsonl``):

============== ===============================================================================
suite          ``"step"`` (whole SAM optimizer step) or ``"op"`` (one op of ``op_specs``)
op             ``"sam_sgd_step"`` for the step suite, else the op's name
case           parameter list (``cases``); ``tensors``, ``numel``: its size
provider       implementation (names in ``steps``; for ops: loop, eager, cpp, cuda, triton)
dtype          parameter dtype, e.g. ``"float32"``
device         device name with cores and threads; ``device_slug`` (file name); ``threads``
median_ms      median time of one call; ``p20_ms``, ``p80_ms``; ``rounds`` (interleaved rounds)
vs             the reference provider (sam_kernels at default settings on the device)
ratio          median over rounds of (this call's time / the reference's in the same round)
ratio_low/high interval of ``ratio`` at confidence ``level`` (sign-test order statistics of the
               medians of ``blocks`` blocks of consecutive rounds)
target         the ratio this row must reach (``verdict``; null: none); ``verdict``: met, missed,
               unresolved or null
floor_bytes    bytes the work must move at the least (``op_specs``); ``copy_gbps``: bandwidth of
               a fp32 copy timed in the same rounds (on a CPU counting its write-allocate read:
               three passes); ``floor_fraction``: floor bytes / copy
               bandwidth / median time (1.0 = at the memory floor)
load           ``others_cores``, ``steal_cores`` (CPU time others took, /proc/stat), ``window_s``,
               ``loadavg_1min``, while the case was timed
setup_s        seconds of the untimed check and first call (torch.compile compiles here)
skipped        why the provider did not run (null: it ran); ``mismatch``: where its result was
               wrong (then not timed)
commit, dirty  git commit of the code and whether it had uncommitted changes
versions       torch, triton, cuda, python, sam_kernels
timestamp      UTC, ISO 8601; ``lists``: ``"default"`` (shrunk to fit the budget) or ``"full"``
============== ===============================================================================
"""
