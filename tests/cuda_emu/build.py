"""Builds the CPU emulation of the CUDA kernels: the unmodified ``csrc/cuda/*.cu`` compiled as host
C++20 by g++ with the shim headers of ``shim/`` (docs/verification.md), linked into one library
that registers the ops as ``torch.ops.sam_kernels_emu`` on CPU tensors (and the harness's own
``torch.ops.cuda_emu``).

Cached: each object is keyed on its source, every header under ``csrc/`` and
``tests/cuda_emu/shim/``, this file, the torch version, the compiler's version and the flags
(``build/cuda_emu/<variant>-objects/``), the library on its objects' keys
(``build/cuda_emu/<variant>-<key>/``): an unchanged ``csrc/`` is not rebuilt, an edited source
recompiles only itself.

Variants: ``default`` (what the tests load: -O2, -ffp-contract=off, and the alignment checks of
-fsanitize=alignment reported by the runtime as a launch error), ``sanitize`` (ASan + UBSan with
their runtimes; load it in a process started with ``LD_PRELOAD=<libasan.so>``, see
``sanitizer_env``).

    python -m tests.cuda_emu.build [default|sanitize]   # prints the library's path
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "shim"
CSRC = ROOT / "csrc"
OUT = ROOT / "build" / "cuda_emu"
CXX = os.environ.get("CXX", "g++")
LIBRARY = "libsam_kernels_emu.so"

# -ffp-contract=off: no FMA contraction, so results compare with the eager reference (nvcc does
# contract; see docs/verification.md). Namespace sam_kernels -> sam_kernels_emu: the ops get their
# own namespace and no inline function of the real extension is interposed.
COMMON = ["-std=c++20", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Dsam_kernels=sam_kernels_emu",
          "-Wno-unknown-pragmas"]
VARIANTS = {
    "default": {"opt": ["-O2"], "kernels": ["-fsanitize=alignment"], "runtime": ["-DCUDA_EMU_ALIGNMENT_HANDLER"],
                "link": []},
    "sanitize": {"opt": ["-O1", "-g", "-fno-omit-frame-pointer"], "kernels": [], "runtime": [],
                 "link": ["-fsanitize=address,undefined"],
                 "all": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]},
}


def _torch_flags() -> tuple[list[str], list[str], str]:
    import torch
    from torch.utils import cpp_extension

    inc = cpp_extension.include_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cflags = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + [f"-isystem{p}" for p in inc]
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    lflags = [f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lc10", "-ltorch_cpu", "-ltorch"]
    return cflags, lflags, torch.__version__


def _units(variant: str) -> list[tuple[Path, list[str]]]:
    """(source, flags of that source) for every translation unit."""
    v = VARIANTS[variant]
    kernel = ["-x", "c++", f"-I{SHIM}", f"-I{CSRC / 'cuda'}", "-include", str(SHIM / "cuda_emu.h")] + v["kernels"]
    units = [(CSRC / "sam_kernels.cpp", [f"-isystem{sysconfig.get_paths()['include']}"])]
    units += [(p, kernel) for p in sorted((CSRC / "cuda").glob("*.cu"))]
    units += [(SHIM / "probes.cpp", kernel)]
    units += [(SHIM / "runtime.cpp", [f"-I{SHIM}"] + v["runtime"])]
    return units


def _fingerprint(variant: str, cflags: list[str], torch_version: str) -> bytes:
    """What every object depends on besides its own source: the headers, this file, the flags,
    torch and the compiler."""
    h = hashlib.sha256()
    for base in (CSRC, SHIM):
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.suffix in (".h", ".cuh"):
                h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(Path(__file__).read_bytes())
    cxx_version = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    h.update(f"{variant}\0{torch_version}\0{cxx_version}\0{cflags}".encode())
    return h.digest()


def _unit_key(fingerprint: bytes, src: Path) -> str:
    return hashlib.sha256(fingerprint + src.read_bytes()).hexdigest()[:16]


def _say(msg: str) -> None:
    print(f"cuda_emu build: {msg}", file=sys.stderr, flush=True)


def build(variant: str = "default", jobs: int | None = None) -> Path:
    """Path of the emulation library of ``variant``, compiled first unless cached."""
    cflags, lflags, torch_version = _torch_flags()
    fingerprint = _fingerprint(variant, cflags, torch_version)
    units = _units(variant)
    unit_keys = [_unit_key(fingerprint, src) for src, _ in units]
    key = hashlib.sha256("".join(unit_keys).encode()).hexdigest()[:16]
    out = OUT / f"{variant}-{key}"
    lib = out / LIBRARY
    objdir = OUT / f"{variant}-objects"  # one object per source and key: an edit recompiles its file only
    objdir.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{variant}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the second waits and finds it done
        if lib.is_file():
            return lib
        v = VARIANTS[variant]
        base = [CXX] + COMMON + v["opt"] + v.get("all", []) + cflags
        todo = [(u, objdir / f"{u[0].name}-{k}.o") for u, k in zip(units, unit_keys)]
        start = time.monotonic()
        stale = [t for t in todo if not t[1].is_file()]
        _say(f"compiling {len(stale)} of {len(units)} files ({variant}); library {out} ...")

        def compile_one(item):
            (src, flags), obj = item
            cmd = base + flags + ["-c", str(src), "-o", str(obj) + ".tmp"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cuda_emu build failed on {src}:\n{' '.join(cmd)}\n{r.stderr[-20000:]}")
            os.replace(str(obj) + ".tmp", obj)

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            list(pool.map(compile_one, stale))
        keep = {obj.name for _, obj in todo}
        for old in objdir.glob("*.o"):
            if old.name not in keep:
                old.unlink()
        for old in OUT.glob(f"{variant}-*"):
            if old != objdir and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        cmd = ([CXX, "-shared"] + v.get("all", []) + v["link"] + [str(obj) for _, obj in todo] + lflags
               + ["-o", str(tmp / LIBRARY)])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda_emu link failed:\n{' '.join(cmd)}\n{r.stderr[-20000:]}")
        tmp.rename(out)
        _say(f"built {lib} in {time.monotonic() - start:.0f} s")
        return lib


def _compiler_library(name: str) -> str:
    path = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout
    return os.path.realpath(path.strip())


def sanitizer_env() -> dict[str, str]:
    """Environment of a process that loads the ``sanitize`` variant: the ASan runtime preloaded
    (it must come first), leaks not reported (Python's allocations), stop at the first error.

    libstdc++ is preloaded too: ASan binds its ``__cxa_throw`` interceptor to the real function
    when it starts, and Python does not link libstdc++, so without it the first C++ exception
    fails ASan's check ``real___cxa_throw != 0`` and ends the process."""
    return {
        "LD_PRELOAD": f"{_compiler_library('libasan.so')} {_compiler_library('libstdc++.so.6')}",
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "default"))
