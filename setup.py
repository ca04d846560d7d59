"""Builds sam_kernels._C: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

SAM_KERNELS_BUILD=auto (default) | cpu | cuda | none. The CUDA decision never looks at
torch.cuda.is_available(): build machines usually have no GPU.

The kernels are compiled against the torch that will run them (torch's C++ ABI changes between
releases), so torch must be importable while building: `pip install --no-build-isolation .` or
`pip wheel --no-build-isolation --no-deps .`. pip's default isolated build has no torch (this
project does not ask pip for one: it would be another release than the one installed), and stops
at once with a message saying so.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

from setuptools import setup

MODE = os.environ.get("SAM_KERNELS_BUILD", "auto").lower()
if MODE not in ("auto", "cpu", "cuda", "none"):
    raise SystemExit(f"SAM_KERNELS_BUILD={MODE!r}: use auto, cpu, cuda or none")

NO_TORCH = """\
sam_kernels: torch is not importable in the environment that builds the extension.
The kernels are compiled against the torch you will run, so the build must see that torch, and
pip's default isolated build environment has none. Install torch first, then build without
isolation (setuptools>=64, wheel and ninja installed too):
    pip install --no-build-isolation .
    pip wheel --no-build-isolation --no-deps .
or build only the pure-Python package (eager backend, no kernels): SAM_KERNELS_BUILD=none pip install ."""


def say(msg: str) -> None:
    print(f"sam_kernels build: {msg}", file=sys.stderr, flush=True)


def _check_archs(arch_list: str) -> None:
    """The 32 KB kernel-argument tables (csrc/cuda/multi_tensor_apply.cuh) need compute capability >= 7.0."""
    archs = [a.strip() for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    old = [a for a in archs if (re.match(r"\d+", a) and int(re.match(r"\d+", a).group()) < 7)
           or a.split("+")[0] in ("Kepler", "Maxwell", "Pascal")]
    if old:
        raise SystemExit(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: the CUDA kernels need compute capability >= 7.0 "
                         f"(Volta or newer), got {old}; drop those archs or build with SAM_KERNELS_BUILD=cpu")


def _is_toolkit(root: str) -> bool:
    """A CUDA toolkit root: nvcc, the runtime headers and libcudart (what compiling and linking need)."""
    libdirs = [os.path.join(root, d) for d in ("lib64", "lib")] + glob.glob(os.path.join(root, "targets", "*", "lib"))
    incdirs = [os.path.join(root, "include")] + glob.glob(os.path.join(root, "targets", "*", "include"))
    return (os.path.isfile(os.path.join(root, "bin", "nvcc"))
            and any(os.path.isfile(os.path.join(d, "cuda_runtime.h")) for d in incdirs)
            and any(glob.glob(os.path.join(d, "libcudart.so*")) for d in libdirs))


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit an nvcc belongs to, as nvcc itself reports it (``TOP=`` of ``--dryrun``).

    Needed when nvcc on PATH is a wrapper script or a copy outside the toolkit (e.g.
    /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), where torch's guess, the
    parent of nvcc's folder, is not a toolkit and the link fails with `cannot find -lcudart`.
    """
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.realpath(m.group(1).strip()) if m else None


def find_cuda_home() -> tuple[Optional[str], str]:
    """(CUDA toolkit root or None, how it was found or why not), in the order a user expects:
    $CUDA_HOME / $CUDA_PATH as given, then the toolkit of the nvcc on PATH, then /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            root = os.environ[var]
            return (root, f"${var}") if _is_toolkit(root) else (None, f"${var}={root} is not a CUDA toolkit "
                                                                      f"(no bin/nvcc, cuda_runtime.h or libcudart)")
    nvcc = shutil.which("nvcc")
    if nvcc:
        parent = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(parent):
            return parent, f"nvcc at {nvcc}"
        top = _nvcc_top(nvcc)
        if top and _is_toolkit(top):
            return top, f"the toolkit of {nvcc} (nvcc --dryrun)"
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, ("nvcc on PATH but no toolkit found for it; set CUDA_HOME" if nvcc
                  else "no nvcc on PATH, CUDA_HOME unset, no /usr/local/cuda")


def _want_cuda(torch, cuda_home: Optional[str], found: str) -> bool:
    cuda_torch = torch.version.cuda is not None
    if MODE == "cuda" and not (cuda_home and cuda_torch):
        raise SystemExit(f"SAM_KERNELS_BUILD=cuda, but the CUDA toolkit: {cuda_home or 'missing'} ({found}); "
                         f"torch {torch.__version__}: {'CUDA ' + torch.version.cuda if cuda_torch else 'a CPU build'}. "
                         f"Install nvcc (or set CUDA_HOME) and a CUDA build of torch")
    if MODE == "cpu":
        say("CPU kernels only (SAM_KERNELS_BUILD=cpu)")
        return False
    if MODE == "auto" and not (cuda_home and cuda_torch):
        why = f"no CUDA toolkit ({found})" if not cuda_home else f"torch {torch.__version__} is a CPU build"
        say(f"CPU kernels only: {why}; SAM_KERNELS_BUILD=cuda asks for the CUDA kernels")
        return False
    return True


def extensions():
    if MODE == "none":
        say("no kernels (SAM_KERNELS_BUILD=none): pure-Python package, eager backend only")
        return [], {}
    try:
        import torch
    except ImportError:
        raise SystemExit(NO_TORCH) from None
    cuda_home, found = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it before the import.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension
    if cuda_home and torch.version.cuda:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before this file ran

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    debug = os.environ.get("DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # The extension is built where it runs (pip builds from source), so target this CPU's vector
    # units; SAM_KERNELS_NATIVE=0 gives a portable build.
    if os.environ.get("SAM_KERNELS_NATIVE", "1") == "1":
        cxx.append("-march=native")
    cxx += ["-fopenmp"]  # at::parallel_for is OpenMP-backed and inline: needs -fopenmp here
    # No contraction of a*b + c into an FMA by the compiler: it would decide per instantiation of a
    # loop (the CPU kernels compile one per option set), so a result's last bit would depend on
    # options that must not change it (telemetry sums on or off). The kernels ask for FMAs themselves.
    cxx += ["-ffp-contract=off"]
    if _want_cuda(torch, cuda_home, found):
        # No GPU at build time: without an arch list torch would try to query the device.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _check_archs(os.environ["TORCH_CUDA_ARCH_LIST"])
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        say(f"CPU + CUDA kernels for archs {os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA toolkit {cuda_home} "
            f"(found: {found})")
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]  # no fast-math: results must match torch.optim
        ext = cpp_extension.CUDAExtension(
            "sam_kernels._C", sources, depends=headers,
            extra_compile_args={"cxx": cxx + ["-DSAM_KERNELS_CUDA"], "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("sam_kernels._C", sources, depends=headers, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import the helpers
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
