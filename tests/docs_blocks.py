"""The ```python blocks of a documentation page (or of one of its sections), for tests that check
what a page's example does in more detail than tests/test_docs.py (which runs every block)."""
from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str, heading: str | None = None) -> list[str]:
    """The blocks of ``docs/<page>``, or of its section under the Markdown heading ``heading``
    (its whole line, e.g. ``"## Accelerate"``) up to the next heading of the same or a higher level."""
    text = (DOCS / page).read_text()
    if heading is not None:
        start = text.index(f"\n{heading}\n")
        level = heading.split(" ")[0]
        ends = [m.start() for m in re.finditer(r"\n#{1,%d} " % len(level), text[start + 1:])]
        text = text[start:start + 1 + ends[0]] if ends else text[start:]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)
