#!/usr/bin/env bash
# Everything that needs a GPU, in ONE command that fits a short time slot (9 minutes on an H100/H200),
# for a machine with a GPU but no network (python3 with torch, triton, pytest, hypothesis,
# matplotlib and ninja already installed). No pip, no venv.
#
#   1. build   the extension in place for the GPU found (its architecture only: nvidia-smi's
#              compute_cap, else torch's), all cores
#   2. check   that the cuda and triton backends load
#   3. tests   pytest $PYTEST_ARGS (default: every CUDA and native-Triton case, `-k "cuda or test_triton"`;
#              not the CPU emulation of the CUDA kernels, `-m "not cuda_emu"`: CI runs it)
#   4. bench   python -m sam_kernels.bench $BENCH_ARGS (default: the SAM step of every provider, cuda and
#              triton included, on the ResNet-50, GPT-2-blocks and small-tensor lists, with verdicts)
#
# Each phase runs under its own time limit (seconds; override with the variables), so the whole
# command ends within ~9 minutes: BUILD_S=110, backends 30, TESTS_S=210, BENCH_S=130, each plus
# <= 10 s to stop (SIGINT first: pytest still prints what passed), ~10 s of start-up and summary.
# Budget basis (docs/development.md): each .cu file compiles in 20-31 s for one arch on the
# project's loaded 2-core build VM, the C++ files in 8-18 s; with one job per core the GPU box is
# bounded by the slowest file plus the link. Triton's first compile of each kernel variant during
# the tests is not measured yet (no GPU so far): it is what TESTS_S mostly pays for.
#
# Usage: bash scripts/gpu_check.sh [all|tests|bench] [OUT_DIR]
#   OUT_DIR (default benchmarks/results/gpu-check) receives files that can be committed as they are:
#   gpu-check.md (summary: device, versions, phase times and results), gpu-build.log,
#   gpu-build-times.txt (per-file compile seconds), gpu-tests.log, gpu-bench.log and the
#   benchmark's rows and plot, <device>.{jsonl,png}.
# Exit status: 0 only when every phase that ran passed within its limit (124 = a phase timed out).
set -uo pipefail
MODE=${1:-all}
OUT=${2:-benchmarks/results/gpu-check}
PY=${PYTHON:-python3}
BUILD_S=${BUILD_S:-110}
TESTS_S=${TESTS_S:-210}
BENCH_S=${BENCH_S:-130}
case "$MODE" in tests|bench|all) ;; *) echo "usage: $0 [all|tests|bench] [OUT_DIR]" >&2; exit 2 ;; esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CORES=$(env -u OMP_NUM_THREADS nproc)  # nproc alone obeys OMP_NUM_THREADS
export SAM_KERNELS_BUILD=cuda MAX_JOBS=${MAX_JOBS:-$CORES}
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
[ -n "$arch" ] || arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
SUMMARY="$OUT/gpu-check.md"
status=0

phase() {  # phase NAME LIMIT LOG CMD...: runs CMD under `timeout LIMIT`, logs, records time and status
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  # SIGINT first: pytest then stops cleanly and still prints what passed and failed so far.
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) verdict=ok
  [ "$rc" -eq 124 ] && verdict="TIMED OUT"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && verdict="FAILED (exit $rc)"
  echo "| $name | ${took} s | ${limit} s | $verdict |" >> "$SUMMARY.phases"
  echo "== $name: $verdict in ${took} s (limit ${limit} s)"
  [ "$rc" -ne 0 ] && status=$rc
  return "$rc"
}

rm -f "$SUMMARY.phases"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: $gpu (arch $TORCH_CUDA_ARCH_LIST), $CORES cores"

# 1. build (ninja's log gives each file's compile time)
rm -rf build/temp.*
if phase build "$BUILD_S" "$OUT/gpu-build.log" $PY setup.py build_ext --inplace; then
  for log in build/temp.*/.ninja_log; do
    [ -f "$log" ] && awk -F'\t' 'NR > 1 { printf "%6.1f s  %s\n", ($2 - $1) / 1000, $4 }' "$log" | sort -rn
  done > "$OUT/gpu-build-times.txt"
else
  tail -40 "$OUT/gpu-build.log"
fi

# 2. the backends a GPU box must have
ready=0
if [ "$status" -eq 0 ]; then
  phase backends 30 "$OUT/gpu-backends.log" $PY - <<'PY' && ready=1
import torch, triton, sam_kernels
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()}")
for name, b in sam_kernels.backends().items():
    print(f"  {name:7s} {'available' if b['available'] else 'missing  '} {b['reason'] or ''}")
missing = [n for n in ("cuda", "triton") if not sam_kernels.backends()[n]["available"]]
raise SystemExit(f"backends missing on a GPU machine: {missing}" if missing else 0)
PY
  cat "$OUT/gpu-backends.log"
fi

# 3. tests, 4. benchmark (both need a build with both backends; the benchmark runs even if a test failed)
if [ "$ready" -eq 1 ] && [ "$MODE" != bench ]; then
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of paths and options
  # Default order: what only a GPU can check first (CUDA kernels, layouts, optimizers), then native
  # Triton and the torch.compile traces; a test run cut by TESTS_S loses the least important part.
  phase tests "$TESTS_S" "$OUT/gpu-tests.log" $PY -m pytest -q -p no:cacheprovider --durations=15 \
    ${PYTEST_ARGS:-tests/ops/test_cuda_specific.py tests/ops/test_cuda_descent_sums.py \
                   tests/ops/test_cuda_perturb_sq.py tests/ops/test_reductions.py tests/ops/test_perturb.py \
                   tests/ops/test_descents.py tests/ops/test_variants.py tests/ops/test_masks.py tests/ops/test_layouts.py \
                   tests/ops/test_fast_path.py tests/optim/test_layouts.py tests/optim/test_sam_backends.py \
                   tests/ops/test_triton.py tests -k "cuda or test_triton" -m "not cuda_emu"}
  tail -25 "$OUT/gpu-tests.log"
fi
if [ "$ready" -eq 1 ] && [ "$MODE" != tests ]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  # The bench's own budget ends before the phase limit: its rows and verdicts get written.
  phase bench "$BENCH_S" "$OUT/gpu-bench.log" $PY -m sam_kernels.bench --out "$OUT" \
    ${BENCH_ARGS:---budget $((BENCH_S - 30))}
  tail -40 "$OUT/gpu-bench.log"
fi

{
  echo "# GPU check — ${gpu:-no GPU found}"
  echo
  echo "Commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)'), $(date -u +%Y-%m-%dT%H:%M:%SZ), arch $TORCH_CUDA_ARCH_LIST, $CORES cores, MAX_JOBS $MAX_JOBS, whole check ${SECONDS} s."
  echo
  [ -f "$OUT/gpu-backends.log" ] && sed -n 1p "$OUT/gpu-backends.log" && echo
  echo "| phase | took | limit | result |"
  echo "|---|---|---|---|"
  cat "$SUMMARY.phases"
  echo
  if [ -s "$OUT/gpu-build-times.txt" ]; then
    echo "Slowest compiles (\`gpu-build-times.txt\`):"; echo; echo '```'; head -5 "$OUT/gpu-build-times.txt"; echo '```'; echo
  fi
  if [ -f "$OUT/gpu-tests.log" ]; then
    line=$(grep -E ' in [0-9.]+s' "$OUT/gpu-tests.log" | tail -1)  # pytest's last line
    echo "Tests: \`${line:-no pytest summary (crashed?): see gpu-tests.log}\`"; echo
  fi
  if [ -f "$OUT/gpu-bench.log" ]; then
    echo "Benchmark verdicts:"; echo; echo '```'
    awk '/^Verdicts/ { on = 1 } on && /^written:/ { on = 0 } on { print }' "$OUT/gpu-bench.log"
    grep -E '^!!' "$OUT/gpu-bench.log"
    echo '```'
  fi
} > "$SUMMARY"
rm -f "$SUMMARY.phases"
echo "summary: $SUMMARY (whole check ${SECONDS} s)"
exit "$status"
