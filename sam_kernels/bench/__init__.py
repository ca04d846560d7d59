"""Benchmarks of sam_kernels: per-op microbenchmarks and end-to-end training steps.

Run ``python -m sam_kernels.bench --help``. Modules: ``cases`` (parameter lists), ``op_specs``
(bytes floors and how each implementation calls each op), ``baselines`` (per-parameter loops,
davda54/sam style), ``state`` (inputs), ``check`` (correctness vs the reference), ``timing``,
``ops_bench``, ``models`` + ``train_bench`` (training steps), ``noise`` (how far a run can be
trusted), ``targets``, ``environment``,
``report`` (markdown, JSON, plot); ``telemetry_bench`` (the optimizer step with telemetry off,
``"norms"`` and on, side by side: ``python -m sam_kernels.bench.telemetry_bench``).
"""
