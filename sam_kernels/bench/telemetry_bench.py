"""Telemetry overhead: one SAM optimizer step (first_step + second_step, SGD momentum, fused
backend) with ``telemetry=False``, ``"norms"`` and ``True`` on the same parameter list, side by side;
``True`` twice: as in a loop whose ``zero_grad`` sets p.grad to None (g(w) is held, the default) and
as in one that zeroes p.grad in place (``copy``: g(w) is copied in first_step).

    python -m sam_kernels.bench.telemetry_bench [--sizes resnet50 host] [--device cpu] [--rounds 5]
                                                [--repeats 10] [--finite-check] [--out bench_out/telemetry.json]

Each optimizer gets its own copy of the list (same values); the timings alternate off/norms/on for
``--rounds`` rounds of ``--repeats`` steps each, so slow drifts of a shared machine hit both; the
figure is the median over all repeats, with the per-round medians' spread. Each step hands the
optimizer the same two gradient sets, as the two backwards of a real loop do (new p.grad tensors for
the second pass): every step does the same work and nothing is allocated. Also reported: the bytes
per step at the ops' floors (``stats()["optimizer_bytes"]``), on versus off: the extra traffic
telemetry adds.
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


MODES = {"off": False, "norms": "norms", "on": True, "copy": True}
"""name -> the ``telemetry`` option; ``copy``: as ``on`` in a loop that zeroes gradients in place."""


def _optimizer(case: C.Case, device: torch.device, mode: str, backend: Optional[str], finite_check: bool):
    import sam_kernels

    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) for s in case.shapes]
    first, second = ([torch.randn(p.shape, device=device, generator=gen).mul_(1e-2) for p in params] for _ in range(2))
    opt = sam_kernels.SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, backend=backend,
                          finite_check=finite_check, telemetry=MODES[mode])
    opt.telemetry.hold_grads = mode != "copy"

    def step() -> None:
        for p, g in zip(params, first):
            p.grad = g
        opt.first_step()
        for p, g in zip(params, second):  # the second backward's gradients: new tensors (set_to_none loop)
            p.grad = g
        opt.second_step()
    return opt, step


def measure(case: C.Case, device: torch.device, rounds: int, repeats: int, backend: Optional[str],
            finite_check: bool) -> dict:
    built = {name: _optimizer(case, device, name, backend, finite_check) for name in MODES}
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
            "median_ms": med, "overhead_pct": {k: 100 * (med[k] / med["off"] - 1) for k in MODES if k != "off"},
            "round_medians_ms": samples, "bytes_per_step": bytes_per_step,
            "extra_bytes_pct": {k: 100 * (bytes_per_step[k] / bytes_per_step["off"] - 1) for k in MODES if k != "off"}}


def markdown(rows: list[dict], env: dict) -> str:
    others = [k for k in MODES if k != "off"]
    lines = [f"Telemetry overhead, SAM step (SGD momentum, fp32), {env.get('device', '')}", "",
             "| case | finite_check | off ms | " + " | ".join(f"{k} ms (overhead)" for k in others) + " | MB/step off | "
             + " | ".join(f"{k} MB (extra)" for k in others) + " |",
             "|---|---|" + "---:|" * (2 * len(others) + 2)]
    for r in rows:
        b, m, o, x = r["bytes_per_step"], r["median_ms"], r["overhead_pct"], r["extra_bytes_pct"]
        lines.append(f"| {r['case']} ({r['tensors']} tensors, {r['numel']:,}) | {r['finite_check']} | {m['off']:.2f} | "
                     + " | ".join(f"{m[k]:.2f} ({o[k]:+.1f} %)" for k in others) + f" | {b['off'] / 1e6:.0f} | "
                     + " | ".join(f"{b[k] / 1e6:.0f} ({x[k]:+.0f} %)" for k in others) + " |")
    lines.append("")
    lines.append("on: telemetry=True in a loop whose zero_grad sets p.grad to None (g(w) held); copy: the same in a "
                 "loop that zeroes p.grad in place (g(w) copied in first_step).")
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
