"""Real-data fidelity benchmark: SGD, SAM and every SAM variant of sam_kernels on noisy digits.

Data: scikit-learn's ``load_digits`` (1,797 8×8 images, 10 classes; shipped with the package, no
download), pixels scaled to [0, 1], a stratified 70/30 train/test split, and SYMMETRIC label noise
on the training labels only (a noisy label is drawn uniformly among the 9 other classes); the test
labels are clean. Model: an MLP 64-W-W-10 with ReLU and a LayerNorm after each hidden Linear (the
normalization layers SAM-ON perturbs; every method trains the same model). Base optimizer: SGD
with momentum, a cosine learning rate, batch 64. The defaults of :data:`SETTING` are the shared
setting of the fidelity table: heavy label noise, no weight decay and long training, where SGD
memorizes the noisy labels and SAM's gain over it is several times the seed-to-seed spread
(``docs/fidelity.md`` says which settings were tried and why this one). Every method runs over
the same seeds; a seed fixes the split, the noise, the initialisation and the batch order.

Per run, one result row (JSON lines, ``--out``/rows.jsonl): method, seed, test accuracy (%),
forward and backward passes per optimizer step (full-batch passes counted by hooks on the model,
in examples / batch size, so ESAM's partial second pass and the Fisher batch-1 passes count for
what they are), training wall time (s), the method's own settings, the shared setting, commit,
machine and versions (Python, torch, sam_kernels). The markdown table (``table.md``) and the
figures (``accuracy_vs_passes.png``: accuracy against passes per step, seed mean ± std; one per
family with its methods highlighted) are generated from the rows by :func:`report`
(``--report-only`` regenerates them from an existing rows file; ``--only A B --merge`` runs again the
methods A and B alone and replaces only their rows).

SAM-family optimizers run with ``telemetry=True`` and get the first-pass loss
(``step(closure, loss=...)``); the row records the optimizer's own pass counts and its SAM-step
fraction from ``opt.stats()`` (read once, at the end). ``--telemetry-figure PNG`` also records
``opt.stats()`` every ``--record-every`` steps through ``sam_kernels.optim.telemetry.every`` (one
host sync each time) for ``--telemetry-methods`` and draws sharpness (EMA) and the running SAM-step
fraction over training (seed mean).

    python benchmarks/train_digits.py [--seeds 0 1 2 3 4] [--only SGD SAM] [--out benchmarks/results/fidelity]
        [--noise 0.4] [--epochs 60] [--width 128] [--weight-decay 0] [--rho 0.3] [--train-size 1257]

A method that cannot be built in this checkout is skipped with the reason printed and recorded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Setting:
    """The shared setting of every method (the fidelity table's, unless overridden on the command line)."""
    noise: float = 0.4  # share of training labels replaced by one of the 9 other classes
    train_size: int = 1257  # training images kept of the 70 % split (1,257 = all)
    width: int = 128  # hidden width W of the MLP 64-W-W-10
    layer_norm: bool = True  # a LayerNorm after each hidden Linear
    epochs: int = 60
    batch: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    rho: float = 0.3  # SAM's radius, tuned once for SAM; the variants' radii are derived from it
    bsam_lr: float = 0.5  # bSAM is Adam-like (its own update, not SGD's): the official CIFAR runs' lr


SETTING = Setting()


# --------------------------------------------------------------------------- data and model

def make_data(seed: int, s: Setting):
    """Stratified split of digits with symmetric label noise on the training labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    if s.train_size < len(xtr):
        xtr, _, ytr, _ = train_test_split(xtr, ytr, train_size=s.train_size, stratify=ytr, random_state=seed)
    rng = np.random.default_rng(seed)
    flip = rng.random(len(ytr)) < s.noise
    shift = rng.integers(1, 10, size=len(ytr))  # uniform over the 9 other classes
    noisy = np.where(flip, (ytr + shift) % 10, ytr)
    t = torch.from_numpy
    return t(xtr), t(noisy), t(xte), t(yte)


def make_model(seed: int, s: Setting) -> nn.Module:
    torch.manual_seed(seed)
    norm = (lambda: nn.LayerNorm(s.width)) if s.layer_norm else nn.Identity
    return nn.Sequential(nn.Linear(64, s.width), norm(), nn.ReLU(), nn.Linear(s.width, s.width), norm(), nn.ReLU(),
                         nn.Linear(s.width, 10))


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
    family: str  # the docs page (docs/guides/<family>.md) whose figure highlights it
    build: Callable  # (model, ctx) -> optimizer
    protocol: str = "sam"  # "sgd": plain step; "sam": first backward here, then step(closure, loss=...);
    # "esam": per-sample losses; "both": step(closure) runs both passes (bSAM's first pass is at a noisy sample)
    note: str = ""


def methods(sk, s: Setting, steps_total: int, steps_per_epoch: int) -> list[Method]:
    """Every method to compare; built lazily so a missing variant only skips itself. Radii: SAM's
    ``s.rho`` for every variant that perturbs by a gradient-norm ball, the paper's multiple of it
    where the variant's radius has another scale (ASAM's is relative to |w|; SAM-ON perturbs a small
    part of the weights, its paper uses about 10x SAM's rho; Momentum-SAM's direction is the
    momentum, its paper uses about 1.5-3x SAM's rho)."""
    sgd = torch.optim.SGD
    rho = s.rho
    base = dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    sam_kw = dict(base, telemetry=True)

    def get(name):
        if not hasattr(sk, name):
            raise ImportError(f"sam_kernels does not export {name}")
        return getattr(sk, name)

    def preset(name, **kw):
        return lambda model, ctx: get(name)(model.parameters(), sgd, **kw, **sam_kw)

    r = f"rho {rho:g}"
    return [
        Method("SGD", "variants", lambda model, ctx: sgd(model.parameters(), **base), protocol="sgd"),
        Method("SAM", "variants", preset("SAM", rho=rho), note=r),
        Method("ASAM", "variants", preset("SAM", rho=10 * rho, adaptive=True),
               note=f"rho {10 * rho:g} (10x, relative radius), eta 0.01"),
        Method("SAM-2step", "ascent-directions", preset("SAM", rho=rho, ascent_steps=2),
               note=f"{r}, 2 ascent steps of rho/2"),
        Method("LatePhaseSAM", "bayes-norm-late", lambda model, ctx: get("SAM")(
            model.parameters(), sgd, rho=rho, policy=get("LatePhasePolicy")(steps_total, 0.3), **sam_kw),
            note=f"{r}, SAM in the last 30 % of the steps"),
        Method("SSSAM", "variants", lambda model, ctx: get("SSSAM")(model.parameters(), sgd, rho=rho,
                                                                    schedule="constant", p=0.6, seed=ctx["seed"],
                                                                    **sam_kw),
               note=f"{r}, constant p 0.6"),
        Method("LookSAM", "variants", preset("LookSAM", rho=rho, k=5, alpha=0.7), note=f"{r}, k 5, alpha 0.7"),
        Method("AESAM", "variants", preset("AESAM", rho=rho, total_steps=steps_total), note=f"{r}, d 0.9, l1 -1, l2 1"),
        Method("AELookSAM", "variants", preset("AELookSAM", rho=rho, total_steps=steps_total, alpha=0.7),
               note=f"{r}, AE decisions + LookSAM reuse"),
        Method("ESAM", "esam", lambda model, ctx: get("ESAM")(model.parameters(), sgd, rho=rho, beta=0.6, gamma=0.5,
                                                              seed=ctx["seed"], **sam_kw),
               protocol="esam", note=f"{r}, beta 0.6 per tensor, gamma 0.5"),
        # ESAM's two halves, each alone: which one the full method's result comes from
        Method("ESAM-SWP", "esam", lambda model, ctx: get("ESAM")(model.parameters(), sgd, rho=rho, beta=0.6,
                                                                  gamma=1.0, seed=ctx["seed"], **sam_kw),
               protocol="esam", note=f"{r}, beta 0.6 per tensor, gamma 1 (weight selection alone)"),
        Method("ESAM-SDS", "esam", lambda model, ctx: get("ESAM")(model.parameters(), sgd, rho=rho, beta=1.0,
                                                                  gamma=0.5, seed=ctx["seed"], **sam_kw),
               protocol="esam", note=f"{r}, beta 1, gamma 0.5 (data selection alone)"),
        Method("SparseSAM-F", "sparse-sam", lambda model, ctx: get("SparseSAM")(
            model.parameters(), sgd, rho=rho, sparsity=0.5, mask="fisher", num_samples=32, update_freq=1,
            update_unit="epoch", steps_per_epoch=steps_per_epoch, model=model, loss_fn=F.cross_entropy,
            fisher_data=ctx["fisher_batches"], fisher_method="loop", **sam_kw),
            note=f"{r}, Fisher, 50 % sparse, 32 batch-1 samples each epoch"),
        Method("SparseSAM-D", "sparse-sam", lambda model, ctx: get("SparseSAM")(
            model.parameters(), sgd, rho=rho, sparsity=0.5, mask="dynamic", update_freq=1, update_unit="epoch",
            steps_per_epoch=steps_per_epoch, horizon=s.epochs, seed=ctx["seed"], **sam_kw),
            note=f"{r}, dynamic, 50 % sparse, drop 0.5 cosine, each epoch"),
        Method("StableSAM", "variants", preset("StableSAM", rho=rho), note=f"{r}, renormalized descent"),
        Method("GSAM", "gsam-wsam-gcsam", preset("GSAM", rho=rho, alpha=0.4), note=f"{r}, alpha 0.4, constant rho"),
        Method("WSAM", "gsam-wsam-gcsam", preset("WSAM", rho=rho, gamma=0.9), note=f"{r}, gamma 0.9, decoupled"),
        Method("GCSAM", "gsam-wsam-gcsam", preset("SAM", rho=rho, use_gc=True), note=f"{r}, SAM(use_gc=True)"),
        Method("FriendlySAM", "ascent-directions", preset("FriendlySAM", rho=rho, sigma=1.0, lmbda=0.6),
               note=f"{r}, sigma 1, lmbda 0.6"),
        Method("VaSSO", "ascent-directions", preset("VaSSO", rho=rho, theta=0.4), note=f"{r}, theta 0.4"),
        Method("MomentumSAM", "ascent-directions", preset("MomentumSAM", rho=1.5 * rho),
               note=f"rho {1.5 * rho:g} (1.5x), one pass per step"),
        Method("SAM-ON", "bayes-norm-late", lambda model, ctx: get("SAM")(get("sam_on_param_groups")(model), sgd,
                                                                          rho=10 * rho, **sam_kw),
               note=f"rho {10 * rho:g} (10x), LayerNorm weights and biases only"),
        Method("BSAM", "bayes-norm-late", lambda model, ctx: get("BSAM")(model.parameters(), lr=s.bsam_lr,
                                                                         num_data=ctx["num_data"], rho=0.01,
                                                                         seed=ctx["seed"]),
               protocol="both", note=f"lr {s.bsam_lr:g}, rho 0.01, prior precision 25 (official defaults, untuned)"),
    ]


# --------------------------------------------------------------------------- training

def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


TRACE = ("steps", "sam_step_fraction")
TRACE_EMA = ("sharpness",)


def run(method: Method, seed: int, s: Setting, record_every: int = 0) -> tuple[dict, dict]:
    """One training run; returns its result row (without the run-wide fields) and, with
    ``record_every`` > 0, the telemetry trace: ``opt.stats()`` every ``record_every`` steps (one host
    sync each time; column -> values)."""
    xtr, ytr, xte, yte = make_data(seed, s)
    model = make_model(seed, s)
    g = torch.Generator().manual_seed(1000 + seed)
    g_fisher = torch.Generator().manual_seed(2000 + seed)
    steps_per_epoch = math.ceil(len(xtr) / s.batch)

    def fisher_batches():
        idx = torch.randperm(len(xtr), generator=g_fisher)
        return [(xtr[idx[i:i + s.batch]], ytr[idx[i:i + s.batch]]) for i in range(0, len(xtr), s.batch)]

    opt = method.build(model, {"seed": seed, "fisher_batches": fisher_batches, "num_data": len(xtr)})
    counter = PassCounter(model)
    trace: dict[str, list] = {}

    def record(st: dict) -> None:
        ema = opt.stats(ema=True)  # a second sync: the EMAs of the same values
        for key, value in (*((k, st[k]) for k in TRACE), *((f"{k}_ema", ema[k]) for k in TRACE_EMA)):
            trace.setdefault(key, []).append(round(value, 6))

    if record_every and hasattr(opt, "stats"):
        from sam_kernels.optim.telemetry import every
        every(opt, record_every, record)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs * steps_per_epoch)
    steps = examples = 0
    t0 = time.perf_counter()
    for _ in range(s.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), s.batch):
            xb, yb = xtr[perm[i:i + s.batch]], ytr[perm[i:i + s.batch]]
            opt.zero_grad(set_to_none=True)
            if method.protocol == "sgd":
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            elif method.protocol == "esam":
                def closure(indices: Optional[torch.Tensor] = None):
                    xs, ys = (xb, yb) if indices is None else (xb[indices], yb[indices])
                    return F.cross_entropy(model(xs), ys, reduction="none")
                opt.step(closure)
            else:
                def closure():
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss
                if method.protocol == "both":
                    opt.step(closure)
                else:  # the core's protocol: first backward here, step(closure) does the rest
                    first = F.cross_entropy(model(xb), yb)
                    first.backward()
                    opt.step(closure, loss=first)  # L(w): the optimizer then knows the sharpness
            sched.step()
            steps += 1
            examples += len(xb)
    wall = time.perf_counter() - t0
    if hasattr(opt, "move_back_from_momentum_ascent"):
        opt.move_back_from_momentum_ascent()  # Momentum-SAM holds w - rho·v/‖v‖: evaluate at w
    row = {"method": method.name, "family": method.family, "seed": seed,
           "fwd_per_step": counter.fwd / examples, "bwd_per_step": counter.bwd / examples,  # before evaluating
           "acc": 100 * evaluate(model, xte, yte), "wall_s": wall, "steps": steps, "method_settings": method.note}
    if hasattr(opt, "stats"):
        st = opt.stats()
        row.update(own_fwd_per_step=st["forward_passes"] / st["steps"],
                   own_bwd_per_step=st["backward_passes"] / st["steps"], sam_step_fraction=st["sam_step_fraction"])
    return row, trace


# --------------------------------------------------------------------------- the run's context

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch thread), {platform.system()}"


def versions() -> dict:
    import sam_kernels
    return {"python": platform.python_version(), "torch": torch.__version__, "sam_kernels": sam_kernels.__version__}


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------- report (from the rows only)

def summarize(rows: list[dict]) -> dict[str, dict]:
    """method -> seed-mean accuracy, std, paired gain over SGD, passes, wall; methods in row order."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    sgd = {r["seed"]: r["acc"] for r in by.get("SGD", [])}
    out = {}
    for name, rs in by.items():
        accs = [r["acc"] for r in rs]
        gains = [r["acc"] - sgd[r["seed"]] for r in rs if r["seed"] in sgd]
        out[name] = {"family": rs[0]["family"], "note": rs[0]["method_settings"], "seeds": len(rs),
                     "acc": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "gain": statistics.mean(gains) if gains else None,
                     "gain_std": statistics.stdev(gains) if len(gains) > 1 else None,
                     "fwd": statistics.mean(r["fwd_per_step"] for r in rs),
                     "bwd": statistics.mean(r["bwd_per_step"] for r in rs),
                     "wall": statistics.mean(r["wall_s"] for r in rs),
                     "sam_steps": (statistics.mean(r["sam_step_fraction"] for r in rs)
                                   if "sam_step_fraction" in rs[0] else None)}
    return out


def table(rows: list[dict], source: str = "rows.jsonl") -> str:
    """The fidelity table (Markdown) of the rows: one line per method, with the paired gain over SGD
    (per seed, then mean ± std), and for every method the share of SAM's gain it keeps at what share
    of SAM's forward + backward passes per step."""
    summ = summarize(rows)
    sam = summ.get("SAM")
    head = rows[0]
    s = head["setting"]
    norm = "a LayerNorm after each hidden layer" if s["layer_norm"] else "no normalization"
    runs = ", ".join(f"commit `{c}`, {d}" for c, d in dict.fromkeys((r["commit"], r["date"]) for r in rows))
    machines = "; ".join(dict.fromkeys(r["machine"] for r in rows))
    lines = [
        f"Generated from `{source}` ({len(rows)} runs; {runs}); machine: {machines}.", "",
        f"Setting: digits, {s['noise']:.0%} symmetric label noise on the training labels, {s['train_size']} training "
        f"images, MLP 64-{s['width']}-{s['width']}-10 with {norm}, SGD lr {s['lr']:g} momentum {s['momentum']:g} "
        f"weight decay {s['weight_decay']:g}, cosine lr, batch {s['batch']}, "
        f"{s['epochs']} epochs; SAM's rho {s['rho']:g}; seeds {sorted({r['seed'] for r in rows})}.", "",
        "- gain: accuracy minus SGD's on the same seed (same split, noise, initialisation and batches), mean ± std "
        "over seeds; a gain below its std is seed noise.",
        "- passes: full-batch forward / backward passes per optimizer step (counted in examples through the "
        "model); SAM share: (forward + backward) passes as a share of SAM's.",
        "- SAM's gain kept: the method's gain as a share of SAM's gain.", "",
        "| method | test acc % | gain over SGD (points) | fwd / bwd per step | SAM's gain kept | share of SAM's passes "
        "| SAM steps | wall s / run | settings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sam_passes = sam["fwd"] + sam["bwd"] if sam else None
    for name, m in summ.items():
        gain = "–" if m["gain"] is None or name == "SGD" else f"{m['gain']:+.2f}" + (
            "" if m["gain_std"] is None else f" ± {m['gain_std']:.2f}")  # no spread from one seed
        kept = (f"{m['gain'] / sam['gain']:.0%}" if sam and sam["gain"] and m["gain"] is not None
                and name not in ("SGD", "SAM") else "–")
        share = f"{(m['fwd'] + m['bwd']) / sam_passes:.0%}" if sam_passes else "–"
        sam_steps = "–" if m["sam_steps"] is None else f"{m['sam_steps']:.2f}"
        lines.append(f"| {name} | {m['acc']:.2f} ± {m['std']:.2f} | {gain} | {m['fwd']:.2f} / {m['bwd']:.2f} | {kept} "
                     f"| {share} | {sam_steps} | {m['wall']:.2f} | {m['note']} |")
    ran = {r["method"] for r in rows}
    skipped = [k for k in dict.fromkeys(tuple(k) for r in rows for k in r.get("skipped", [])) if k[0] not in ran]
    if skipped:
        lines += ["", "Not run:"] + [f"- {k}: {v}" for k, v in skipped]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path, highlight: Optional[str] = None) -> None:
    """Test accuracy (seed mean ± std) against forward + backward passes per step, one point per
    method (methods at the same pass count spread a little sideways, in accuracy order, so their
    error bars stay apart); ``highlight``: a family whose methods (with SGD and SAM) are drawn in
    colour and named in the legend, the others in grey."""
    import itertools

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(rows)
    same_x: dict[float, list[str]] = {}
    for name, m in summ.items():
        same_x.setdefault(round(m["fwd"] + m["bwd"], 1), []).append(name)
    shift = {}
    for names in same_x.values():
        names.sort(key=lambda n: summ[n]["acc"])
        for i, name in enumerate(names):
            shift[name] = 0.06 * (i - (len(names) - 1) / 2)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colours = itertools.cycle(c for c in plt.get_cmap("tab20").colors if c[0] != c[1])  # no greys
    markers = itertools.cycle("osD^vP*Xh<>")
    for name, m in summ.items():
        on = highlight is None or m["family"] == highlight or name in ("SGD", "SAM")
        colour = {"SGD": "black", "SAM": "firebrick"}.get(name) or (next(colours) if on else "0.8")
        style = dict(fmt=next(markers), capsize=2, markersize=5, color=colour,
                     zorder=3 if on else 2, label=name if on else None)
        ax.errorbar(m["fwd"] + m["bwd"] + shift[name], m["acc"], yerr=m["std"], **style)
    for name, ls in (("SGD", ":"), ("SAM", "--")):
        if name in summ:
            ax.axhline(summ[name]["acc"], linestyle=ls, color="0.4", linewidth=0.8)
    s = rows[0]["setting"]
    ax.set(xlabel="forward + backward passes per optimizer step (full batch)", ylabel="test accuracy % (clean labels)",
           title=f"Digits, {s['noise']:.0%} label noise, MLP {s['width']} wide: seed mean ± std "
                 f"({len({r['seed'] for r in rows})} seeds); dotted: SGD, dashed: SAM")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def telemetry_figure(traces: dict[str, list[dict]], path: Path, record_every: int) -> None:
    """Seed-mean sharpness EMA (L(w + e) - L(w) at the SAM steps) and running SAM-step fraction
    against the optimizer step, one line per method of ``traces`` (method -> one trace per seed)."""
    import itertools

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = itertools.cycle(["-", "--", "-.", ":"])
    for name, runs in traces.items():
        runs = [t for t in runs if t]
        if not runs:
            continue
        n = min(len(t["steps"]) for t in runs)
        style = dict(label=name, linestyle=next(styles))
        steps = runs[0]["steps"][:n]
        ax1.plot(steps, [statistics.mean(t["sharpness_ema"][i] for t in runs) for i in range(n)], **style)
        ax2.plot(steps, [statistics.mean(t["sam_step_fraction"][i] for t in runs) for i in range(n)], **style)
    ax1.set(xlabel="optimizer step", ylabel="L(w + e) − L(w)  (EMA over SAM steps, decay 0.9)",
            title="sharpness at the SAM steps")
    ax2.set(xlabel="optimizer step", ylabel="SAM steps / steps", title="running SAM-step fraction", ylim=(0, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Noisy digits, MLP, seed mean; opt.stats() every {record_every} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def report(rows_file: Path) -> None:
    """table.md, accuracy_vs_passes.png and one figure per family (accuracy_vs_passes_<family>.png)
    beside the rows file, from the rows alone."""
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    out = rows_file.parent
    (out / "table.md").write_text(table(rows, str(rows_file)))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no matplotlib: figures skipped (pip install matplotlib)")
        return
    figure(rows, out / "accuracy_vs_passes.png")
    for family in sorted({r["family"] for r in rows}):
        figure(rows, out / f"accuracy_vs_passes_{family}.png", highlight=family)
    print(f"wrote {out / 'table.md'} and the figures in {out}")


def merge_rows(rows_file: Path, fresh: list[dict], order: list[str]) -> list[dict]:
    """The rows of ``rows_file`` with those of the methods in ``fresh`` replaced by ``fresh``, methods in
    ``order`` (unknown names last). Raises ``ValueError`` if the recorded rows have another shared
    setting or other seeds than ``fresh``: a table mixes runs of one setting only."""
    old = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()] if rows_file.exists() else []
    if old and fresh:
        if old[0]["setting"] != fresh[0]["setting"]:
            raise ValueError(f"--merge: {rows_file} was recorded in another setting ({old[0]['setting']}); "
                             f"this run's is {fresh[0]['setting']}")
        seeds_old, seeds_new = sorted({r["seed"] for r in old}), sorted({r["seed"] for r in fresh})
        if seeds_old != seeds_new:
            raise ValueError(f"--merge: {rows_file} has seeds {seeds_old}, this run {seeds_new}")
    rerun = {r["method"] for r in fresh}
    rows = [r for r in old if r["method"] not in rerun] + fresh
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows, key=lambda r: rank.get(r["method"], len(order)))  # stable: seed order kept


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--only", nargs="*", default=None, help="run only these method names")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity"))
    ap.add_argument("--report-only", action="store_true", help="regenerate the table and figures from OUT/rows.jsonl")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the rows of the methods run in OUT/rows.jsonl and keep the others (same setting "
                         "and seeds required); without it the rows file is rewritten with this run's rows alone")
    ap.add_argument("--telemetry-figure", type=Path, default=None,
                    help="also draw sharpness and the SAM-step fraction over training (PNG) for --telemetry-methods")
    ap.add_argument("--telemetry-methods", nargs="+", default=["SAM", "SSSAM", "AESAM", "ESAM"])
    ap.add_argument("--record-every", type=int, default=10, help="optimizer steps between two opt.stats() records")
    for field, value in asdict(SETTING).items():
        if isinstance(value, bool):
            ap.add_argument(f"--{field.replace('_', '-')}", type=lambda v: v.lower() in ("1", "true", "yes"),
                            default=value, metavar="BOOL")
        else:
            ap.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = ap.parse_args(argv)
    rows_file = args.out / "rows.jsonl"
    if args.report_only:
        report(rows_file)
        return
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared 2-core box
    import sam_kernels as sk

    s = replace(SETTING, **{f: getattr(args, f) for f in asdict(SETTING)})
    xtr = make_data(args.seeds[0], s)[0]
    spe = math.ceil(len(xtr) / s.batch)
    common = {"setting": asdict(s), "commit": commit(), "machine": machine(), "versions": versions(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows, skipped, traces = [], [], {}
    t_all = time.perf_counter()
    for method in methods(sk, s, spe * s.epochs, spe):
        if args.only and method.name not in args.only:
            continue
        try:
            method.build(make_model(0, s), {"seed": 0, "fisher_batches": lambda: [], "num_data": len(xtr)})
        except Exception as exc:  # a variant not available in this checkout: say why, go on
            skipped.append((method.name, f"{type(exc).__name__}: {exc}"))
            print(f"skip {method.name}: {skipped[-1][1]}", flush=True)
            continue
        every = args.record_every if args.telemetry_figure and method.name in args.telemetry_methods else 0
        done = [run(method, seed, s, every) for seed in args.seeds]
        runs = [dict(row, **common) for row, _ in done]
        if every:
            traces[method.name] = [trace for _, trace in done]
        rows += runs
        accs = [r["acc"] for r in runs]
        print(f"{method.name:13s} acc {statistics.mean(accs):6.2f} ± {statistics.pstdev(accs):.2f}  "
              f"fwd {runs[0]['fwd_per_step']:.2f} bwd {runs[0]['bwd_per_step']:.2f}  "
              f"{statistics.mean(r['wall_s'] for r in runs):.2f} s/run", flush=True)
    for r in rows:
        r["skipped"] = skipped
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = merge_rows(rows_file, rows, [m.name for m in methods(sk, s, spe * s.epochs, spe)])
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} runs in {time.perf_counter() - t_all:.0f} s; wrote {rows_file}")
    report(rows_file)
    if args.telemetry_figure:
        telemetry_figure(traces, args.telemetry_figure, args.record_every)


if __name__ == "__main__":
    main()
