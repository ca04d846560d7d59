"""The runnable example trains under torchrun (2 gloo processes on CPU) and its replicas agree."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [["--mode", "m-sam", "--variant", "sssam"],
                                  ["--mode", "global", "--wrap", "fsdp2", "--variant", "looksam"]])
def test_example_runs_under_torchrun(args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "train_distributed.py"), "--steps", "30", *args]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert "max weight difference between ranks 0.0e+00" in last, last
