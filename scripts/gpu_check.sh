#!/usr/bin/env bash
# Everything that needs a GPU, for a machine that has one but no network (the lent H100/H200 boxes:
# their python3 already holds torch, triton, pytest, hypothesis, tqdm, matplotlib, ninja, pybind11).
# Builds the extension in place with that torch (no pip, no venv), then:
#   tests  pytest $PYTEST_ARGS (default: tests, the whole suite; the CUDA and native-Triton cases run
#          instead of skipping; e.g. PYTEST_ARGS="tests/ops/test_cuda_specific.py" to fit a time limit)
#   bench  python -m sam_kernels.bench $BENCH_ARGS (default --full: GPU figures and targets; to fit a
#          time limit, split it, e.g. BENCH_ARGS="--full --ops sam_step sam_optimizer_step" then the rest,
#          each into its own OUT_DIR: a run overwrites the files of the previous one)
#   all    both (default)
# Usage: bash scripts/gpu_check.sh [tests|bench|all] [OUT_DIR]   (OUT_DIR default benchmarks/results)
# Logs and benchmark files land in OUT_DIR. Exit status: the tests' (or the benchmark's).
set -uo pipefail
MODE=${1:-all}
OUT=${2:-benchmarks/results}
PY=${PYTHON:-python3}
case "$MODE" in tests|bench|all) ;; *) echo "usage: $0 [tests|bench|all] [OUT_DIR]" >&2; exit 2 ;; esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SAM_KERNELS_BUILD=cuda MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Only the GPU in the box: one architecture halves the build. Override for other cards.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY setup.py -q build_ext --inplace > "$OUT/gpu-build.log" 2>&1 || { tail -40 "$OUT/gpu-build.log"; exit 1; }
$PY - <<'PY' || exit 1
import torch, triton, sam_kernels
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
for name, b in sam_kernels.backends().items():
    print(f"  {name:7s} {'available' if b['available'] else 'missing  '} {b['reason'] or ''}")
missing = [n for n in ("cuda", "triton") if not sam_kernels.backends()[n]["available"]]
raise SystemExit(f"backends missing on a GPU machine: {missing}" if missing else 0)
PY

status=0
if [ "$MODE" != bench ]; then
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of paths and options
  $PY -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [ "$MODE" != tests ]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  $PY -m sam_kernels.bench ${BENCH_ARGS:---full} --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log" | tail -80
  bench=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] && status=$bench
fi
exit "$status"
