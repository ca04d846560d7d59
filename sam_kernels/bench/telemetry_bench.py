"""Telemetry overhead: one SAM optimizer step with telemetry off, "norms", on and on-with-a-copy, side by side.

The step is first_step + second_step, SGD momentum, fused backend, on the same parameter list with
``telemetry=False``, ``"norms"`` and ``True``; ``True`` twice: as in a loop whose ``zero_grad``
sets p.grad to None (``on``: g(w) is held, the default) and as in one that zeroes p.grad in place
(``copy``: g(w) is copied in first_step).

    python -m sam_kernels.bench.telemetry_bench [--sizes resnet50 host] [--device cpu] [--threads 1]
                                                [--rounds 5] [--repeats 10] [--finite-check 0 1]
                                                [--out bench_out/telemetry.json]

Each optimizer gets its own copy of the list (same values); the timings alternate the modes for
``--rounds`` rounds of ``--repeats`` steps each, so slow drifts of a shared machine hit all of
them; the figure is the median of the round medians. Each step hands the optimizer the same two
gradient sets, as the two backwards of a real loop do (new p.grad tensors for the second pass):
every step does the same work and nothing is allocated. Also reported: the bytes per step at the
ops' floors (``stats()["optimizer_bytes"]``): the extra traffic each mode adds, exact whatever
the machine does. A case is marked NOISY (``sam_kernels.bench.noise``) when its round medians
disagree (spread over 20 %) or other processes used the CPU while it ran: then only its bytes
columns are to be trusted. On a small shared machine use ``--threads 1``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Optional

import torch

from . import cases as C
from . import noise
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
    cpu = noise.CpuMonitor()
    start = cpu.snap()
    for _ in range(rounds):
        for name, (_, fn) in built.items():
            samples[name].append(timer.time(fn).median_ms)
    busy = cpu.others(start)
    cores = environment(device).get("cpu_cores") or 1
    reasons = {name: noise.timing_noise(statistics.median(v), _quantile(v, 0.2), _quantile(v, 0.8), busy, cores)
               for name, v in samples.items()}
    bytes_per_step = {}
    for name, (opt, _) in built.items():
        st = opt.stats()
        bytes_per_step[name] = st["optimizer_bytes"] / st["steps"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"case": case.name, "tensors": case.tensors, "numel": case.numel, "finite_check": finite_check,
            "median_ms": med, "overhead_pct": {k: 100 * (med[k] / med["off"] - 1) for k in MODES if k != "off"},
            "round_medians_ms": samples, "noise": {k: v for k, v in reasons.items() if v},
            "bytes_per_step": bytes_per_step,
            "extra_bytes_pct": {k: 100 * (bytes_per_step[k] / bytes_per_step["off"] - 1) for k in MODES if k != "off"}}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
                 "loop that zeroes p.grad in place (g(w) copied in first_step). ms: median of the round medians; "
                 "MB: bytes per step at the ops' floors (exact).")
    noisy = [r for r in rows if r["noise"]]
    for r in noisy:
        why = "; ".join(f"{k}: {', '.join(v)}" for k, v in r["noise"].items())
        lines.append(f"NOISY {r['case']} finite_check={r['finite_check']}: {why}")
    lines.append("Verdict: " + ("every case clean: the time overheads can be compared." if not noisy else
                                f"{len(noisy)} of {len(rows)} cases NOISY: trust their MB columns, not their times "
                                "(close other work, use --threads 1, repeat)."))
    for r in rows:
        rounds = "; ".join(f"{k} {[round(x, 2) for x in v]}" for k, v in r["round_medians_ms"].items())
        lines.append(f"Round medians, {r['case']} finite_check={r['finite_check']} (ms, modes alternating): {rounds}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.bench.telemetry_bench", description=__doc__.split("\n")[0],
                                 epilog="Writes nothing unless --out is given (then also the .md beside the .json).")
    ap.add_argument("--sizes", nargs="+", default=["resnet50", "host"], help="cases of sam_kernels.bench.cases")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="kernel backend (default: auto)")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="torch CPU threads (default: torch's choice; 1 gives steadier numbers on a shared machine)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--finite-check", nargs="+", type=int, default=[0, 1],
                    help="finite_check settings to run (0/1); 1 gives the descent norm for free (one sync)")
    ap.add_argument("--out", default=None, help="write the rows as JSON (and .md beside it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
