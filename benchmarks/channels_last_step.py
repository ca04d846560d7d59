"""The whole fused SAM optimizer step on ResNet-50's parameter list, contiguous vs channels_last,
timed INTERLEAVED (one repeat of each layout in turn), so that load drifting on a shared machine
hits both layouts alike; `python -m sam_kernels.bench --sizes resnet50 resnet50_cl` times the two
cases one after the other instead. Prints a markdown table (median, p20-p80, ratio channels_last /
contiguous, share of elements on a compiled backend) and writes it with ``--out``.

    python benchmarks/channels_last_step.py --repeats 30 --out benchmarks/results/channels-last/interleaved.md
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sam_kernels import ops
from sam_kernels.bench.cases import parse_size
from sam_kernels.bench.environment import device_name
from sam_kernels.bench.op_specs import SPECS
from sam_kernels.bench.state import make_state


def quantile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=["sam_optimizer_step", "sam_adamw_step"])
    ap.add_argument("--backends", nargs="+", default=["cpp", "eager"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = [parse_size("resnet50"), parse_size("resnet50_cl")]
    rows = []
    with torch.no_grad():
        for op in args.ops:
            spec = SPECS[op]
            for backend in args.backends:
                states = [make_state(c, spec, torch.float32, device) for c in cases]
                shares, times = [], [[], []]
                for k, s in enumerate(states):  # warm-up; the first call creates the optimizer state
                    with ops.recording() as calls:
                        spec.api(s, backend)
                    total = sum(r.elements() for r in calls)
                    shares.append(sum(r.fused_elements for r in calls) / total)
                for _ in range(args.repeats):
                    for k, s in enumerate(states):
                        sync()
                        t0 = time.perf_counter()
                        spec.api(s, backend)
                        sync()
                        times[k].append((time.perf_counter() - t0) * 1e3)
                med = [statistics.median(t) for t in times]
                rows.append(f"| {op} | {backend} | {med[0]:.1f} ({quantile(times[0], .2):.1f}–{quantile(times[0], .8):.1f}) "
                            f"| {med[1]:.1f} ({quantile(times[1], .2):.1f}–{quantile(times[1], .8):.1f}) "
                            f"| {med[1] / med[0]:.2f}x | {shares[0]:.0%} / {shares[1]:.0%} |")
                del states
    lines = [f"# Fused SAM step, ResNet-50 list (161 tensors, 25.6M), contiguous vs channels_last — {device_name(device)}",
             "", f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats, "
             f"fp32; ms median (p20–p80); ratio = channels_last / contiguous; fused = share of elements on a "
             f"compiled backend (contiguous / channels_last).", "",
             "| step | backend | contiguous ms | channels_last ms | ratio | fused |", "|---|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
