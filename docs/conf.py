"""Sphinx configuration of the sam_kernels documentation (build: ``sphinx-build -W -b html docs OUT``)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, not another installed copy


def _pyproject() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    return {"version": re.search(r'^version = "([^"]+)"', text, re.M).group(1),
            "python_min": re.search(r'^requires-python = ">=([^"]+)"', text, re.M).group(1),
            "torch_min": re.search(r'"torch>=([^"]+)"', text).group(1)}


def _install_torch() -> dict[str, str]:
    # scripts/install.sh is the one source of the torch releases it installs: its CUDA branch
    # comes first, then the CPU one.
    script = (ROOT / "scripts" / "install.sh").read_text()
    cuda, cpu = re.findall(r'spec="torch==\$\{TORCH_VERSION:-([^}]+)\}"', script)
    return {"torch_cuda": cuda, "torch_cpu": cpu}


def _benchmark_tables() -> str:
    """The recorded benchmark rows (benchmarks/results/*.jsonl) as the harness's own tables and plots."""
    from sam_kernels.bench import results

    parts = []
    for rows_file in sorted((ROOT / "benchmarks" / "results").glob("*.jsonl")):
        rows = results.read(rows_file)
        if not rows:
            continue
        source = rows_file.relative_to(ROOT)
        parts += [f"## {rows[0]['device']}", "",
                  f"From `{source}`, recorded {rows[0]['timestamp'][:10]} at commit `{rows[0]['commit'][:10]}`.", "",
                  "```text", results.table(rows).strip("\n"), "", "Verdicts:", *results.verdicts(rows), "```", ""]
        if rows_file.with_suffix(".png").exists():
            parts += [f"![ratios, {rows[0]['device']}](../{source.with_suffix('.png')})", ""]
    return "\n".join(parts) or "*No result rows are recorded yet.*\n"


def _fidelity_table() -> str:
    """The fidelity table from the recorded rows (benchmarks/results/fidelity/rows.jsonl), by the
    script that wrote them (benchmarks/train_digits.py)."""
    import importlib.util
    import json

    rows_file = ROOT / "benchmarks" / "results" / "fidelity" / "rows.jsonl"
    if not rows_file.exists():
        return "*No fidelity rows are recorded yet.*\n"
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "benchmarks" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    return module.table(rows, str(rows_file.relative_to(ROOT)))


def _op_table() -> str:
    """The op table (sam_kernels/ops/contract.py) as a Markdown table: one row per op."""
    from sam_kernels.ops.contract import OPS

    rows = ["| op | kind | writes | what it computes | bytes floor per element (fp32) | backends |",
            "|---|---|---|---|---|---|"]
    for op in OPS.values():
        extra = op.bytes_per_element[1]
        floor = f"{4 * op.floor_units + extra} B ({op.moves})"
        writes = ", ".join(f"`{w}`" for w in op.writes) or "(returns)"
        rows.append(f"| `{op.name}` | {op.kind} | {writes} | {op.doc.replace('|', '∣')} | {floor} | "
                    f"{', '.join(op.backends)} |")
    return "\n".join(rows) + "\n"


# benchmarks.md, fidelity.md and op-contracts.md include these, made from the code at each build, never typed by hand.
(ROOT / "docs" / "_generated").mkdir(exist_ok=True)
(ROOT / "docs" / "_generated" / "benchmark_tables.md").write_text(_benchmark_tables())
(ROOT / "docs" / "_generated" / "op_table.md").write_text(_op_table())
(ROOT / "docs" / "_generated" / "fidelity_table.md").write_text(_fidelity_table())

project = "sam_kernels"
author = "sam_kernels contributors"
PYPROJECT = _pyproject()
release = version = PYPROJECT["version"]

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated", "_*.md", "**/_*.md"]  # _name.md: parts included by other pages

myst_enable_extensions = ["colon_fence", "dollarmath", "substitution", "deflist"]
myst_heading_anchors = 3
myst_substitutions = {**PYPROJECT, **_install_torch()}  # versions.md shows them

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"sam_kernels {version}"

# The docstrings write maths in plain text, |w| included; reStructuredText would read |w| as a
# substitution reference. Escape bars outside literal text (``...``, literal blocks).
_BARS = re.compile(r"(?<![\\|])\|(?=[^\s|])([^|`]*?[^\s\\|])\|(?!\|)")
_LITERAL = re.compile(r"(``.*?``)")


def _escape_bars(app, what, name, obj, options, lines):
    block_indent = None  # indentation of the paragraph that opened a literal block (::)
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not line.strip() or indent > block_indent:
                continue
            block_indent = None
        parts = _LITERAL.split(line)
        lines[i] = "".join(p if p.startswith("``") else _BARS.sub(r"\\|\1\\|", p) for p in parts)
        if line.rstrip().endswith("::"):
            block_indent = indent


def setup(app):
    app.connect("autodoc-process-docstring", _escape_bars)
