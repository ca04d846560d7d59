"""``python -m sam_kernels.bench`` / ``sam-kernels-bench``: the benchmark runner (see --help)."""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Optional

import torch

from . import cases as C
from . import noise
from .environment import environment
from .models import MODELS, workloads
from .op_specs import QUICK, SPECS
from .ops_bench import IMPLS, OpsConfig, backend_skip_reason, measure_copy_bandwidth, run_ops, set_copy_fractions
from .report import markdown, write
from .targets import check_targets
from .timing import Timer
from .train_bench import methods, run_train, train_task_count

try:  # optional (the [bench] extra): without it, no progress bar
    from tqdm import tqdm
except ImportError:
    tqdm = None

EXTERNAL = ("loop", "compile")
"""Comparison points that are not sam_kernels backends: their mismatches do not fail the run."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

EPILOG = """\
what is measured
  per-op microbenchmarks
%(ops)s
    on single tensors (1M, 16M, 64M elements) and the real parameter lists of ResNet-50
    (161 tensors, 25.6M) and GPT-2 small (148 tensors, 124M), and "host": 161 tensors of 16
    elements, where the time is the host's (Python, dispatch, launches); each implementation is checked
    against the eager reference once, then timed (median, p20/p80); GB/s at the op's bytes
    floor, fraction of the copy bandwidth measured in the same run, speedup over the baselines
    loop (per-parameter Python loop, davda54/sam style), eager (foreach reference) and
    compile (torch.compile of the reference); sam_step / sam_optimizer_step = a whole SAM
    optimizer step (first_step + second_step, SGD momentum), the headline figure;
    sam_adamw_step = the same around AdamW (davda54 loop with torch's AdamW as baseline).
  end-to-end training steps: SGD, SAM (davda54 loop, eager, fused) and each SAM variant that
    exists, on a small ResNet and a small transformer (random data): step time, fwd+bwd vs
    optimizer phase, ratio to SGD; on GPU also the fused step captured in a CUDA graph.

defaults (quick): CPU sizes %(quick_cpu)s, GPU sizes %(quick_gpu)s; about 2 minutes on a
  quiet 2-core CPU VM (5.5-6 on a loaded one).
outputs: OUT/<device-slug>[-<dtype>].{json,md,png}; the markdown is also printed, with what each
  column means and a verdict at the end: whether the run can be trusted.
noise: the run measures its own noise (copy bandwidth before and after, the spread of each
  result's repeats, CPU time used by other processes while it was timed; load average shown) and
  marks every result taken under noise NOISY; no target is judged from a noisy result.
  On a shared machine: close other work, try --threads 1, repeat the run.
exit status: 1 when a sam_kernels backend's result does not match the reference (baseline
  mismatches, e.g. the loop's torch.norm drift on CPU, are reported but do not fail the run).

examples
  python -m sam_kernels.bench                                  # quick run, bench_out/
  python -m sam_kernels.bench --full --out benchmarks/results  # the recorded results
  python -m sam_kernels.bench --ops perturb_ sam_step --sizes 16M gpt2 --backends eager cuda
  python -m sam_kernels.bench --steps-only
"""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m sam_kernels.bench",
        description="Benchmark sam_kernels' fused SAM ops and optimizer steps against per-parameter loops, "
                    "foreach eager and torch.compile, on CPU or GPU.",
        epilog=EPILOG % {"ops": textwrap.fill(f"default: {', '.join(QUICK)}; --full or --ops all: also "
                                              f"{', '.join(op for op in SPECS if op not in QUICK)}", 92,
                                              initial_indent="    ", subsequent_indent="    "),
                         "quick_cpu": ", ".join(C.QUICK_CPU), "quick_gpu": ", ".join(C.QUICK_GPU)},
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="whole grid: every op, every size, more repeats, more torch.compile baselines")
    ap.add_argument("--ops", nargs="+", metavar="OP", choices=list(SPECS) + ["all"],
                    help="ops to benchmark ('all' for every op)")
    ap.add_argument("--sizes", nargs="+", metavar="SIZE",
                    help=f"cases: {', '.join(C.CASES)}, or an element count for one tensor (4096, 64k, 2M)")
    ap.add_argument("--backends", nargs="+", metavar="IMPL", choices=IMPLS,
                    help=f"implementations to run, among {', '.join(IMPLS)} (default: all that are available)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter/gradient dtype")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")
    ap.add_argument("--repeats", type=int, help="timed repeats per measurement (quick: CPU 5, GPU 20; full: 10/50)")
    ap.add_argument("--warmup", type=int, help="untimed calls before timing (CPU 1; GPU 3, full 5)")
    ap.add_argument("--budget", type=float, metavar="S",
                    help="seconds per measurement: fewer repeats (>= 3) when the warmup says they would take "
                         "longer (default: CPU 10, GPU unlimited)")
    compile_group = ap.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="torch.compile baseline for every selected op (default: GPU sam_step only, "
                                    "every op with --full; CPU off, sam_step only with --full)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false",
                               help="no torch.compile baseline")
    ap.add_argument("--no-flush-l2", action="store_true",
                    help="GPU: do not overwrite a 256 MB buffer before each repeat (warm-L2 numbers)")
    ap.add_argument("--copy-size", type=int, metavar="N",
                    help="elements of the fp32 copy_ that measures the device bandwidth (default GPU 64M, CPU 16M)")
    section = ap.add_mutually_exclusive_group()
    section.add_argument("--no-step", action="store_true", help="skip the end-to-end training-step benchmark")
    section.add_argument("--steps-only", action="store_true", help="only the end-to-end training-step benchmark")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                    help="models of the training-step benchmark (default: both)")
    ap.add_argument("--methods", nargs="+", metavar="M", choices=[m.key for m in methods()],
                    help=f"methods of the training-step benchmark, among {', '.join(m.key for m in methods())} "
                         f"(default: all; a variant that does not exist yet is skipped)")
    ap.add_argument("--train-batch", type=int, metavar="B",
                    help="batch size of both models (default: CPU 32 images / 8 sequences, GPU 128 / 32)")
    ap.add_argument("--train-repeats", type=int, help="training steps timed per method (default CPU 10, GPU 30)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out/)")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="torch CPU threads (default: torch's choice; 1 gives steadier numbers on a shared machine)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (none without tqdm either)")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    """Turns the flags into a concrete plan (every default depends on device and --full)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    gpu = device.type == "cuda"
    sizes = args.sizes or (C.FULL if args.full else C.QUICK_GPU if gpu else C.QUICK_CPU)
    if args.ops:  # explicit choices win over --full, like --sizes
        op_names = list(SPECS) if "all" in args.ops else [op for op in SPECS if op in args.ops]
    else:
        op_names = list(SPECS) if args.full else list(QUICK)
    impls = [i for i in IMPLS if i in (args.backends or IMPLS)]
    if args.compile is False:
        compile_ops, compile_reason = set(), "--no-compile"
    elif args.compile or (args.full and gpu):
        compile_ops, compile_reason = set(op_names), ""
    elif gpu or args.full:
        compile_ops = {"sam_step"}
        compile_reason = ("only sam_step is compiled in this mode (--compile: every op; on CPU each compile "
                          "takes ~30 s for ResNet-50's 161 tensors)")
    else:
        compile_ops = set()
        compile_reason = "off in quick mode on CPU: ~30 s per compile here (--compile, or --full for sam_step)"
    return {
        "device": device,
        "cases": [C.parse_size(s) for s in sizes],
        "ops": op_names,
        "impls": impls,
        "compile_ops": compile_ops,
        "compile_reason": compile_reason,
        "repeats": args.repeats or ((50 if gpu else 10) if args.full else (20 if gpu else 5)),
        "warmup": args.warmup if args.warmup is not None else ((5 if args.full else 3) if gpu else 1),
        "train_repeats": args.train_repeats or (30 if gpu else 10),  # multiples of LookSAM's k = 5
        "budget_s": args.budget if args.budget is not None else (None if gpu else 10.0),
        "copy_size": args.copy_size or ((64 << 20) if gpu else (16 << 20)),
    }


class _NoProgress:
    """Stands in for a tqdm bar when there is none."""

    def __init__(self, **_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = resolve(args)
    device, dtype = plan["device"], DTYPES[args.dtype]
    cpu = noise.CpuMonitor()
    run_start, loadavg_start = cpu.snap(), noise.load_average()
    env = environment(device)
    log = tqdm.write if tqdm is not None else lambda s: print(s, flush=True)
    if tqdm is None and not args.no_progress:
        log("no progress bar: tqdm is not installed (pip install tqdm)")
    log(f"sam_kernels bench on {env['device']} · torch {env['torch']} · commit {(env['git_commit'] or '?')[:12]}")
    for name, b in env["backends"].items():
        why = backend_skip_reason(name, device) if name != "eager" else None
        log(f"  backend {name:7s} {'ready' if why is None else 'skipped: ' + why}")

    do_ops, do_train = not args.steps_only, not args.no_step
    wls = workloads(device, large=device.type == "cuda", which=tuple(args.models),
                    batch=args.train_batch) if do_train else []
    todo = [m for m in methods() if args.methods is None or m.key in args.methods]
    total = 2 + (len(plan["cases"]) * len(plan["ops"]) * len(plan["impls"]) if do_ops else 0) \
        + (train_task_count(device, len(wls), todo) if do_train else 0)
    timer = Timer(device, warmup=plan["warmup"], repeats=plan["repeats"], flush_l2=not args.no_flush_l2,
                  budget_s=plan["budget_s"], cpu=cpu)
    result: dict = {"meta": {**env, "dtype": args.dtype, "mode": "full" if args.full else "quick",
                             "warmup": plan["warmup"], "repeats": plan["repeats"], "budget_s": plan["budget_s"],
                             "train_repeats": plan["train_repeats"], "flush_l2": timer.flushes_l2,
                             "argv": sys.argv[1:] if argv is None else list(argv)}}
    bar = tqdm if tqdm is not None and not args.no_progress else _NoProgress
    with bar(total=total, desc="bench", dynamic_ncols=True) as progress:
        # The copy bandwidth is measured before and after everything: a change means the machine
        # changed under the run (noise.py).
        progress.set_postfix_str("copy bandwidth")
        copy_before = measure_copy_bandwidth(device, timer, plan["copy_size"])
        progress.update(1)
        if do_ops:
            cfg = OpsConfig(device, dtype, plan["cases"], plan["ops"], plan["impls"], plan["compile_ops"],
                            plan["compile_reason"], timer, args.seed)
            ops_result = run_ops(cfg, copy_before["gbps"], env["spec_peak_gbps"], log, progress)
            result.update({"ops": ops_result.rows, "ops_skipped": ops_result.skips})
        if do_train:
            result["train"] = run_train(device, wls, todo, plan["warmup"], plan["train_repeats"], log, progress,
                                        cpu)
        progress.set_postfix_str("copy bandwidth")
        copy_after = measure_copy_bandwidth(device, timer, plan["copy_size"])
        progress.update(1)

    best = max(copy_before, copy_after, key=lambda c: c["gbps"])
    result["copy_bandwidth"] = {"numel": best["numel"], "bytes": best["bytes"], "gbps": best["gbps"],
                                "before": copy_before, "after": copy_after}
    copy_reasons = noise.copy_noise(copy_before, copy_after)
    if do_ops:
        set_copy_fractions(result["ops"], best["gbps"], env["spec_peak_gbps"])
        noise.mark_ops(result["ops"], env["cpu_cores"], copy_reasons)
        unavailable = {b: backend_skip_reason(b, device) for b in ("cpp", "cuda", "triton")}
        result["targets"] = check_targets(result["ops"], device.type,
                                          [b for b in plan["impls"] if unavailable.get(b) is None],
                                          {b: r for b, r in unavailable.items() if r}, best["gbps"])
    if do_train:
        noise.mark_train(result["train"]["rows"], env["cpu_cores"], copy_reasons)
    result["cpu_usage"] = noise.usage(run_start, cpu.snap()) if run_start is not None else None
    result["meta"].update({"loadavg_start": loadavg_start, "loadavg_end": noise.load_average()})
    result["verdict"] = noise.verdict(result)

    stem = env["device_slug"] + ("" if args.dtype == "float32" else f"-{args.dtype}")
    paths, no_plot = write(result, args.out, stem)
    print(markdown(result))
    if no_plot:
        print(f"no PNG plot: {no_plot}")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    mismatches = [r for r in result.get("ops", []) if not r["correct"]]
    if mismatches:
        print(f"!! {len(mismatches)} result(s) did NOT match the eager reference: "
              + ", ".join(f"{r['op']}/{r['case']}/{r['impl']}" for r in mismatches), file=sys.stderr)
    # Only our own implementations fail the run; a baseline's numerics are its own (e.g. the
    # per-parameter loop's torch.norm on CPU drifts by ~1e-3 relative at 16M elements).
    ours = [r for r in mismatches if r["impl"] not in EXTERNAL]
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
