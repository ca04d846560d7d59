"""The benchmark runs with the core install alone: without matplotlib it says so in one line and
writes its rows (the console script once crashed on a missing optional package)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs the given code with matplotlib (and other optional packages) unimportable, as in an environment without them.
BLOCK = """
import sys
for _name in ("tqdm", "matplotlib", "pytorch_optimizer"):
    sys.modules[_name] = None  # import raises ModuleNotFoundError, importlib.util.find_spec returns None
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_help_without_optional_packages():
    p = _run("import runpy; sys.argv = ['sam-kernels-bench', '--help']; runpy.run_module('sam_kernels.bench', "
             "run_name='__main__')")
    assert p.returncode == 0, p.stderr
    assert "verdict" in p.stdout and "--full" in p.stdout and "--budget" in p.stdout


def test_run_without_matplotlib_says_so_in_one_line(tmp_path):
    p = _run("from sam_kernels.bench.__main__ import main; sys.exit(main(sys.argv[1:]))",
             "--ops", "grad_sq_norm", "--cases", "4096", "--min-rounds", "2", "--max-rounds", "2",
             "--copy-size", "4096", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("no plot: matplotlib is not installed (pip install matplotlib)") == 1
    assert "Traceback" not in p.stderr
    assert [f.suffix for f in sorted(tmp_path.iterdir())] == [".jsonl"]
    assert "Verdicts" in p.stdout
