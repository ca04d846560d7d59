#!/usr/bin/env bash
# Sets up .venv and builds sam_kernels into it (editable), from a bare machine.
#
# - torch: an already importable torch is kept (e.g. a GPU machine's own build, seen through
#   --system-site-packages); otherwise torch==${TORCH_VERSION:-2.14.1} is installed. That is a
#   CUDA 13.0 build: with nvcc present, the CUDA kernels are compiled too, GPU or not.
# - The extension is built with --no-build-isolation (it compiles against the torch in .venv).
#   SAM_KERNELS_BUILD=auto|cpu|cuda|none chooses what is compiled (see setup.py).
# Re-running is cheap: pip skips what is installed; the build is redone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==${TORCH_VERSION:-2.14.1}"
fi
"${PIP[@]}" "setuptools>=64" wheel ninja pybind11 "numpy" "triton>=3.0" \
  "pytest>=8" "hypothesis>=6" "pytest-benchmark>=4" "tqdm>=4.60" "matplotlib>=3.7" "scikit-learn>=1.3"

# torch finds nvcc through CUDA_HOME; /usr/local/bin/nvcc alone would make it guess /usr/local.
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"${PIP[@]}" --no-build-isolation --no-deps -e .

.venv/bin/python - <<'PY'
import torch, sam_kernels
info = sam_kernels.backends()
print(f"torch {torch.__version__}; sam_kernels backends:")
for name, b in info.items():
    print(f"  {name:7s} {'available' if b['available'] else 'missing  '} {b['reason'] or ''}")
PY
