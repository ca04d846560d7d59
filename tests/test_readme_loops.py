"""The loops of README's "Using it in a real training loop" run as written.

Each ```python block of that section is executed with a small model (BatchNorm included), a loss
and a few random batches; a block that raises fails the test. The loops' maths is tested
elsewhere (tests/optim/test_amp.py, test_contract.py, test_batchnorm.py): this keeps the README true.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sam_kernels as sk

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("## Using it in a real training loop")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


BLOCKS = section_blocks()


def test_section_has_loops():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_loop_runs(index):
    torch._dynamo.reset()  # a user's program starts with no compiled code (Dynamo's recompile limit is per process)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    loader = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    scope = dict(torch=torch, sk=sk, F=F, model=model, loss_fn=F.cross_entropy, loader=loader,
                 device_type="cpu", x=loader[0][0], y=loader[0][1])
    exec(compile(BLOCKS[index], f"README block {index}", "exec"), scope)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "the loop did not train"
