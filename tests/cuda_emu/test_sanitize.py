"""Opt-in (``-m cuda_emu_sanitize``; docs/verification.md): the cuda_emu tests again, on the emulation built
with AddressSanitizer and UndefinedBehaviorSanitizer (halting at the first report), in a child
process that preloads the ASan runtime. The misaligned-access probe is left out of that run: under
UBSan it must stop the process, which the last test checks."""
import os
import subprocess
import sys

import pytest

from tests.cuda_emu.build import ROOT, build, sanitizer_env

pytestmark = [pytest.mark.cuda_emu, pytest.mark.cuda_emu_sanitize]


def _env():
    build("sanitize")  # here, not in the child: the compiler does not run under the preloaded ASan
    return {**os.environ, **sanitizer_env(), "CUDA_EMU_VARIANT": "sanitize"}


def test_cuda_emu_tests_pass_under_asan_and_ubsan():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/cuda_emu",
         "-m", "cuda_emu and not cuda_emu_sanitize and not cuda_emu_large", "-k", "not misaligned_vector_access"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=3 * 3600)
    out = r.stdout[-6000:] + r.stderr[-6000:]
    assert r.returncode == 0, out
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, out
    assert " passed" in r.stdout, out


def test_runtime_errors_raise_under_asan():
    """The emulated runtime's C++ exceptions (thrown on the launching thread, before a launch and
    after a block's fibers stopped at a barrier) reach Python as RuntimeError in that build too."""
    code = ("import os, torch; from tests.cuda_emu.build import build; "
            "torch.ops.load_library(str(build('sanitize'))); "
            "os.environ['CUDA_EMU_THREAD_ORDER'] = 'sideways'\n"
            "try: torch.ops.cuda_emu.thread_order(2)\n"
            "except RuntimeError as e: print('raised:', e)\n"
            "del os.environ['CUDA_EMU_THREAD_ORDER']\n"
            "try: torch.ops.cuda_emu.divergent_barrier(100)\n"
            "except RuntimeError as e: print('raised:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "raised: CUDA_EMU_THREAD_ORDER=sideways" in r.stdout, r.stdout + r.stderr[-4000:]
    assert "reached by 100 of the block's 512 threads" in r.stdout, r.stdout + r.stderr[-4000:]


def test_ubsan_stops_a_misaligned_vector_access():
    code = ("import torch; from tests.cuda_emu.build import build; "
            "torch.ops.load_library(str(build('sanitize'))); "
            "torch.ops.cuda_emu.vector_load(torch.arange(8, dtype=torch.float32)[1:])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0
    assert "multi_tensor_apply.cuh" in r.stderr and "misaligned address" in r.stderr, r.stderr[-4000:]
