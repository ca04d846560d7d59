"""What scripts/install.sh and setup.py decide before compiling anything (issue #16).

The builds themselves (install.sh twice, pip wheel in a fresh venv, the CUDA compile) run in CI
(.ci/run): minutes each, not unit tests.
"""
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


setup_py = _load("sam_kernels_setup", REPO / "setup.py")
install_state = _load("install_state", REPO / "scripts" / "install_state.py")


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    _executable(root / "bin" / "nvcc", "#!/bin/sh\n")
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64" / "libcudart.so").write_text("")
    return root


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_wrapper_nvcc_without_cuda_home_finds_its_toolkit(tmp_path, monkeypatch):
    """The issue's machine: /usr/local/bin/nvcc is a script running the toolkit's nvcc, CUDA_HOME
    unset; torch's guess (/usr/local) has no libcudart, so the link failed with -lcudart."""
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_bin = tmp_path / "local" / "bin"
    wrapper_bin.mkdir(parents=True)
    _executable(wrapper_bin / "nvcc", f'#!/bin/sh\necho "#$ TOP={toolkit}/bin/.."\n')
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_bin}{os.pathsep}{os.environ['PATH']}")
    root, how = setup_py.find_cuda_home()
    assert root == str(toolkit.resolve()) and "--dryrun" in how
    assert not setup_py._is_toolkit(str(tmp_path / "local"))


def test_nvcc_inside_a_toolkit_and_explicit_cuda_home(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", f"{toolkit / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert setup_py.find_cuda_home() == (str(toolkit.resolve()), f"nvcc at {toolkit / 'bin' / 'nvcc'}")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_py.find_cuda_home() == (str(toolkit), "$CUDA_HOME")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    root, why = setup_py.find_cuda_home()
    assert root is None and "is not a CUDA toolkit" in why


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_this_machines_nvcc_resolves_to_a_toolkit(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    root, how = setup_py.find_cuda_home()
    assert root is not None and setup_py._is_toolkit(root), how


def test_build_without_torch_stops_at_once_naming_the_fix():
    """pip's isolated build has no torch (pyproject asks for none): setup.py must stop, not compile."""
    block = ("import sys\nclass B:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'torch': raise ImportError('no torch')\n"
             "sys.meta_path.insert(0, B())\nimport runpy; sys.argv = ['setup.py', '--name']\n"
             "runpy.run_path('setup.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SAM_KERNELS_BUILD": "auto"})
    assert p.returncode != 0
    assert "pip install --no-build-isolation ." in p.stderr and "SAM_KERNELS_BUILD=none" in p.stderr
    pyproject = (REPO / "pyproject.toml").read_text()
    requires = pyproject.split("requires = ", 1)[1].split("\n", 1)[0]
    assert "torch" not in requires


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "setup.py").write_text("setup")
    (root / "pyproject.toml").write_text("[project]")
    (root / "csrc" / "cpu" / "norm.cpp").write_text("int x;")
    return root


def test_stamp_changes_with_sources_headers_settings_only(tmp_path):
    root = _tree(tmp_path)
    env = {"SAM_KERNELS_BUILD": "cpu"}
    base = install_state.stamp(root, env)
    assert install_state.stamp(root, dict(env)) == base  # nothing changed: same stamp, no rebuild
    assert install_state.stamp(root, {**env, "UNRELATED": "1"}) == base
    (root / "csrc" / "cpu" / "norm.cpp").write_text("int y;")
    edited = install_state.stamp(root, env)
    assert edited != base
    (root / "csrc" / "common.h").write_text("#pragma once")
    assert install_state.stamp(root, env) != edited
    for var in ("SAM_KERNELS_BUILD", "TORCH_CUDA_ARCH_LIST", "SAM_KERNELS_NATIVE", "CUDA_HOME", "CXX"):
        assert install_state.stamp(root, {**env, var: "other"}) != install_state.stamp(root, env), var
    (root / "setup.py").write_text("setup 2")
    assert install_state.stamp(root, env) != edited


def test_stamp_records_torch():
    import torch
    assert any(p.startswith(f"torch {torch.__version__} cuda {torch.version.cuda}")
               for p in install_state.stamp_parts())


def test_missing_requirements():
    def missing(*reqs):
        p = subprocess.run([sys.executable, str(REPO / "scripts" / "install_state.py"), "missing", *reqs],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert missing("pip>=1", "pytest") == []
    assert missing("pip>=1", "pip>=99999", "surely-not-installed-xyz") == ["pip>=99999", "surely-not-installed-xyz"]
