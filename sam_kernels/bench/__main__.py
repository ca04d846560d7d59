"""``python -m sam_kernels.bench`` / ``sam-kernels-bench``: how much faster a SAM step is with sam_kernels
than the ways a user would write it otherwise, with a verdict that holds under load (see --help)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import cases as C
from . import noise, results, session, steps
from .environment import environment
from .measure import LEVEL, MIN_ROUNDS
from .op_specs import QUICK, SPECS
from .verdict import BETWEEN_RUNS, VS_COMPILE_LARGE, VS_COMPILE_SMALL, VS_LOOP

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BACKENDS = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
CASES = {  # device -> (default lists, --full lists)
    "cpu": (("resnet50", "gpt2_blocks_2", "small_500"), ("resnet50", "gpt2_blocks", "small")),
    "cuda": (("resnet50", "gpt2_blocks", "small"), ("resnet50", "resnet50_cl", "gpt2_blocks", "small")),
}
SHRUNK = {"gpt2_blocks_2": "GPT-2 small: 2 of its 12 blocks", "small_500": "500 of the 2,000 small tensors"}
OP_CASES = ("host", "resnet50")
BUDGET_S = {False: 160.0, True: 1200.0}
COMPILE_SHARE = 0.6  # of a case's time: what torch.compile's first compile of its list may take

EPILOG = f"""\
what it answers
  One SAM optimizer step (first_step + second_step, SGD momentum 0.9, weight decay 5e-4; forward and
  backward excluded) with sam_kernels at default settings, against: the same with finite_check=False,
  torch.compile of a hand-written foreach step, that step eager, the popular SAM class's per-parameter
  loop, and pytorch-optimizer's SAM (when installed); on a ResNet-50 parameter list (161 tensors, 25.6M),
  GPT-2 small's transformer blocks (144 tensors, 85M) and 2,000 tensors of 64 elements.
  On CPU the default run shrinks the last two ({'; '.join(SHRUNK.values())}) to fit its
  budget; --full runs the whole lists and the per-op benchmarks.

how it measures
  Every implementation is first checked against one SAM step computed in float64, then all are timed
  in one process, one call each per round, interleaved (A, B, C, A, B, C, ...), with a copy of a
  fixed buffer in every round (the bandwidth the memory floor is taken of). A row's ratio is the
  median of its per-round ratios to sam_kernels' time, with a {LEVEL:.0%} interval taken over blocks of
  consecutive rounds (the ratio drifts with the load, so single rounds are not independent: see
  sam_kernels/bench/measure.py). Rounds go on until every target has a verdict or the case's share
  of --budget is spent.

targets and verdicts
  time of torch.compile's step / ours >= {VS_COMPILE_LARGE:.2f} on the large lists (ours at most
  0.9x its time), >= {VS_COMPILE_SMALL:.0f} on the small-tensor list; per-parameter loop / ours >= {VS_LOOP} everywhere.
  met / missed when the interval clears the target by {BETWEEN_RUNS:.0%} (a ratio also moves between
  processes: sam_kernels/bench/verdict.py); unresolved otherwise.

threads
  On CPU the default is one torch thread: with more threads than idle cores, every parallel region
  waits for a descheduled thread, and an implementation with many small parallel regions (Inductor's
  code: one per tensor and pass) slows down far more than one with few; the ratios then follow the
  machine's load instead of the code. One thread per implementation is time-sliced alike.
  --threads 2 measures multi-threaded steps (on a quiet machine).

torch.compile
  Its first compile of a list runs in a child process limited to {COMPILE_SHARE:.0%} of the case's time;
  what it compiled is cached (Inductor's cache), so a run that ran out of time leaves the compile row
  out and says so, and the next run goes on from the cache. Once compiled, a list costs seconds.

output
  the tables and verdicts, a footer with the run's noise facts (copy bandwidth, CPU taken by other
  processes, load average), and OUT/<device>.jsonl (the rows; schema: sam_kernels.bench) and
  OUT/<device>.png (drawn from the rows). Exit status 1 when a sam_kernels step gives a wrong result.

examples
  python -m sam_kernels.bench                                  # about 3 minutes on a 2-core CPU
  python -m sam_kernels.bench --full --out benchmarks/results  # the recorded results
  python -m sam_kernels.bench --cases resnet50 --providers cpp compile --budget 60
  python -m sam_kernels.bench --ops perturb_ grad_sq_norm --cases host 1M
"""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.bench", description=__doc__.splitlines()[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the whole lists, the per-op benchmarks, a 20-minute budget")
    ap.add_argument("--budget", type=float, metavar="S",
                    help="seconds for the whole benchmark, shared among its cases (default 160, --full 1200)")
    ap.add_argument("--cases", nargs="+", metavar="CASE",
                    help=f"parameter lists: {', '.join(C.CASES)}, or one tensor of N elements (4096, 64k, 2M)")
    ap.add_argument("--providers", nargs="+", metavar="P",
                    help="step implementations (default: every one for the device): cpp, cpp-nocheck, cuda, "
                         "cuda-nocheck, triton, triton-nocheck, compile, foreach, loop, pytorch-optimizer")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile (its first compile of a list "
                                                              "takes minutes on a loaded 2-core CPU)")
    ap.add_argument("--ops", nargs="+", metavar="OP", choices=list(SPECS) + ["all"],
                    help="per-op benchmarks instead of the step ('all': every op; --full: the step and "
                         f"{', '.join(QUICK)})")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="torch CPU threads (default on CPU: 1, see 'threads' below; on GPU: torch's choice)")
    ap.add_argument("--min-rounds", type=int, default=MIN_ROUNDS, help=f"rounds before stopping (default {MIN_ROUNDS})")
    ap.add_argument("--max-rounds", type=int, default=200, help="rounds at most per case (default 200)")
    ap.add_argument("--copy-size", type=int, metavar="N", help="elements of the fp32 copy timed in every round "
                                                                "(default: CPU 16M, GPU 64M)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out/)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _providers(args: argparse.Namespace, device: torch.device) -> list[str]:
    if args.providers:
        return list(args.providers)
    ours = [p for b in BACKENDS[device.type] for p in (b, f"{b}-nocheck")]
    return ours + [p for p in steps.EXTERNAL if not (args.no_compile and p == "compile")]


def _ours(providers: list[str], device: torch.device) -> Optional[str]:
    """The reference of every ratio: the first sam_kernels provider at default settings that can run."""
    return next((p for p in providers if p in BACKENDS[device.type] and steps.unavailable(p, device) is None), None)


def _meta(env: dict, full: bool) -> dict:
    return {"device": env["device"], "device_slug": env["device_slug"], "threads": env["torch_threads"],
            "commit": env["git_commit"], "dirty": env["git_dirty"], "timestamp": env["date"],
            "versions": {k: env[k] for k in ("torch", "triton", "cuda", "python", "sam_kernels")},
            "lists": "full" if full else "default"}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    budget = args.budget if args.budget is not None else BUDGET_S[args.full]
    deadline = t_start + budget
    env = environment(device)
    plan = session.Plan(device, DTYPES[args.dtype], args.min_rounds, args.max_rounds, args.seed,
                        args.copy_size or ((64 << 20) if device.type == "cuda" else (16 << 20)))
    case_names = args.cases or CASES[device.type][args.full]
    cases = [C.parse_size(name) for name in case_names]
    providers = _providers(args, device)
    ours = _ours(providers, device)
    load0, cpu0 = noise.load_average(), noise.snap()
    print(f"sam_kernels bench on {env['device']}, torch {env['torch']}, commit {(env['git_commit'] or '?')[:12]}"
          f"{' (uncommitted changes)' if env['git_dirty'] else ''}; budget {budget:.0f} s", flush=True)
    shrunk = [SHRUNK[n] for n in case_names if n in SHRUNK]
    if shrunk:
        print(f"lists shrunk to fit the budget: {'; '.join(shrunk)} (--full: the whole lists)", flush=True)

    jobs: list[tuple[str, str, C.Case]] = []  # (suite, op, case)
    if args.ops is None or args.full:
        jobs += [("step", "sam_sgd_step", c) for c in cases]
    if args.ops or args.full:
        ops = list(SPECS) if args.ops and "all" in args.ops else list(args.ops or QUICK)
        op_cases = cases if args.cases else [C.parse_size(n) for n in OP_CASES]
        jobs += [("op", op, c) for c in op_cases for op in ops]
    impls = ["loop", "eager", *BACKENDS[device.type]]

    rows: list[dict] = []
    meta = _meta(env, args.full)
    path = args.out / f"{env['device_slug']}.jsonl"
    with torch.no_grad():
        for i, (suite, op, case) in enumerate(jobs):
            what = "SAM step" if suite == "step" else f"op {op}"
            print(f"[{time.perf_counter() - t_start:5.0f} s] {what} on {case.name}: checking each implementation"
                  + (" (torch.compile compiles meanwhile)..." if suite == "step" and "compile" in providers else "..."),
                  flush=True)
            share = max(0.0, deadline - time.perf_counter()) / (len(jobs) - i)
            if suite == "step":
                built = session.build_steps(case, providers, plan, compile_limit_s=COMPILE_SHARE * share)
                floor = steps.floor_bytes(case, plan.dtype)
                ref = ours
            else:
                built = session.build_op(case, op, impls, plan)
                elem = torch.empty((), dtype=plan.dtype).element_size()
                floor = SPECS[op].floor_bytes(case.numel, elem) if SPECS[op].bandwidth_bound else None
                ref = _ours([b for b in impls if b != "loop"], device) or "eager"
            for p, why in built.mismatched.items():
                print(f"!! {p} on {case.name}: WRONG RESULT ({why}); not timed", flush=True)
            now = time.perf_counter()
            case_deadline = now + max(0.0, deadline - now) / (len(jobs) - i)
            snap0, la = noise.snap(), noise.load_average()
            new = session.measure(suite, op, case, built, ref, floor, plan, case_deadline, meta)
            load = {**(noise.usage(snap0, noise.snap()) or {}), "loadavg_1min": la[0] if la else None}
            for r in new:
                r["load"] = load
            rows += new
            results.write(rows, path)  # after every case: a run stopped from outside keeps what it measured
            print(results.table(new), flush=True)

    png = path.with_suffix(".png")
    no_plot = results.plot(results.read(path), png)
    lines = ["", f"Verdicts (ratio = its time / {ours}'s time, {LEVEL:.0%} interval):" if ours else
             "Verdicts: none (no sam_kernels provider ran, so no ratios)"]
    lines += results.verdicts(rows) or ["  none: no target row was timed"]
    usage, load1 = noise.usage(cpu0, noise.snap()), noise.load_average()
    copies = [r["copy_gbps"] for r in rows if r.get("copy_gbps")]
    lines += ["", "Noise (facts, not verdicts; the intervals above already carry the load):"]
    if copies:
        lines.append(f"  copy bandwidth {min(copies):.1f}-{max(copies):.1f} GB/s across the cases")
    if usage:
        lines.append(f"  other processes took {usage['others_cores']:.2f} of {env['cpu_cores']} cores on average, "
                     f"VM steal {usage['steal_cores']:.2f}")
    if load0 and load1:
        lines.append(f"  load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end")
    lines.append(f"written: {path}" + (f", {png}" if no_plot is None else f" (no plot: {no_plot})"))
    lines.append(f"took {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines), flush=True)
    ours_wrong = [r for r in rows if r.get("mismatch") and r["provider"] not in steps.EXTERNAL]
    return 1 if ours_wrong else 0


if __name__ == "__main__":
    sys.exit(main())
