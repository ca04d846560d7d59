#!/usr/bin/env bash
# Sets up .venv and builds sam_kernels into it (editable), from a bare machine; says what it does.
#
# - torch: an importable torch is kept (e.g. a GPU machine's own build, seen through
#   --system-site-packages). Otherwise, without a visible NVIDIA GPU and without
#   SAM_KERNELS_BUILD=cuda, torch==${TORCH_VERSION:-2.13.0}, a CPU build (~0.2 GB download);
#   with either, torch==${TORCH_VERSION:-2.14.1}, a CUDA build (~5.5 GB in the venv).
#   TORCH_INDEX_URL=... is passed to pip as --index-url (e.g. https://download.pytorch.org/whl/cpu
#   where the default index serves only CUDA builds).
# - Kernels: SAM_KERNELS_BUILD=auto|cpu|cuda|none (see setup.py). Unset: cpu when no NVIDIA GPU
#   is visible (no nvcc run for nothing), else auto (CUDA kernels when nvcc and a CUDA torch exist).
# - The extension is compiled in place (build/ keeps ninja's objects: an edit recompiles only what
#   changed) against the venv's torch; a stamp over csrc/, setup.py, pyproject.toml, torch, python
#   and the build environment variables, kept in the venv, makes a re-run with nothing changed skip
#   the build. Delete $SAM_KERNELS_VENV/.sam_kernels-build-stamp to force one.
# - SAM_KERNELS_VENV (default .venv): where the venv is. PYTHON (default python3): what creates it.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
say() { printf '[install %3ds] %s\n' "$((SECONDS - START))" "$*"; }

VENV=${SAM_KERNELS_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1) (it sees system packages, so a machine's own torch is reused)"
  "$PYTHON" -m venv --system-site-packages "$VENV"
else
  say "using $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { say "Python >= 3.10 needed"; exit 1; }
cuda_torch() { "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; }

gpu_visible() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } || ls /dev/nvidia[0-9]* >/dev/null 2>&1
}
GPU=no
gpu_visible && GPU=yes

# --- torch -----------------------------------------------------------------------------------
if "$PY" -c "import torch" 2>/dev/null; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__, f"(CUDA {torch.version.cuda})")') is importable: kept"
else
  INDEX=()
  [ -n "${TORCH_INDEX_URL:-}" ] && INDEX=(--index-url "$TORCH_INDEX_URL")
  if [ "${SAM_KERNELS_BUILD:-}" = cuda ] || [ "$GPU" = yes ]; then
    spec="torch==${TORCH_VERSION:-2.14.1}"
    why=$([ "$GPU" = yes ] && echo "an NVIDIA GPU is visible" || echo "SAM_KERNELS_BUILD=cuda")
    say "installing $spec, a CUDA build ($why; ~5.5 GB in the venv, a few minutes)"
  else
    spec="torch==${TORCH_VERSION:-2.13.0}"
    say "installing $spec, a CPU build (no NVIDIA GPU visible; ~0.2 GB download, ~2.2 GB in the venv with the test, benchmark and docs packages;" \
        "SAM_KERNELS_BUILD=cuda installs the CUDA build instead)"
  fi
  "${PIP[@]}" --progress-bar off "${INDEX[@]}" "$spec" | grep -E '^(Successfully|Processing|Downloading)' || true
  "$PY" -c "import torch" || { say "torch did not install"; exit 1; }
  if [ "$GPU" = no ] && [ "${SAM_KERNELS_BUILD:-}" != cuda ] && cuda_torch; then
    say "note: the index served a CUDA build of torch; for a CPU-only one (~1 GB instead of ~5 GB) start" \
        "again with a new venv and TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
  fi
fi

if [ "${SAM_KERNELS_BUILD:-}" = cuda ] && ! cuda_torch; then
  say "SAM_KERNELS_BUILD=cuda, but the torch in $VENV is a CPU build: remove $VENV (or pick another with" \
      "SAM_KERNELS_VENV=...) and run again, to get torch's CUDA build"
  exit 1
fi

# --- test / benchmark dependencies ------------------------------------------------------------
# The frameworks of sam_kernels.integrations are here for their tests (the package's extras); the
# docs packages for the tests that build the site and run its examples.
REQS=("setuptools>=64" wheel ninja pybind11 numpy "triton>=3.0" "pytest>=8" "hypothesis>=6"
      "matplotlib>=3.7" "pytorch-optimizer>=3" "scikit-learn>=1.3" "lightning>=2.4" "transformers>=5.0" "accelerate>=1.0"
      "sphinx>=7" "myst-parser>=3" "furo" "sybil>=9")
mapfile -t MISSING < <("$PY" scripts/install_state.py missing "${REQS[@]}")
if [ "${#MISSING[@]}" -gt 0 ] && [ -n "${MISSING[0]}" ]; then
  say "installing the build/test/benchmark/docs dependencies: ${MISSING[*]}"
  "${PIP[@]}" -q "${REQS[@]}"
else
  say "build/test/benchmark/docs dependencies present"
fi

# --- the extension ------------------------------------------------------------------------------
if [ -z "${SAM_KERNELS_BUILD:-}" ]; then
  if [ "$GPU" = yes ]; then
    export SAM_KERNELS_BUILD=auto
  else
    export SAM_KERNELS_BUILD=cpu
    say "no NVIDIA GPU visible: CPU kernels only (SAM_KERNELS_BUILD=cuda compiles the CUDA kernels too)"
  fi
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
STAMP_FILE="$VENV/.sam_kernels-build-stamp"
so() { ls sam_kernels/_C*.so 2>/dev/null | head -n 1; }
want=$("$PY" scripts/install_state.py stamp)
if [ -f "$STAMP_FILE" ] && [ -n "$(so)" ] && [ "$(sed -n 1p "$STAMP_FILE")" = "$want" ] \
   && [ "$(sed -n 2p "$STAMP_FILE")" = "$("$PY" scripts/install_state.py digest "$(so)")" ]; then
  say "sam_kernels._C is up to date ($(so)): sources, torch and build settings unchanged since it was built;" \
      "not rebuilding"
else
  n_cpp=$(ls csrc/*.cpp csrc/cpu/*.cpp | wc -l)
  n_cu=$(ls csrc/cuda/*.cu | wc -l)
  what="$n_cpp C++ files (only those changed since the last build, if any)"
  est="1-2 min"
  if [ "$SAM_KERNELS_BUILD" = cuda ] || { [ "$SAM_KERNELS_BUILD" = auto ] && cuda_torch; }; then
    what="$what, and $n_cu CUDA files if setup.py finds a CUDA toolkit (archs ${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
    est="3-8 min"
  fi
  mkdir -p build
  LOG=build/install-build.log
  say "compiling sam_kernels._C (SAM_KERNELS_BUILD=$SAM_KERNELS_BUILD): $what, $MAX_JOBS jobs;" \
      "about $est on a quiet 2-core machine; full log: $LOG"
  # ninja prints one line per finished file; show which file and the elapsed time, keep the rest in the log.
  if ! NINJA_STATUS="[%f/%t %es] " "$PY" setup.py build_ext --inplace --force 2>&1 | tee "$LOG" | awk '
      /^sam_kernels build:/ { print "  " $0; fflush(); next }
      /^\[[0-9]+\/[0-9]+ [0-9.]+s\] / {
        src = ""; for (i = 3; i < NF; i++) if ($i == "-c" && $(i + 1) !~ /^-/) src = $(i + 1)
        sub(/.*\/csrc\//, "csrc/", src); split($2, t, "."); step = substr($1, 2)
        print "  [" step " done, " t[1] " s] " (src == "" ? "linked" : src); fflush() }'; then
    say "build FAILED; the end of $LOG:"
    tail -n 40 "$LOG"
    exit 1
  fi
  printf '%s\n%s\n' "$want" "$("$PY" scripts/install_state.py digest "$(so)")" > "$STAMP_FILE"
  say "built $(so)"
fi

# Editable registration (the package imports from this tree, _C included); once per venv.
registered=$(cd / && "$PY" -c 'import sam_kernels, os; print(os.path.dirname(sam_kernels.__file__))' 2>/dev/null || true)
if [ "$registered" != "$PWD/sam_kernels" ]; then
  say "registering this tree as the venv's sam_kernels (pip install -e ., nothing compiled)"
  SAM_KERNELS_BUILD=none "${PIP[@]}" -q --no-build-isolation --no-deps -e .
fi

"$PY" - "$SAM_KERNELS_BUILD" <<'PY'
import sys
import torch, sam_kernels
info = sam_kernels.backends()
print(f"torch {torch.__version__}; sam_kernels backends:")
for name, b in info.items():
    print(f"  {name:7s} {'available' if b['available'] else 'missing  '} {b['reason'] or ''}")
if sys.argv[1] != "none" and not info["cpp"]["available"]:
    sys.exit("install.sh: the compiled extension did not load (see the cpp line above)")
PY
say "done"
