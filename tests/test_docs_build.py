"""The documentation site builds with warnings as errors (sphinx, myst-parser and furo: the docs extra,
installed by scripts/install.sh)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sam_kernels
from sam_kernels import ops

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(ROOT / "docs"), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "reference" / "op-contracts.html").read_text().count('class="sig sig-object py"') == len(ops.contract.OPS)
    benchmarks = (tmp_path / "benchmarks.html").read_text()  # the tables made from each recorded rows file
    for rows_file in (ROOT / "benchmarks" / "results").glob("*.jsonl"):
        device = json.loads(rows_file.read_text().splitlines()[0])["device"]
        assert device in benchmarks and rows_file.name in benchmarks
    fidelity = (tmp_path / "fidelity.html").read_text()  # the fidelity table made from its rows: every method
    rows = (ROOT / "benchmarks" / "results" / "fidelity" / "rows.jsonl").read_text().splitlines()
    methods = {json.loads(line)["method"] for line in rows if line.strip()}
    assert methods and not [m for m in methods if f'<tr class="row-odd"><td><p>{m}</p>' not in fidelity
                            and f'<tr class="row-even"><td><p>{m}</p>' not in fidelity]
    documented = "".join(p.read_text() for p in (tmp_path / "reference").glob("*.html"))
    public = [f"sam_kernels.{n}" for n in sam_kernels.__all__ if n != "ops"]
    public += [f"sam_kernels.ops.{n}" for n in ops.__all__ if n not in ("reference", *sam_kernels.__all__)]
    assert not [name for name in public if f'id="{name}"' not in documented]  # every public name has its entry
