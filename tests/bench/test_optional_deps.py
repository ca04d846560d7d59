"""The benchmark runs with the core install alone: no tqdm, no matplotlib (issue #16: the console
script crashed with ModuleNotFoundError: No module named 'tqdm')."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs the given code with tqdm and matplotlib unimportable, as in an environment without them.
BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tqdm", "matplotlib"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_help_without_tqdm():
    p = _run("import runpy; sys.argv = ['sam-kernels-bench', '--help']; runpy.run_module('sam_kernels.bench', "
             "run_name='__main__')")
    assert p.returncode == 0, p.stderr
    assert "noise" in p.stdout and "--threads" in p.stdout


def test_run_without_tqdm_and_matplotlib_says_so_in_one_line_each(tmp_path):
    p = _run("from sam_kernels.bench.__main__ import main; sys.exit(main(sys.argv[1:]))",
             "--ops", "grad_sq_norm", "--backends", "eager", "--no-step", "--sizes", "4096", "--repeats", "1",
             "--warmup", "0", "--copy-size", "4096", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out.count("no progress bar: tqdm is not installed (pip install tqdm)") == 1
    assert out.count("no PNG plot: matplotlib is not installed (pip install matplotlib)") == 1
    assert "Traceback" not in p.stderr
    assert [f.suffix for f in sorted(tmp_path.iterdir())] == [".json", ".md"]
    assert "## Verdict" in p.stdout
