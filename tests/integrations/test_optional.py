"""The core package and sam_kernels.integrations import no framework; each integration names its extra when
its framework is missing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")

# Makes the frameworks unimportable, as in an install without the extras.
BLOCK = f"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FRAMEWORKS!r}:
            raise ImportError(f"No module named {{name!r}}")
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_core_and_package_import_no_framework():
    p = subprocess.run([sys.executable, "-c", "import sys, sam_kernels, sam_kernels.integrations, sam_kernels.optim; "
                        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@pytest.mark.parametrize("module, extra", [("lightning", "lightning"), ("transformers", "transformers"),
                                           ("accelerate", "accelerate")])
def test_missing_framework_names_the_extra(module, extra):
    p = _run(f"import sam_kernels.integrations.{module}")
    assert p.returncode != 0
    assert f"pip install 'sam_kernels[{extra}]'" in p.stderr, p.stderr[-2000:]
