"""torch.compile's first compile of a list, in a child process with a time limit (ours).

Inductor's first compile of a step over a few hundred tensors takes minutes on a loaded 2-core CPU
(ResNet-50's 161 tensors: 2.5 min measured), more than a 3-minute run can give it, and a compile
cannot be interrupted in-process. So the benchmark compiles each list once in a child process
under the case's time limit: what it compiles lands in Inductor's on-disk cache, and a marker file
beside that cache records a list whose compile finished. With the marker, the benchmark compiles in
its own process straight away (from the cache: seconds); without it and out of time, the
``compile`` row says so and the next run goes on from what the cache holds.

    python -m sam_kernels.bench.warm CASE DTYPE DEVICE   # the child: compile CASE's step once
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from .cases import Case, parse_size


def marker(case: Case, dtype: torch.dtype, device: torch.device) -> Path:
    """The file that says ``case``'s compiled step is in Inductor's cache (it is cleared with the cache)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    key = hashlib.sha256(repr((torch.__version__, str(dtype), device.type, case.shapes)).encode()).hexdigest()[:16]
    return Path(cache_dir()) / "sam_kernels_bench" / f"{case.name}-{key}.done"


def warm(case: Case, dtype: torch.dtype, device: torch.device, limit_s: float) -> Optional[str]:
    """None when ``case``'s compiled step is cached (before, or compiled now within ``limit_s``
    seconds in a child process); otherwise why not."""
    done = marker(case, dtype, device)
    if done.exists():
        return None
    if limit_s <= 1:
        return "no time left in the budget to compile (--budget, or run again: the compile cache is kept)"
    cmd = [sys.executable, "-m", "sam_kernels.bench.warm", case.name, str(dtype).replace("torch.", ""), device.type]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own process group: the compiler's workers end with it
    try:
        _, err = child.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return (f"torch.compile's first compile of this list did not finish in {limit_s:.0f} s here (what it "
                f"compiled is cached: a next run goes on from there; --full gives it more time)")
    if child.returncode != 0:
        last = (err or "").strip().splitlines()[-1:] or ["no message"]
        return f"torch.compile failed: {last[0]}"
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()
    return None


def main(argv: list[str]) -> None:
    from . import steps

    name, dtype, device = argv
    case = parse_size(name)
    step = steps.build("compile", steps.make_inputs(case, getattr(torch, dtype), torch.device(device)))
    with torch.no_grad():
        step()


if __name__ == "__main__":
    main(sys.argv[1:])
