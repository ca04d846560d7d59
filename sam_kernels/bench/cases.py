"""Parameter lists to benchmark: single tensors and the shape lists of two real models.

A case is a name plus a list of shapes. The model cases are generated here from the models'
definitions (no torchvision / transformers needed), so the tensor count and sizes are the real
ones: that is what matters to a multi-tensor kernel (launch count, chunk tables, tails).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[Shape, ...]
    channels_last: bool = False
    """4-D tensors (conv weights) in torch.channels_last, as after model.to(memory_format=torch.channels_last)."""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


def resnet50_shapes(num_classes: int = 1000) -> list[Shape]:
    """torchvision resnet50().parameters() shapes, in order: 161 tensors, 25,557,032 elements."""
    shapes: list[Shape] = []

    def conv_bn(cin: int, cout: int, k: int) -> None:
        shapes.append((cout, cin, k, k))  # convs have no bias in ResNet: BN follows
        shapes.extend([(cout,), (cout,)])  # BN weight, bias

    conv_bn(3, 64, 7)
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            conv_bn(cin, width, 1)
            conv_bn(width, width, 3)
            conv_bn(width, width * 4, 1)
            if b == 0:  # projection shortcut: torchvision registers it after conv3/bn3
                conv_bn(cin, width * 4, 1)
            cin = width * 4
    shapes.extend([(num_classes, 2048), (num_classes,)])
    return shapes


def gpt2_small_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> list[Shape]:
    """GPT-2 small (HF GPT2Model + tied LM head) parameter shapes: 148 tensors, 124,439,808 elements."""
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),                 # ln_1
                   (d, 3 * d), (3 * d,),       # attn.c_attn (Conv1D layout: in, out)
                   (d, d), (d,),               # attn.c_proj
                   (d,), (d,),                 # ln_2
                   (d, 4 * d), (4 * d,),       # mlp.c_fc
                   (4 * d, d), (d,)]           # mlp.c_proj
    shapes += [(d,), (d,)]                     # ln_f
    return shapes


def gpt2_blocks_shapes(blocks: int = 12, d: int = 768) -> list[Shape]:
    """The transformer blocks of GPT-2 small without embeddings and final norm: 12 tensors per
    block; 12 blocks = 144 tensors, 85,054,464 elements."""
    return gpt2_small_shapes(d=d, layers=blocks)[2:-2]


def small_shapes(count: int = 2000, numel: int = 64) -> list[Shape]:
    """Many small tensors (biases, norms, adapters): the step's cost is per tensor, not per byte."""
    return [(numel,)] * count


def host_shapes() -> list[Shape]:
    """ResNet-50's tensor count with 16 elements each: the kernels have nothing to do, so the time
    is the host's (Python layer, dispatch, checks, launches) — what bounds a step of a small model."""
    return [(16,)] * len(resnet50_shapes())


def _single(numel: int) -> list[Shape]:
    return [(numel,)]


_M = 1 << 20
CASES = {
    "1M": lambda: _single(_M),
    "16M": lambda: _single(16 * _M),
    "64M": lambda: _single(64 * _M),
    "resnet50": resnet50_shapes,
    "resnet50_cl": resnet50_shapes,  # the same list in channels_last (CHANNELS_LAST)
    "gpt2": gpt2_small_shapes,
    "host": host_shapes,
    "gpt2_blocks": gpt2_blocks_shapes,
    "gpt2_blocks_2": lambda: gpt2_blocks_shapes(2),
    "small": small_shapes,
    "small_500": lambda: small_shapes(500),
}
CHANNELS_LAST = ("resnet50_cl",)
SMALL = ("host", "small", "small_500")
"""Cases whose step cost is per tensor (the small-tensor targets apply); every other case is large."""


def kind(name: str) -> str:
    """"small" or "large": which targets a case's ratios are judged against (verdict.target)."""
    return "small" if name in SMALL else "large"


def parse_size(name: str) -> Case:
    """A named case, or ``<n>`` / ``<n>k`` / ``<n>M`` for one tensor of that many elements."""
    if name in CASES:
        return Case(name, tuple(CASES[name]()), channels_last=name in CHANNELS_LAST)
    units = {"k": 1 << 10, "K": 1 << 10, "m": _M, "M": _M}
    try:
        numel = int(name[:-1]) * units[name[-1]] if name[-1] in units else int(name)
    except ValueError:
        raise ValueError(f"unknown size {name!r}: use one of {sorted(CASES)} or a count like 4096, 64k, 2M") from None
    if numel < 1:
        raise ValueError(f"size {name!r} must be at least one element")
    return Case(name, ((numel,),))
