"""Telemetry overhead: one SAM optimizer step with telemetry off, "norms", on and on-with-a-copy, side by side.

The step is first_step + second_step, SGD momentum, fused backend, on the same parameter list with
``telemetry=False``, ``"norms"`` (the optimizers' default) and ``True``; ``True`` twice: as in a loop whose ``zero_grad``
sets p.grad to None (``on``: g(w) is held, the default) and as in one that zeroes p.grad in place
(``copy``: g(w) is copied in first_step).

    python -m sam_kernels.bench.telemetry_bench [--sizes resnet50 host] [--device cpu] [--threads 1]
                                                [--rounds 20] [--finite-check 0 1]
                                                [--out bench_out/telemetry.json]

Each optimizer gets its own copy of the list (same values); the modes are timed interleaved
(``sam_kernels.bench.measure``: one step of each mode per round, ``--rounds`` rounds), so slow
drifts of a shared machine hit all of them; the time is the median, the overhead of a mode the
median of its per-round ratios to ``off`` with a 95 % interval over blocks of rounds. Each step hands the optimizer the same two
gradient sets, as the two backwards of a real loop do (new p.grad tensors for the second pass):
every step does the same work and nothing is allocated. Also reported: the bytes per step at the
ops' floors (``stats()["optimizer_bytes"]``): the extra traffic each mode adds, exact whatever
the machine does. On a small shared machine use ``--threads 1``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from . import cases as C
from . import noise
from .environment import environment
from .measure import quantiles_ms, ratio_interval, run_rounds, time_call

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


def measure(case: C.Case, device: torch.device, rounds: int, backend: Optional[str], finite_check: bool) -> dict:
    built = {name: _optimizer(case, device, name, backend, finite_check) for name in MODES}
    for _, fn in built.values():  # warm up: the first step creates the state
        fn()
    start = noise.snap()
    samples = run_rounds(list(built), lambda name: time_call(built[name][1]), min_rounds=rounds, max_rounds=rounds)
    busy = noise.usage(start, noise.snap())
    bytes_per_step = {}
    for name, (opt, _) in built.items():
        st = opt.stats()
        bytes_per_step[name] = st["optimizer_bytes"] / st["steps"]
    med = {k: quantiles_ms(v)["median_ms"] for k, v in samples.items()}
    overhead = {k: ratio_interval(samples[k], samples["off"]) for k in MODES if k != "off"}
    return {"case": case.name, "tensors": case.tensors, "numel": case.numel, "finite_check": finite_check,
            "median_ms": med, "rounds": rounds,
            "overhead_pct": {k: 100 * (iv.ratio - 1) for k, iv in overhead.items()},
            "overhead_pct_interval": {k: [100 * (iv.low - 1), 100 * (iv.high - 1)] for k, iv in overhead.items()},
            "load": busy, "bytes_per_step": bytes_per_step,
            "extra_bytes_pct": {k: 100 * (bytes_per_step[k] / bytes_per_step["off"] - 1) for k in MODES if k != "off"}}


def markdown(rows: list[dict], env: dict) -> str:
    others = [k for k in MODES if k != "off"]
    lines = [f"Telemetry overhead, SAM step (SGD momentum, fp32), {env.get('device', '')}", "",
             "| case | finite_check | off ms | " + " | ".join(f"{k} ms (overhead [95% CI])" for k in others)
             + " | MB/step off | " + " | ".join(f"{k} MB (extra)" for k in others) + " |",
             "|---|---|" + "---:|" * (2 * len(others) + 2)]
    for r in rows:
        b, m, o, x = r["bytes_per_step"], r["median_ms"], r["overhead_pct"], r["extra_bytes_pct"]
        ci = r["overhead_pct_interval"]
        lines.append(f"| {r['case']} ({r['tensors']} tensors, {r['numel']:,}) | {r['finite_check']} | {m['off']:.2f} | "
                     + " | ".join(f"{m[k]:.2f} ({o[k]:+.1f} % [{ci[k][0]:+.1f}, {ci[k][1]:+.1f}])" for k in others)
                     + f" | {b['off'] / 1e6:.0f} | "
                     + " | ".join(f"{b[k] / 1e6:.0f} ({x[k]:+.0f} %)" for k in others) + " |")
    lines.append("")
    lines.append("norms: telemetry=\"norms\", the optimizers' default; on: telemetry=True in a loop whose zero_grad sets p.grad to None (g(w) held); copy: the same in a "
                 "loop that zeroes p.grad in place (g(w) copied in first_step). ms: median over the interleaved "
                 "rounds; overhead: median of the per-round ratios to off, 95 % interval over blocks of rounds; "
                 "MB: bytes per step at the ops' floors (exact).")
    for r in rows:
        if r["load"]:
            lines.append(f"{r['case']} finite_check={r['finite_check']}: other processes took "
                         f"{r['load']['others_cores']:.2f} cores on average while it ran")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.bench.telemetry_bench", description=__doc__.split("\n")[0],
                                 epilog="Writes nothing unless --out is given (then also the .md beside the .json).")
    ap.add_argument("--sizes", nargs="+", default=["resnet50", "host"], help="cases of sam_kernels.bench.cases")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="kernel backend (default: auto)")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="torch CPU threads (default: torch's choice; 1 gives steadier numbers on a shared machine)")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds, one step of each mode per round")
    ap.add_argument("--finite-check", nargs="+", type=int, default=[0, 1],
                    help="finite_check settings to run (0/1); 1 gives the descent norm for free (one sync)")
    ap.add_argument("--out", default=None, help="write the rows as JSON (and .md beside it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    rows = [measure(C.parse_size(s), device, args.rounds, args.backend, bool(fc))
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
