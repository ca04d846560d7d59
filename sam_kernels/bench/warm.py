"""torch.compile's first compile of a list, in a child process with a time limit (ours).

Inductor's first compile of a step over a few hundred tensors takes minutes on a loaded 2-core CPU
(ResNet-50's 161 tensors: 2.5 min measured), more than a 3-minute run can give it, and a compile
cannot be interrupted in-process. So the benchmark compiles each list once in a child process
(while it checks the other implementations) under the case's time limit: what it compiles lands in Inductor's on-disk cache, and a marker file
beside that cache records a list whose compile finished. With the marker, the benchmark compiles in
its own process from the cache (tracing is not cached: about a minute for a few hundred tensors
on a loaded 2-core CPU); the marker holds how long that took (measured first by the child, which
compiles twice), and a run with less time left skips the ``compile`` row and says so. Without the marker and out of time, the row says so
and the next run goes on from what the cache holds.

    python -m sam_kernels.bench.warm CASE DTYPE DEVICE THREADS   # the child: compile CASE's step once

The child runs with the parent's torch thread count: Inductor's CPU code is generated for it.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .cases import Case, parse_size


def marker(case: Case, dtype: torch.dtype, device: torch.device) -> Path:
    """The file that says ``case``'s compiled step is in Inductor's cache (it is cleared with the cache)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    key = repr((torch.__version__, str(dtype), device.type, torch.get_num_threads(), case.shapes))
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir()) / "sam_kernels_bench" / f"{case.name}-{key}.done"


class Warming:
    """``case``'s first compile, running in a child process from construction on (none when the
    marker says the list is compiled): the caller does other untimed work meanwhile, then ``wait``s."""

    def __init__(self, case: Case, dtype: torch.dtype, device: torch.device):
        self.done = marker(case, dtype, device)
        self.reuse_s = _recorded_s(self.done)
        self.child: Optional[subprocess.Popen] = None
        if not self.done.exists():
            cmd = [sys.executable, "-m", "sam_kernels.bench.warm", case.name, str(dtype).replace("torch.", ""),
                   device.type, str(torch.get_num_threads())]
            # its own process group: the compiler's workers end with it
            self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True)

    def wait(self, deadline: float) -> Optional[str]:
        """None when the compiled step is cached (before, or now, by ``deadline``, a
        ``time.perf_counter`` value) and compiling it from the cache fits before ``deadline`` (as
        long as it took last time, or in the child); otherwise why not. The child never outlives
        this call."""
        limit_s = deadline - time.perf_counter()
        if self.child is None:
            if self.reuse_s is not None and self.reuse_s > limit_s:
                return (f"torch.compile's tracing of this list took {self.reuse_s:.0f} s the last time a benchmark "
                        f"ran it on this machine (recorded beside Inductor's cache, {self.done.parent}), more than "
                        f"the {max(limit_s, 0):.0f} s left for it here (--budget, or --full)")
            return None
        try:
            out, err = self.child.communicate(timeout=max(limit_s, 0.0))
        except BaseException as exc:  # out of time, or the run itself interrupted
            os.killpg(self.child.pid, signal.SIGKILL)
            self.child.communicate()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            return (f"torch.compile's first compile of this list did not finish in the {max(limit_s, 0):.0f} s left "
                    f"for it here (what it compiled is cached: a next run goes on from there; --full gives it "
                    f"more time)")
        if self.child.returncode != 0:
            last = (err or "").strip().splitlines()[-1:] or ["no message"]
            return f"torch.compile failed: {last[0]}"
        self.done.parent.mkdir(parents=True, exist_ok=True)
        self.done.write_text(out.strip().splitlines()[-1] + "\n")  # the child's compile from the cache, s
        self.reuse_s, self.child = _recorded_s(self.done), None
        return self.wait(deadline)  # that compile must still fit in what is left

    def record(self, seconds: float) -> None:
        """Notes how long the compile from the cache took in the benchmark's process (the next
        run skips it when less time is left)."""
        self.done.write_text(f"{seconds:.1f}\n")


def _recorded_s(done: Path) -> Optional[float]:
    try:
        return float(done.read_text())
    except (OSError, ValueError):  # no marker, or one from a child that has not been reused yet
        return None


def main(argv: list[str]) -> None:
    from . import steps

    name, dtype, device, threads = argv
    torch.set_num_threads(int(threads))
    inputs = steps.make_inputs(parse_size(name), getattr(torch, dtype), torch.device(device))
    with torch.no_grad():
        steps.build("compile", inputs)()  # fills the cache
        torch._dynamo.reset()
        t0 = time.perf_counter()
        steps.build("compile", inputs)()  # what the benchmark's process will pay: tracing, and the cache
    print(f"{time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
