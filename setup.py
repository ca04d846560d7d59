"""Builds sam_kernels._C: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

SAM_KERNELS_BUILD=auto (default) | cpu | cuda | none. The CUDA decision never looks at
torch.cuda.is_available(): build machines usually have no GPU.
Build with `pip install --no-build-isolation .` (torch must be importable at build time).
"""
import glob
import os
import re

from setuptools import setup

MODE = os.environ.get("SAM_KERNELS_BUILD", "auto").lower()
if MODE not in ("auto", "cpu", "cuda", "none"):
    raise SystemExit(f"SAM_KERNELS_BUILD={MODE!r}: use auto, cpu, cuda or none")


def _check_archs(arch_list: str) -> None:
    """The 32 KB kernel-argument tables (csrc/cuda/multi_tensor_apply.cuh) need compute capability >= 7.0."""
    archs = [a.strip() for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    old = [a for a in archs if (re.match(r"\d+", a) and int(re.match(r"\d+", a).group()) < 7)
           or a.split("+")[0] in ("Kepler", "Maxwell", "Pascal")]
    if old:
        raise SystemExit(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: the CUDA kernels need compute capability >= 7.0 "
                         f"(Volta or newer), got {old}; drop those archs or build with SAM_KERNELS_BUILD=cpu")


def _want_cuda(cpp_extension, torch) -> bool:
    toolkit = cpp_extension.CUDA_HOME is not None
    cuda_torch = torch.version.cuda is not None
    if MODE == "cuda" and not (toolkit and cuda_torch):
        raise SystemExit(f"SAM_KERNELS_BUILD=cuda but CUDA_HOME={cpp_extension.CUDA_HOME!r} and "
                         f"torch.version.cuda={torch.version.cuda!r}: install nvcc and a CUDA build of torch")
    return MODE == "cuda" or (MODE == "auto" and toolkit and cuda_torch)


def extensions():
    if MODE == "none":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    debug = os.environ.get("DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # The extension is built where it runs (pip builds from source), so target this CPU's vector
    # units; SAM_KERNELS_NATIVE=0 gives a portable build.
    if os.environ.get("SAM_KERNELS_NATIVE", "1") == "1":
        cxx.append("-march=native")
    cxx += ["-fopenmp"]  # at::parallel_for is OpenMP-backed and inline: needs -fopenmp here
    if _want_cuda(cpp_extension, torch):
        # No GPU at build time: without an arch list torch would try to query the device.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _check_archs(os.environ["TORCH_CUDA_ARCH_LIST"])
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]  # no fast-math: results must match torch.optim
        ext = cpp_extension.CUDAExtension(
            "sam_kernels._C", sources, extra_compile_args={"cxx": cxx + ["-DSAM_KERNELS_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("sam_kernels._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
