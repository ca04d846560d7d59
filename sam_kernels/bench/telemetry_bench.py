"""Telemetry overhead: one SAM optimizer step (first_step + second_step, SGD momentum, fused
backend) with ``telemetry=False``, ``"norms"`` and ``True`` on the same parameter list, side by side.

    python -m sam_kernels.bench.telemetry_bench [--sizes resnet50 host] [--device cpu] [--rounds 5]
                                                [--repeats 10] [--finite-check] [--out bench_out/telemetry.json]

Each optimizer gets its own copy of the list (same values); the timings alternate off/norms/on for
``--rounds`` rounds of ``--repeats`` steps each, so slow drifts of a shared machine hit both; the
figure is the median over all repeats, with the per-round medians' spread. Gradients stay in place
(``zero_grad=False``): every step does the same work. Also reported: the bytes per step at the ops'
floors (``stats()["optimizer_bytes"]``), on versus off: the extra traffic telemetry adds.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Optional

import torch

from . import cases as C
from .environment import environment
from .timing import Timer

RHO, LR, MOMENTUM = 0.05, 0.1, 0.9


MODES = {"off": False, "norms": "norms", "on": True}


def _optimizer(case: C.Case, device: torch.device, telemetry, backend: Optional[str], finite_check: bool):
    import sam_kernels

    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) for s in case.shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen).mul_(1e-2)
    opt = sam_kernels.SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, backend=backend,
                          finite_check=finite_check, telemetry=telemetry)

    def step() -> None:
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)
    return opt, step


def measure(case: C.Case, device: torch.device, rounds: int, repeats: int, backend: Optional[str],
            finite_check: bool) -> dict:
    built = {name: _optimizer(case, device, mode, backend, finite_check) for name, mode in MODES.items()}
    timer = Timer(device, warmup=2, repeats=repeats)
    samples: dict[str, list] = {name: [] for name in MODES}
    for _ in range(rounds):
        for name, (_, fn) in built.items():
            samples[name].append(timer.time(fn).median_ms)
    bytes_per_step = {}
    for name, (opt, _) in built.items():
        st = opt.stats()
        bytes_per_step[name] = st["optimizer_bytes"] / st["steps"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"case": case.name, "tensors": case.tensors, "numel": case.numel, "finite_check": finite_check,
            "median_ms": med, "overhead_pct": {k: 100 * (med[k] / med["off"] - 1) for k in ("norms", "on")},
            "round_medians_ms": samples, "bytes_per_step": bytes_per_step,
            "extra_bytes_pct": {k: 100 * (bytes_per_step[k] / bytes_per_step["off"] - 1) for k in ("norms", "on")}}


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"Telemetry overhead, SAM step (SGD momentum, fp32), {env.get('device', '')}", "",
             "| case | finite_check | off ms | norms ms | on ms | norms overhead | on overhead | MB/step off | "
             "norms | on |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b, m, o = r["bytes_per_step"], r["median_ms"], r["overhead_pct"]
        lines.append(f"| {r['case']} ({r['tensors']} tensors, {r['numel']:,}) | {r['finite_check']} | "
                     f"{m['off']:.2f} | {m['norms']:.2f} | {m['on']:.2f} | {o['norms']:+.1f} % | {o['on']:+.1f} % | "
                     f"{b['off'] / 1e6:.0f} | {b['norms'] / 1e6:.0f} | {b['on'] / 1e6:.0f} |")
    lines.append("")
    for r in rows:
        rounds = "; ".join(f"{k} {[round(x, 2) for x in v]}" for k, v in r["round_medians_ms"].items())
        lines.append(f"Round medians, {r['case']} finite_check={r['finite_check']} (ms, modes alternating): {rounds}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.bench.telemetry_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["resnet50", "host"], help="cases of sam_kernels.bench.cases")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="kernel backend (default: auto)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--finite-check", nargs="+", type=int, default=[0, 1],
                    help="finite_check settings to run (0/1); 1 gives the descent norm for free (one sync)")
    ap.add_argument("--out", default=None, help="write the rows as JSON (and .md beside it)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    rows = [measure(C.parse_size(s), device, args.rounds, args.repeats, args.backend, bool(fc))
            for s in args.sizes for fc in args.finite_check]
    text = markdown(rows, env)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str))
        out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
