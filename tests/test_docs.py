"""Every Python block of the guides, of "Getting started" and of the front page runs as written.

Blocks are found by sybil's MyST parser (```python fences). Each block runs on its own, in a fresh
namespace holding the imports the guides assume (``torch``, ``F`` for ``torch.nn.functional``,
``sk`` for ``sam_kernels``), what they call yours: ``model`` (a small MLP with BatchNorm), ``loss_fn``,
``loader`` (a DataLoader of four random batches), ``x``/``y`` (one batch) and ``device_type`` (``"cpu"``), with the
working directory in a temporary folder and torchrun's variables set for a world of one process
(so the distributed blocks run, on gloo). A block that takes optimizer steps must change the
model's weights (or, when it builds its own model, its optimizers must count steps). A block preceded by ``% skip: next "reason"`` (a MyST comment) is skipped with that
reason: only blocks that need a GPU or several processes are.
The loops' maths is tested elsewhere (tests/optim/); this keeps the documentation true.
"""
from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sybil import Document
from sybil.parsers.myst import PythonCodeBlockParser, SkipParser

import sam_kernels as sk

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = [DOCS / "index.md", DOCS / "getting-started.md", *sorted(p for p in (DOCS / "guides").glob("*.md") if not p.name.startswith("_"))]
TRAINS = re.compile(r"\b(first_step|second_step|base_step|step|fit|train)\(")


def blocks(page: Path) -> list[tuple[object, str | None]]:
    """The page's Python examples in order, each with its skip reason (None: it runs)."""
    skip = SkipParser()
    document = Document.parse(str(page), PythonCodeBlockParser(), skip)
    found, reason = [], None
    for example in document:
        if example.region.evaluator is skip.skipper:
            action, argument = example.parsed
            assert action == "next" and argument, f"{page.name}:{example.line}: use '% skip: next \"reason\"'"
            reason = argument.strip().strip("\"'")
            continue
        found.append((example, reason))
        reason = None
    return found


CASES = [(page, i) for page in PAGES for i in range(len(blocks(page)))]


def test_every_page_has_blocks():
    assert {page for page, _ in CASES} == set(PAGES)


def test_few_blocks_are_skipped():
    reasons = [reason for page in PAGES for _, reason in blocks(page) if reason]
    assert all(("GPU" in r or "processes" in r) for r in reasons), reasons
    assert len(reasons) <= 6, reasons


def make_scope() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    x, y = next(iter(loader))
    return dict(torch=torch, F=F, sk=sk, model=model, loss_fn=F.cross_entropy, loader=loader, x=x, y=y,
                device_type="cpu")


def single_process_group(monkeypatch) -> None:
    """What torchrun sets, for one process: the distributed guides' blocks run as a world of one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                            WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("page, index", CASES, ids=[f"{p.relative_to(DOCS)}:{i}" for p, i in CASES])
def test_block_runs(page, index, tmp_path, monkeypatch):
    example, reason = blocks(page)[index]
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    single_process_group(monkeypatch)
    torch._dynamo.reset()  # a user's program starts with no compiled code (Dynamo's recompile limit is per process)
    torch.manual_seed(0)
    scope = make_scope()
    before = [p.detach().clone() for p in scope["model"].parameters()]
    example.namespace.clear()
    example.namespace.update(scope)
    try:
        example.evaluate()
    finally:
        if dist.is_initialized():  # a block that failed before its own destroy_process_group
            dist.destroy_process_group()
        if "accelerate" in sys.modules:  # Accelerate keeps one configuration per process (the HF Trainer uses it)
            sys.modules["accelerate"].state.AcceleratorState._reset_state(True)
    if not TRAINS.search(example.region.parsed):
        return
    if example.namespace["model"] is scope["model"]:
        after = [p.to_local() if hasattr(p, "to_local") else p for p in scope["model"].parameters()]  # FSDP2
        assert any(not torch.equal(a, p) for a, p in zip(before, after)), "the block takes steps but the model did not change"
    else:  # the block builds its own model: its optimizer must have stepped
        opts = [v for v in example.namespace.values() if isinstance(v, sk.SAM)]
        assert opts and all(o.stats()["steps"] > 0 for o in opts), "the block's optimizer took no step"


def test_the_amp_loop_errors_show_runs_on_cpu():
    """The GradScaler loop that errors print (a GradScaler stepping a SAM built without it) runs as
    shown, with an enabled scaler, where the model runs on a CPU."""
    from textwrap import dedent

    from sam_kernels.optim.amp import LOOP

    torch.manual_seed(0)
    scope = make_scope()
    before = [p.detach().clone() for p in scope["model"].parameters()]
    scope["sam_kernels"] = sk
    exec(compile(dedent(LOOP), "the GradScaler loop of the errors", "exec"), scope)
    assert scope["scaler"].is_enabled()
    assert any(not torch.equal(a, p) for a, p in zip(before, scope["model"].parameters()))
