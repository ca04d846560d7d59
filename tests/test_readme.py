"""README.md: short, its two commands as CI runs them, its example runs, its links lead somewhere,
and neither it nor the documentation shows raw Sphinx roles or words of the project's own process."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import sam_kernels as sk

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def test_at_most_150_lines():
    assert len(TEXT.splitlines()) <= 150


def test_the_two_commands():
    assert "bash scripts/install.sh && .venv/bin/python -m sam_kernels.bench\n" in TEXT
    test_command = "bash scripts/install.sh && .venv/bin/python -m pytest -q tests"
    assert test_command + "\n" in TEXT
    assert test_command in (ROOT / ".ci" / "run").read_text()  # CI runs what README says


def test_example_trains():
    [block] = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    opt = scope["opt"]
    assert isinstance(opt, sk.SAM) and opt.stats()["steps"] == opt.stats()["sam_steps"] == 100


def test_relative_links_exist():
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", TEXT)
    assert len(links) >= 10
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_raw_roles_or_process_words(page):
    text = page.read_text()
    # MyST renders {eval-rst} blocks; a role written straight into Markdown shows raw.
    outside_rst = re.sub(r"```\{eval-rst\}.*?```", "", text, flags=re.S)
    assert not re.findall(r"(?<![{`]):(func|class|meth|mod|attr|data):`", outside_rst)
    words = re.findall(r"issue #\d+|\bissues? \d+\b|\blent\b|\bhelper agents?\b|\bsessions?\b", text, flags=re.I)
    assert not words, words


USER_FACING = sorted({*ROOT.glob("sam_kernels/**/*.py"), *ROOT.glob("scripts/*"), *ROOT.glob("examples/**/*.py"),
                      *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("benchmarks/**/*.md"), ROOT / "setup.py"})


def test_no_process_words_in_code_scripts_and_reports():
    """Docstrings, messages, script output and benchmark reports name no issue numbers and no
    work-process words (``session`` is left out here: the benchmark has a measuring session)."""
    assert len(USER_FACING) >= 50
    process = re.compile(r"issue #\d+|\bissues? \d+\b|(?<![&\w])#\d{1,2}\b|\blent\b|\bhelper agents?\b", flags=re.I)
    found = {str(p.relative_to(ROOT)): process.findall(p.read_text(errors="replace")) for p in USER_FACING if p.is_file()}
    assert not {k: v for k, v in found.items() if v}


def test_versions_and_sizes_have_one_source():
    """Release numbers of torch and sizes in GB are stated on docs/versions.md only (the changelog's
    dated records aside); versions.md reads install.sh's torch releases when the site is built."""
    install = (ROOT / "scripts" / "install.sh").read_text()
    releases = set(re.findall(r"TORCH_VERSION:-([0-9.]+)", install))
    assert len(releases) == 2
    figure = re.compile(r"\b\d+(?:\.\d+)? ?GB\b(?!/s)|" + "|".join(re.escape(r) for r in releases))
    stray = {str(p.relative_to(ROOT)): figure.findall(p.read_text()) for p in PAGES
             if p.name not in ("versions.md", "changelog.md")}
    assert not {k: v for k, v in stray.items() if v}
