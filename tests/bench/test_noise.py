"""The footer's noise facts (sam_kernels/bench/noise.py): other processes' CPU time, own children."""
import subprocess
import sys
import time

import pytest

from sam_kernels.bench import noise


def test_cpu_usage_from_snapshots():
    a = noise.CpuSnapshot(t=0.0, busy_s=10.0, steal_s=1.0, own_s=2.0)
    b = noise.CpuSnapshot(t=2.0, busy_s=13.0, steal_s=1.5, own_s=3.0)
    # 3 s busy of which 1 s our own over 2 s: others 1 core; steal 0.5 s / 2 s
    assert noise.usage(a, b) == {"others_cores": 1.0, "steal_cores": 0.25, "window_s": 2.0}
    assert noise.usage(a, a) is None and noise.usage(None, b) is None


def test_own_cpu_counts_child_processes():
    """torch.compile's workers are the benchmark's own work: a busy child must not count as other processes."""
    if noise.snap() is None:
        pytest.skip("no /proc/stat")
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(5)"
    before = noise.own_cpu_s()
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 60
        while noise.own_cpu_s() - before < 0.45 and time.monotonic() < deadline:
            time.sleep(0.05)
        live = noise.own_cpu_s() - before  # the child is alive (sleeping): counted from /proc
        assert live >= 0.45
    finally:
        child.kill()
        child.wait()
    assert noise.own_cpu_s() - before >= live - 0.02  # ended and waited for: still counted (os.times)
