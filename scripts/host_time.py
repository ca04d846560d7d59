"""How much of a SAM optimizer step is host (Python) work: the step against its own kernel calls.

One step is ``first_step`` + ``second_step`` of ``sam_kernels.SAM`` around ``torch.optim.SGD``
(momentum 0.9, weight decay 5e-4, rho 0.05) at default settings, on one of the benchmark's
parameter lists (``sam_kernels.bench.cases``), gradients handed over as new tensors before each
half (as after ``zero_grad(set_to_none=True)``; the hand-over is not timed). The kernel time is the
same compiled op calls, with the same arguments, recorded during one step and replayed alone. The
difference is the host work around the kernels: the optimizer layer and the op layer in Python.

Several source trees (``--trees``, each a checkout of this project with its extension built) are
timed side by side: one worker process each, rounds interleaved (A, B, A, B, ...), so a change of
the machine's load hits them alike. Times are the thread's CPU time (``time.thread_time``; torch
runs one thread), so time spent descheduled on a loaded machine is not counted. Each round times
``--steps`` steps and their kernels; the table shows the medians over rounds, in milliseconds, and
the median of the rounds' step / kernel ratios.

    python scripts/host_time.py --cases small resnet50 --trees /path/before /path/after
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(case: str, steps: int) -> None:
    """Reads a line per round on stdin, answers {"step_ms", "kernel_ms"} (medians of ``steps``)."""
    import torch
    torch.set_num_threads(1)
    import sam_kernels
    from sam_kernels.bench.cases import CASES
    from sam_kernels.ops import dispatch

    gen = torch.Generator().manual_seed(0)
    shapes = CASES[case]()
    params = [torch.randn(s, generator=gen) for s in shapes]
    firsts = [torch.randn(s, generator=gen).mul_(1e-2) for s in shapes]
    seconds = [torch.randn(s, generator=gen).mul_(1e-2) for s in shapes]
    opt = sam_kernels.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4, backend="cpp")

    def step() -> float:
        for p, g in zip(params, firsts):
            p.grad = g
        t0 = time.thread_time()
        opt.first_step()
        t1 = time.thread_time()
        for p, g in zip(params, seconds):
            p.grad = g
        t2 = time.thread_time()
        opt.second_step()
        return t1 - t0 + time.thread_time() - t2

    for _ in range(3):
        step()
    backend = dispatch._load("cpp")  # record the kernel calls of one step
    calls, original = [], dict(backend.OPS)
    for name, fn in original.items():
        backend.OPS[name] = (lambda fn: lambda *a, **k: (calls.append((fn, a, k)), fn(*a, **k))[1])(fn)
    step()
    backend.OPS.update(original)

    def kernels() -> float:
        t0 = time.thread_time()
        for fn, a, k in calls:
            fn(*a, **k)
        return time.thread_time() - t0

    print(json.dumps({"file": sam_kernels.__file__, "ops": [fn.__name__ for fn, _, _ in calls]}), flush=True)
    for _ in sys.stdin:
        s = statistics.median(step() for _ in range(steps))
        k = statistics.median(kernels() for _ in range(steps))
        print(json.dumps({"step_ms": 1e3 * s, "kernel_ms": 1e3 * k}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["small", "resnet50"])
    ap.add_argument("--trees", nargs="+", default=[os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]))
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"{'case':<10} {'tree':<40} {'step ms':>9} {'kernels ms':>11} {'step/kernels':>13}")
    for case in args.cases:
        procs = []
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=tree)
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", case, str(args.steps)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree))
        for p, tree in zip(procs, args.trees):
            head = json.loads(p.stdout.readline())
            assert head["file"].startswith(os.path.abspath(tree)), (head["file"], tree)
        rows = [[] for _ in procs]
        for _ in range(args.rounds):
            for p, row in zip(procs, rows):
                p.stdin.write("\n")
                p.stdin.flush()
                row.append(json.loads(p.stdout.readline()))
        for p in procs:
            p.stdin.close()
            p.wait()
        for tree, row in zip(args.trees, rows):
            s = statistics.median(r["step_ms"] for r in row)
            k = statistics.median(r["kernel_ms"] for r in row)
            ratio = statistics.median(r["step_ms"] / r["kernel_ms"] for r in row)
            print(f"{case:<10} {tree:<40} {s:9.2f} {k:11.2f} {ratio:13.2f}")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
