"""Per-epoch traces of one fidelity run (``train_digits.py``'s setting, data, model and batches).

For one method and seed, every epoch: test accuracy; training loss and accuracy on the images whose
label was flipped (against the noisy label: memorization) and on the others; the weight norm; the
mean first-pass gradient norm; the norm of the output layer's
weight; per hidden layer, the share of ReLU units dead on every training image. Per method, also:

- ESAM: the share of flipped-label images in the subset its data selection keeps for the descent
  (the batch's own share of flipped labels beside it), and the norm of the kept images' mean
  gradient at w + e over the whole batch's (epoch mean).
- AE-SAM / AE-LookSAM: the share of SAM steps, the longest run of non-SAM steps, and (AE-LookSAM)
  the mean age in steps of the stored LookSAM component g_v reused at the non-SAM steps.

    python benchmarks/diagnose_digits.py --method ESAM --seed 1 [--out trace.json]
    python benchmarks/diagnose_digits.py --figure traces.png trace.json [trace.json ...]

The option ``--set key=value`` overrides a keyword of the method's constructor (e.g. ``gamma=1``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits as td  # noqa: E402


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def dead_units(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Per hidden layer, the share of ReLU units that output 0 for every image of ``x``."""
    shares, h = [], x
    with torch.no_grad():
        for m in model:
            h = m(h)
            if isinstance(m, torch.nn.ReLU):
                shares.append(round(float(((h > 0).sum(0) == 0).float().mean()), 3))
    return shares


def trace(method: str, seed: int, s: td.Setting, overrides: dict) -> list[dict]:
    import sam_kernels as sk

    xtr, ytr, xte, yte = td.make_data(seed, s)
    clean = td.make_data(seed, replace(s, noise=0.0))[1]  # same split and order: the labels before the flips
    flipped = ytr != clean
    model = td.make_model(seed, s)
    g = torch.Generator().manual_seed(1000 + seed)
    spe = math.ceil(len(xtr) / s.batch)
    total = spe * s.epochs
    rho, base = s.rho, dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, telemetry=True)
    sgd = torch.optim.SGD
    if method == "SAM":
        opt = sk.SAM(model.parameters(), sgd, rho=rho, **base)
    elif method == "ESAM":
        kw = {"beta": 0.6, "gamma": 0.5, "seed": seed, **overrides}
        opt = sk.ESAM(model.parameters(), sgd, rho=rho, **kw, **base)
    elif method in ("AESAM", "AELookSAM", "LookSAM"):
        kw = dict(overrides)
        if method != "LookSAM":
            kw["total_steps"] = total
        opt = getattr(sk, method)(model.parameters(), sgd, rho=rho, **kw, **base)
    else:
        raise SystemExit(f"unknown method {method}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)

    decisions: list[bool] = []
    if opt.policy.needs_grad_norm:  # AE-SAM, AE-LookSAM: record each decision
        decide = opt.policy.decide

        def recording(step, grad_sq_norm=None):
            d = decide(step, grad_sq_norm)
            decisions.append(bool(d))
            return d
        opt.policy.decide = recording

    rows = []
    sel = {"picked": 0, "picked_flipped": 0, "batch": 0, "batch_flipped": 0, "ratio": 0.0, "steps": 0}
    for epoch in range(s.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        gnorms = []
        n_dec = len(decisions)
        for i in range(0, len(xtr), s.batch):
            idx = perm[i:i + s.batch]
            xb, yb, fb = xtr[idx], ytr[idx], flipped[idx]
            opt.zero_grad(set_to_none=True)
            if method == "ESAM":
                def closure(indices: Optional[torch.Tensor] = None):
                    if indices is None:
                        return F.cross_entropy(model(xb), yb, reduction="none")
                    if len(indices) < len(xb):
                        sel["picked"] += len(indices)
                        sel["picked_flipped"] += int(fb[indices].sum())
                        sel["batch"] += len(xb)
                        sel["batch_flipped"] += int(fb.sum())
                        # at w + e: the kept images' mean gradient against the whole batch's (autograd.grad
                        # leaves .grad alone, so the step is the same as without this measurement)
                        params = [p for p in model.parameters() if p.requires_grad]
                        kept = torch.autograd.grad(F.cross_entropy(model(xb[indices]), yb[indices]), params)
                        whole = torch.autograd.grad(F.cross_entropy(model(xb), yb), params)
                        sel["ratio"] += _norm(kept) / _norm(whole)
                        sel["steps"] += 1
                    return F.cross_entropy(model(xb[indices]), yb[indices], reduction="none")
                opt.step(closure)
                gnorms.append(float("nan"))
            else:
                def closure():
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss
                first = F.cross_entropy(model(xb), yb)
                first.backward()
                gnorms.append(_norm(p.grad for p in model.parameters() if p.grad is not None))
                opt.step(closure, loss=first)
            sched.step()
        model.eval()
        with torch.no_grad():
            out = model(xtr)
            loss = F.cross_entropy(out, ytr, reduction="none")
            hit = (out.argmax(1) == ytr).float()
            test = 100 * float((model(xte).argmax(1) == yte).float().mean())
            preds = torch.bincount(model(xte).argmax(1), minlength=10)
        model.train()
        row = {"epoch": epoch + 1, "test_acc": round(test, 2),
               "loss_flipped": round(float(loss[flipped].mean()), 4),
               "loss_kept": round(float(loss[~flipped].mean()), 4),
               "fit_flipped": round(100 * float(hit[flipped].mean()), 1),
               "fit_kept": round(100 * float(hit[~flipped].mean()), 1),
               "weight_norm": round(_norm(model.parameters()), 3),
               "out_weight_norm": round(_norm([model[-1].weight]), 3),
               "dead_units": dead_units(model, xtr),
               "top_class_share": round(float(preds.max()) / len(yte), 3)}
        if not math.isnan(gnorms[0]):
            row["grad_norm"] = round(sum(gnorms) / len(gnorms), 4)
        if sel["batch"]:
            row["selected_flipped_share"] = round(sel["picked_flipped"] / max(sel["picked"], 1), 3)
            row["batch_flipped_share"] = round(sel["batch_flipped"] / sel["batch"], 3)
            row["kept_to_batch_grad_norm"] = round(sel["ratio"] / sel["steps"], 3)
            sel = dict.fromkeys(sel, 0)
        if len(decisions) > n_dec:
            ep = decisions[n_dec:]
            row["sam_share"] = round(sum(ep) / len(ep), 3)
        rows.append(row)
    if decisions:
        longest = run = 0
        ages, age = [], None
        for d in decisions:
            run = 0 if d else run + 1
            longest = max(longest, run)
            age = 0 if d else (None if age is None else age + 1)
            if not d and age is not None:
                ages.append(age)
        rows.append({"summary": True, "sam_share": round(sum(decisions) / len(decisions), 3),
                     "longest_plain_run": longest,
                     "mean_reuse_age": round(sum(ages) / len(ages), 2) if ages else None,
                     "max_reuse_age": max(ages) if ages else None})
    return rows


def label(trace_file: dict) -> str:
    extra = ", ".join(f"{k} {v:g}" for k, v in trace_file["overrides"].items())
    return f"{trace_file['method']}{f' ({extra})' if extra else ''}, seed {trace_file['seed']}"


def figure(files: list[Path], path: Path) -> None:
    """Per epoch, one line per trace file: test accuracy, the share of dead units in the second hidden
    layer, the output layer's weight norm, and the method's own statistic (ESAM: the share of
    flipped labels among the images its data selection keeps, dashed: in the whole batch; AE-SAM,
    AE-LookSAM: the share of SAM steps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [json.loads(f.read_text()) for f in files]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for t in traces:
        rows = [r for r in t["rows"] if "epoch" in r]
        ep = [r["epoch"] for r in rows]
        line, = axes[0].plot(ep, [r["test_acc"] for r in rows], label=label(t))
        c = line.get_color()
        axes[1].plot(ep, [r["dead_units"][1] for r in rows], color=c)
        axes[2].plot(ep, [r["out_weight_norm"] for r in rows], color=c)
        if "selected_flipped_share" in rows[0]:
            axes[3].plot(ep, [r["selected_flipped_share"] for r in rows], color=c)
            axes[3].plot(ep, [r["batch_flipped_share"] for r in rows], color=c, linestyle="--", linewidth=0.8)
        elif "sam_share" in rows[0]:
            axes[3].plot(ep, [r["sam_share"] for r in rows], color=c)
    titles = ("test accuracy %", "dead units, hidden layer 2 (share)", "output layer weight norm",
              "ESAM: flipped labels among the kept images\n(dashed: in the batch); AE: SAM-step share")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method")
    ap.add_argument("--figure", type=Path, nargs="+", metavar=("PNG", "TRACE"),
                    help="draw PNG from the trace files that follow it (written by --out) instead of running")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="constructor overrides key=value (floats)")
    ap.add_argument("--epochs", type=int, default=td.SETTING.epochs)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.figure:
        figure(args.figure[1:], args.figure[0])
        return
    if not args.method:
        ap.error("--method is required unless --figure is given")
    torch.set_num_threads(1)
    overrides = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    rows = trace(args.method, args.seed, replace(td.SETTING, epochs=args.epochs), overrides)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        args.out.write_text(json.dumps({"method": args.method, "seed": args.seed, "overrides": overrides,
                                        "commit": td.commit(), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
