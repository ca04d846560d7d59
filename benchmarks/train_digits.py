"""Real-data benchmark: SGD, SAM and every SAM variant of sam_kernels on noisy digits.

Data: scikit-learn's ``load_digits`` (1,797 8×8 images, 10 classes; shipped with the package, no
download), pixels scaled to [0, 1], a stratified 70/30 train/test split, and 20 % SYMMETRIC label
noise on the training labels only (a noisy label is drawn uniformly among the 9 other classes).
Model: MLP 64-128-64-10 (ReLU). Base optimizer: SGD(lr 0.05, momentum 0.9, weight decay 5e-4),
batch 64, 30 epochs, cosine learning rate. Every method runs over the same seeds; each seed fixes
the split, the noise, the initialisation and the batch order (identical across methods).

Reported per method: test accuracy mean ± std over seeds (clean test labels), gradient
evaluations per optimizer step as full-batch FORWARD and BACKWARD passes (counted by hooks on the
model in examples / batch size, so ESAM's partial second pass and the Fisher batch-1 passes count
for what they are), and training wall time (s, mean over seeds). What pass counts do not see:
ESAM's per-tensor SWP skips weight-gradient compute of unselected tensors inside a backward.

Telemetry: every SAM-family optimizer runs with ``telemetry=True`` and gets the first-pass
loss (``step(closure, loss=...)``), so it knows L(w + e) − L(w); ``sam_kernels.optim.telemetry.every``
records ``opt.stats()`` every ``--record-every`` steps (one host sync each time). The table adds the
optimizer's own pass counts (``forward_passes / steps``) beside the hook counts, and ``--figure``
draws sharpness (EMA) and the running SAM-step fraction over training (seed-mean) for the methods
in ``--figure-methods`` (matplotlib needed for the figure only).

    python benchmarks/train_digits.py [--seeds 0 1 2 3 4] [--epochs 30] [--only SAM ESAM] [--out benchmarks/results/digits]
        [--figure benchmarks/results/digits_telemetry.png] [--figure-methods SAM SSSAM AESAM ESAM]

A variant that does not import (or is not exported yet) is skipped with the reason printed. BSAM is
its own optimizer (no SGD base, no telemetry of the sharpness values) and its ``step(closure)`` runs
both passes; SAM-ON needs normalization layers, which this MLP does not have (skipped, reason printed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BATCH = 64
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
NOISE = 0.2
BSAM_LR = 0.5  # bSAM is Adam-like (its own update, not SGD's): the official CIFAR runs' lr


# --------------------------------------------------------------------------- data and model

def make_data(seed: int, noise: float = NOISE):
    """Stratified split of digits with symmetric label noise on the training labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    flip = rng.random(len(ytr)) < noise
    shift = rng.integers(1, 10, size=len(ytr))  # uniform over the 9 other classes
    noisy = np.where(flip, (ytr + shift) % 10, ytr)
    t = torch.from_numpy
    return t(xtr), t(noisy), t(xte), t(yte), float(flip.mean())


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


class PassCounter:
    """Counts examples through the model's forward and backward (via a hook on the output)."""

    def __init__(self, model: nn.Module):
        self.fwd = 0
        self.bwd = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        n = output.shape[0]
        self.fwd += n
        if output.requires_grad:
            output.register_hook(lambda g: self._count_bwd(n))

    def _count_bwd(self, n: int) -> None:
        self.bwd += n


# --------------------------------------------------------------------------- methods

@dataclass
class Method:
    name: str
    build: Callable  # (model, params, ctx) -> optimizer
    protocol: str = "sam"  # "sgd": plain step; "sam": step(closure) with a mean-loss closure; "esam": per-sample;
    # "both": step(closure) runs both passes (bSAM's first pass is at a noisy sample)
    note: str = ""


def base_kwargs():
    return dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


TRACE = ("steps", "sam_step_fraction", "sharpness", "grad_cosine", "grad_norm", "sam_grad_norm", "perturbation_norm")
TRACE_EMA = ("sharpness", "grad_cosine", "grad_norm")


def sam_kwargs():
    """The SAM-family optimizers: base optimizer settings plus telemetry on."""
    return dict(base_kwargs(), telemetry=True)


def methods(sk, steps_total: int, steps_per_epoch: int, epochs: int) -> list[Method]:
    """Every method to compare; built lazily so a missing variant only skips itself."""
    sgd = torch.optim.SGD

    def get(name):
        if not hasattr(sk, name):
            raise ImportError(f"sam_kernels does not export {name}")
        return getattr(sk, name)

    def preset(name, **kw):
        return lambda model, ctx: get(name)(model.parameters(), sgd, **kw, **sam_kwargs())

    return [
        Method("SGD", lambda model, ctx: sgd(model.parameters(), **base_kwargs()), protocol="sgd"),
        Method("SAM", preset("SAM", rho=0.05), note="rho 0.05"),
        Method("ASAM", preset("SAM", rho=0.5, adaptive=True), note="rho 0.5, eta 0.01"),
        Method("SSSAM", lambda model, ctx: get("SSSAM")(model.parameters(), sgd, rho=0.05, schedule="constant",
                                                        p=0.6, seed=ctx["seed"], **sam_kwargs()),
               note="constant p 0.6"),
        Method("SparseSAM-F", lambda model, ctx: get("SparseSAM")(
            model.parameters(), sgd, rho=0.05, sparsity=0.5, mask="fisher", num_samples=32, update_freq=1,
            update_unit="epoch", steps_per_epoch=steps_per_epoch, model=model, loss_fn=F.cross_entropy,
            fisher_data=ctx["fisher_batches"], fisher_method="loop", **sam_kwargs()),
            note="Fisher, 50 % sparse, 32 batch-1 samples each epoch"),
        Method("SparseSAM-D", lambda model, ctx: get("SparseSAM")(
            model.parameters(), sgd, rho=0.05, sparsity=0.5, mask="dynamic", update_freq=1, update_unit="epoch",
            steps_per_epoch=steps_per_epoch, horizon=epochs, seed=ctx["seed"], **sam_kwargs()),
            note="dynamic, 50 % sparse, drop 0.5 cosine, each epoch"),
        Method("ESAM", lambda model, ctx: get("ESAM")(model.parameters(), sgd, rho=0.05, beta=0.6, gamma=0.5,
                                                      seed=ctx["seed"], **sam_kwargs()),
               protocol="esam", note="beta 0.6 per tensor, gamma 0.5"),
        Method("StableSAM", preset("StableSAM", rho=0.05), note="renormalized descent"),
        Method("LookSAM", preset("LookSAM", rho=0.05, k=5, alpha=0.7), note="k 5, alpha 0.7"),
        Method("AESAM", preset("AESAM", rho=0.05, total_steps=steps_total), note="d 0.9, l1 -1, l2 1"),
        Method("AELookSAM", preset("AELookSAM", rho=0.05, total_steps=steps_total, alpha=0.7),
               note="AE decisions + LookSAM reuse"),
        Method("GSAM", preset("GSAM", rho=0.05, alpha=0.4), note="alpha 0.4, constant rho 0.05"),
        Method("WSAM", preset("WSAM", rho=0.05, gamma=0.9), note="gamma 0.9, decoupled"),
        Method("GCSAM", preset("SAM", rho=0.05, use_gc=True), note="SAM(use_gc=True)"),
        Method("LatePhaseSAM", lambda model, ctx: get("SAM")(model.parameters(), sgd, rho=0.05,
                                                             policy=get("LatePhasePolicy")(steps_total, 0.3),
                                                             **sam_kwargs()),
               note="SAM in the last 30 % of the steps"),
        Method("SAM-ON", lambda model, ctx: get("SAM")(get("sam_on_param_groups")(model), sgd, rho=0.05,
                                                       **sam_kwargs()),
               note="normalization layers only (this MLP has none: skipped with the reason)"),
        Method("BSAM", lambda model, ctx: get("BSAM")(model.parameters(), lr=BSAM_LR, num_data=ctx["num_data"],
                                                      rho=0.01, seed=ctx["seed"]),
               protocol="both", note=f"lr {BSAM_LR}, rho 0.01, prior precision 25 (official defaults, untuned)"),
    ]


# --------------------------------------------------------------------------- training

def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def run(method: Method, seed: int, epochs: int, record_every: int = 10) -> dict:
    xtr, ytr, xte, yte, noise = make_data(seed)
    model = make_model(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    steps_per_epoch = math.ceil(len(xtr) / BATCH)

    def fisher_batches():
        idx = torch.randperm(len(xtr), generator=g_fisher)
        return [(xtr[idx[i:i + BATCH]], ytr[idx[i:i + BATCH]]) for i in range(0, len(xtr), BATCH)]

    g_fisher = torch.Generator().manual_seed(2000 + seed)
    ctx = {"seed": seed, "fisher_batches": fisher_batches, "num_data": len(xtr)}
    opt = method.build(model, ctx)
    counter = PassCounter(model)
    trace: dict[str, list] = {}  # column -> values, one per record

    def record(st: dict) -> None:
        ema = opt.stats(ema=True)  # a second sync: the EMAs of the same values
        for key, value in (*((k, st[k]) for k in TRACE), *((f"{k}_ema", ema[k]) for k in TRACE_EMA)):
            trace.setdefault(key, []).append(round(value, 6))

    if hasattr(opt, "stats"):
        from sam_kernels.optim.telemetry import every
        every(opt, record_every, record)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    steps = examples = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), BATCH):
            xb, yb = xtr[perm[i:i + BATCH]], ytr[perm[i:i + BATCH]]
            if method.protocol == "sgd":
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            elif method.protocol == "esam":
                def closure(indices: Optional[torch.Tensor] = None):
                    xs, ys = (xb, yb) if indices is None else (xb[indices], yb[indices])
                    return F.cross_entropy(model(xs), ys, reduction="none")
                opt.zero_grad(set_to_none=True)
                opt.step(closure)
            elif method.protocol == "both":
                def closure():
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss
                opt.zero_grad(set_to_none=True)
                opt.step(closure)
            else:  # the core's protocol: first backward here, step(closure) does the rest
                def closure():
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss
                opt.zero_grad(set_to_none=True)
                first = F.cross_entropy(model(xb), yb)
                first.backward()
                opt.step(closure, loss=first)  # L(w): the optimizer then knows the sharpness
            sched.step()
            steps += 1
            examples += len(xb)
    wall = time.perf_counter() - t0
    fwd, bwd = counter.fwd / examples, counter.bwd / examples  # read before the evaluation forward
    out = {"seed": seed, "test_acc": evaluate(model, xte, yte), "train_noise": noise, "wall_s": wall,
           "fwd_per_step": fwd, "bwd_per_step": bwd, "steps": steps}
    if hasattr(opt, "stats"):
        st = opt.stats()
        out.update(stats=st, trace=trace, own_fwd_per_step=st["forward_passes"] / st["steps"],
                   own_bwd_per_step=st["backward_passes"] / st["steps"])
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--only", nargs="*", default=None, help="run only these method names")
    ap.add_argument("--out", default="benchmarks/results/digits")
    ap.add_argument("--record-every", type=int, default=10, help="optimizer steps between two opt.stats() records")
    ap.add_argument("--figure", default=None, help="draw sharpness and SAM-step fraction over training (PNG)")
    ap.add_argument("--figure-methods", nargs="+", default=["SAM", "SSSAM", "AESAM", "ESAM"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared 2-core box

    import sam_kernels as sk

    xtr = make_data(args.seeds[0])[0]
    spe = math.ceil(len(xtr) / BATCH)
    results, skipped = {}, {}
    for method in methods(sk, spe * args.epochs, spe, args.epochs):
        if args.only and method.name not in args.only:
            continue
        try:
            method.build(make_model(0), {"seed": 0, "fisher_batches": lambda: [], "num_data": len(xtr)})
        except Exception as exc:  # a variant not available in this checkout: say why, go on
            skipped[method.name] = f"{type(exc).__name__}: {exc}"
            print(f"skip {method.name}: {skipped[method.name]}", flush=True)
            continue
        runs = [run(method, s, args.epochs, args.record_every) for s in args.seeds]
        accs = [r["test_acc"] * 100 for r in runs]
        results[method.name] = {
            "note": method.note, "runs": runs,
            "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "fwd_per_step": statistics.mean(r["fwd_per_step"] for r in runs),
            "bwd_per_step": statistics.mean(r["bwd_per_step"] for r in runs),
            "wall_s": statistics.mean(r["wall_s"] for r in runs),
        }
        if "stats" in runs[0]:
            results[method.name].update(
                own_fwd_per_step=statistics.mean(r["own_fwd_per_step"] for r in runs),
                own_bwd_per_step=statistics.mean(r["own_bwd_per_step"] for r in runs),
                sam_step_fraction=statistics.mean(r["stats"]["sam_step_fraction"] for r in runs),
                optimizer_mb_per_step=statistics.mean(r["stats"]["optimizer_bytes"] / r["stats"]["steps"] / 1e6
                                                      for r in runs))
        r = results[method.name]
        print(f"{method.name:14s} acc {r['acc_mean']:.2f} ± {r['acc_std']:.2f}  fwd {r['fwd_per_step']:.2f}  "
              f"bwd {r['bwd_per_step']:.2f}  {r['wall_s']:.2f}s", flush=True)
    write(args, results, skipped)
    if args.figure:
        figure(results, args.figure_methods, args.figure, args.record_every)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(args, results: dict, skipped: dict) -> None:
    import pathlib

    import sam_kernels as sk

    machine = f"{cpu_name()} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch thread, load average "
    machine += f"{os.getloadavg()[0]:.1f} at the end: shared box, wall times are noisy), {platform.system()} "
    machine += f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    backend = sk.ops.last_used.copy()
    try:
        import subprocess
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta = {"machine": machine, "seeds": args.seeds, "epochs": args.epochs, "batch": BATCH, "label_noise": NOISE,
            "base": f"SGD lr {LR} momentum {MOMENTUM} wd {WEIGHT_DECAY}, cosine lr", "model": "MLP 64-128-64-10",
            "backends_used": backend, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results, "skipped": skipped}, indent=1))
    lines = [
        "# Digits with 20 % symmetric label noise", "",
        f"Generated by `python benchmarks/train_digits.py` on {meta['date']} at commit {commit}.", "",
        f"- Machine: {machine} (CPU only).",
        f"- Data: scikit-learn `load_digits`, stratified 70/30 split, {int(NOISE * 100)} % symmetric noise on "
        f"train labels; clean test labels.",
        f"- Model {meta['model']}, batch {BATCH}, {args.epochs} epochs, {meta['base']}; seeds {args.seeds}.",
        "- fwd/bwd: full-batch forward/backward passes per step, counted in examples through the model "
        "(ESAM's partial second pass and Fisher batch-1 passes included).",
        f"- Kernel backend(s) used: {backend or 'none'}.",
        f"- Noise level: the test set has {len(make_data(args.seeds[0])[3])} images (one image = "
        f"{100 / len(make_data(args.seeds[0])[3]):.2f} points); gaps smaller than the std are seed noise.", "",
        "- own fwd/bwd: the optimizer's count, `opt.stats()` forward/backward passes per step (telemetry); "
        "SAM steps: `sam_step_fraction`; MB/step: bytes its kernels moved at the ops' floors.",
        "",
        "| method | test acc % (mean ± std) | fwd / step | bwd / step | own fwd / bwd | SAM steps | MB / step "
        "| wall s / run | settings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        own = (f"{r['own_fwd_per_step']:.2f} / {r['own_bwd_per_step']:.2f} | {r['sam_step_fraction']:.2f} | "
               f"{r['optimizer_mb_per_step']:.2f}") if "own_fwd_per_step" in r else "– | – | –"
        lines.append(f"| {name} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {r['fwd_per_step']:.2f} | "
                     f"{r['bwd_per_step']:.2f} | {own} | {r['wall_s']:.2f} | {r['note']} |")
    if skipped:
        lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in skipped.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def figure(results: dict, names: list[str], path: str, record_every: int) -> None:
    """Seed-mean sharpness EMA and running SAM-step fraction against the optimizer step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: figure skipped (pip install matplotlib)")
        return
    import itertools

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = itertools.cycle(["-", "--", "-.", ":"])
    for name in names:
        runs = results.get(name, {}).get("runs", [])
        traces = [r["trace"] for r in runs if r.get("trace")]
        if not traces:
            continue
        n = min(len(t["steps"]) for t in traces)
        steps = traces[0]["steps"][:n]
        sharp = [statistics.mean(t["sharpness_ema"][i] for t in traces) for i in range(n)]
        frac = [statistics.mean(t["sam_step_fraction"][i] for t in traces) for i in range(n)]
        style = dict(label=name, linestyle=next(styles))
        ax1.plot(steps, sharp, **style)
        ax2.plot(steps, frac, **style)
    ax1.set(xlabel="optimizer step", ylabel="L(w + e) − L(w)  (EMA over SAM steps, decay 0.9)",
            title="sharpness at the SAM steps")
    ax2.set(xlabel="optimizer step", ylabel="SAM steps / steps", title="running SAM-step fraction", ylim=(0, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Noisy digits, MLP, seed mean; opt.stats() every {record_every} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
