"""What scripts/install.sh needs to decide quickly that there is nothing to do.

    python scripts/install_state.py missing REQ...   # the requirements not satisfied here, one a line
    python scripts/install_state.py stamp            # digest of everything the extension's build depends on
    python scripts/install_state.py digest FILE      # sha256 of a built file

Run with the venv's interpreter (the stamp records its torch). Standard library only, except
`missing`, which uses the `packaging` vendored in pip (every venv has pip).
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Files whose content decides what is compiled and how.
BUILD_INPUTS = ("setup.py", "pyproject.toml")
SOURCE_DIR = "csrc"
# Environment variables read by setup.py or by torch.utils.cpp_extension / the compilers.
BUILD_ENV = ("SAM_KERNELS_BUILD", "SAM_KERNELS_NATIVE", "TORCH_CUDA_ARCH_LIST", "DEBUG", "CUDA_HOME", "CUDA_PATH",
             "CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "NVCC_FLAGS", "TORCH_DONT_CHECK_COMPILER_ABI")


def missing(requirements: list[str]) -> list[str]:
    """The requirements (PEP 508 strings) that no installed distribution satisfies."""
    from importlib import metadata

    from pip._vendor.packaging.requirements import Requirement

    out = []
    for text in requirements:
        req = Requirement(text)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(text)
    return out


def stamp_parts(repo: Path = REPO, env: dict | None = None) -> list[str]:
    """Every input of the build as text lines: file digests, torch, python, compiler-relevant env vars."""
    env = os.environ if env is None else env
    files = [repo / f for f in BUILD_INPUTS] + sorted(p for p in (repo / SOURCE_DIR).rglob("*") if p.is_file())
    parts = [f"file {p.relative_to(repo)} {hashlib.sha256(p.read_bytes()).hexdigest()}" for p in files]
    try:
        import torch
        parts.append(f"torch {torch.__version__} cuda {torch.version.cuda} at {Path(torch.__file__).parent}")
    except ImportError:
        parts.append("torch missing")
    parts.append(f"python {platform.python_version()} {sys.executable} {platform.machine()}")
    parts += [f"env {k}={env.get(k, '')}" for k in BUILD_ENV]
    return parts


def stamp(repo: Path = REPO, env: dict | None = None) -> str:
    return hashlib.sha256("\n".join(stamp_parts(repo, env)).encode()).hexdigest()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str]) -> int:
    if argv[:1] == ["missing"]:
        print("\n".join(missing(argv[1:])))
    elif argv[:1] == ["stamp"]:
        print(stamp())
    elif argv[:1] == ["digest"] and len(argv) == 2:
        print(digest(Path(argv[1])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
