"""Two small models built in code, with random data, for the end-to-end training-step benchmark."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet (3 stages of ``blocks`` basic blocks; ResNet-20 for blocks=3, width 16)."""

    def __init__(self, width: int = 16, blocks: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, stride in enumerate((1, 2, 2)):
            cout = width * 2 ** stage
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SmallTransformer(nn.Module):
    """Pre-norm decoder-style language model (causal mask), GPT-like layout at a small size."""

    def __init__(self, vocab: int = 1024, d: int = 128, heads: int = 4, layers: int = 2, ctx: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x, mask=mask, is_causal=True)))


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_sample_loss(out, y).mean()


def _token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


MODELS = ("cnn", "transformer")


def workloads(device: torch.device, large: bool, which: tuple[str, ...] = MODELS,
              batch: Optional[int] = None) -> list[Workload]:
    """The CNN and/or the transformer with one fixed random batch each (``large``: GPU-sized batches;
    ``batch`` overrides both batch sizes)."""
    g = torch.Generator().manual_seed(0)
    batch_img, batch_seq, ctx = (128, 32, 128) if large else (32, 8, 64)
    if batch is not None:
        batch_img = batch_seq = batch
    out = []
    if "cnn" in which:
        x = torch.randn(batch_img, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (batch_img,), generator=g).to(device)
        out.append(Workload("resnet20-cifar", lambda: SmallResNet().to(device), x, y,
                            lambda o, t: F.cross_entropy(o, t, reduction="none")))
    if "transformer" in which:
        x = torch.randint(0, 1024, (batch_seq, ctx), generator=g).to(device)
        y = torch.randint(0, 1024, (batch_seq, ctx), generator=g).to(device)
        out.append(Workload(f"transformer-2x128-ctx{ctx}", lambda: SmallTransformer(ctx=ctx).to(device), x, y,
                            _token_loss))
    return out
