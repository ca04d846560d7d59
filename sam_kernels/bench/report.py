"""Results as a markdown report (also what the console shows), JSON, and a GB/s-vs-size plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .op_specs import SPECS

IMPL_ORDER = ("loop", "eager", "compile", "cpp", "cuda", "triton")


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _x(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _size(n: int) -> str:
    """Decimal units, as parameter counts are quoted (ResNet-50: 25.6M; the "1M" case: 1.05M)."""
    return f"{n / 1e6:.3g}M" if n >= 10**6 else f"{n / 1e3:.3g}k" if n >= 1000 else str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _skipped(skips: list[dict], what: tuple[str, ...], who: str) -> list[str]:
    """Skips grouped by reason, so a missing backend is one line, not one per op and size."""
    by_reason: dict[str, tuple[set, set]] = {}
    for s in skips:
        names, where = by_reason.setdefault(s["reason"], (set(), set()))
        names.add(s[who])
        where.add(" / ".join(str(s[k]) for k in what))
    lines = []
    for reason, (names, where) in by_reason.items():
        shown = ", ".join(sorted(where)[:6]) + (", …" if len(where) > 6 else "")
        lines.append(f"- {', '.join(sorted(names))} ({shown}): {reason}")
    return lines


def _fused(row: dict) -> str:
    """Share of elements on a compiled backend; bold below 100 % for a compiled implementation."""
    share = row.get("fused_share")
    if share is None:
        return "–"
    text = f"{share:.1%}" if 0 < share < 1 else f"{share:.0%}"
    return f"**{text}**" if share < 1 and row["impl"] not in ("eager", "loop", "compile") else text


def markdown(result: dict) -> str:
    meta, lines = result["meta"], []
    lines += [f"# sam_kernels benchmark — {meta['device']}", "",
              f"torch {meta['torch']} · triton {meta['triton']} · CUDA {meta['cuda']} · python {meta['python']} · "
              f"commit {(meta['git_commit'] or 'unknown')[:12]}{' (dirty)' if meta['git_dirty'] else ''} · "
              f"{meta['date']} · dtype {meta['dtype']} · mode {meta['mode']} · warmup {meta['warmup']}, "
              f"repeats {meta['repeats']}"
              + (f" (>= 3 where that would exceed {meta['budget_s']:g} s)" if meta.get("budget_s") else "")
              + f" · training steps {meta['train_repeats']} · "
              f"{meta['torch_threads']} CPU threads", ""]
    copy = result.get("copy_bandwidth")
    if copy:
        peak = meta.get("spec_peak_gbps")
        lines += [f"Copy bandwidth (same run, `dst.copy_(src)` on {_size(copy['numel'])} fp32, read + write): "
                  f"**{copy['gbps']:.1f} GB/s**"
                  + (f" ({copy['gbps'] / peak:.0%} of the {peak:.0f} GB/s spec peak)." if peak else "."), ""]
    if result.get("ops"):
        lines += ["## Per-op microbenchmarks", "",
                  "Times in ms (median, p20–p80). GB/s = the op's bytes floor / median time "
                  "(floors in `sam_kernels/bench/op_specs.py`); %copy = that over the copy bandwidth above; "
                  "speedups = baseline median / this median. `loop` = per-parameter Python loop (davda54/sam "
                  "style), `eager` = foreach reference, `compile` = torch.compile of the reference.", ""]
        rows = sorted(result["ops"], key=lambda r: (list(SPECS).index(r["op"]), r["numel"],
                                                     IMPL_ORDER.index(r["impl"])))
        lines += _table(
            ["op", "case", "impl", "ms", "p20–p80", "GB/s", "%copy", "vs loop", "vs eager", "vs compile", "fused",
             "check"],
            [[r["op"], f"{r['case']} ({_size(r['numel'])}, {r['tensors']}t)", r["impl"], _ms(r["median_ms"]),
              f"{_ms(r['p20_ms'])}–{_ms(r['p80_ms'])}", f"{r['gbps']:.1f}",
              f"{r['frac_copy_bw']:.0%}" if r["bandwidth_bound"] else "(sort)",
              _x(r["speedup"].get("loop")), _x(r["speedup"].get("eager")), _x(r["speedup"].get("compile")),
              _fused(r), "ok" if r["correct"] else f"**MISMATCH** {r['mismatch_at']}"] for r in rows])
        lines.append("")
    if result.get("ops_skipped"):
        lines += ["Skipped:", ""] + _skipped(result["ops_skipped"], ("op", "case"), "impl") + [""]
    if result.get("targets"):
        lines += ["## Targets", ""]
        lines += _table(["target", "value", "met", "note"],
                        [[t["name"], "–" if t["value"] is None else f"{t['value']:.2f}",
                          {True: "yes", False: "**NO**", None: "–"}[t["met"]], t["note"]] for t in result["targets"]])
        lines.append("")
    train = result.get("train")
    if train and (train["rows"] or train["skips"]):
        lines += ["## End-to-end training step", "",
                  "Mean ms per step over the repeats (p20–p80); fwd+bwd and optimizer phases split by marks "
                  "inside the step; x SGD = step time / SGD's.", ""]
        lines += _table(["model", "method", "step ms", "p20–p80", "fwd+bwd ms", "optimizer ms", "x SGD",
                         "backends", "note"],
                        [[r["model"], r["method"], _ms(r["step"]["mean_ms"]),
                          f"{_ms(r['step']['p20_ms'])}–{_ms(r['step']['p80_ms'])}", _ms(r["fwd_bwd_mean_ms"]),
                          _ms(r["optimizer_mean_ms"]), _x(r["ratio_to_sgd"]), ",".join(r["backends_ran"]) or "–",
                          r["note"]] for r in train["rows"]])
        lines.append("")
        if train["skips"]:
            lines += ["Skipped:", ""] + _skipped(train["skips"], ("model",), "method") + [""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Optional[str]:
    """GB/s vs size, one panel per bandwidth-bound op, one line per impl. Returns why not, if not drawn."""
    rows = [r for r in result.get("ops", []) if r["bandwidth_bound"]]
    if not rows:
        return "no bandwidth-bound op rows"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op_names = [op for op in SPECS if any(r["op"] == op for r in rows)]
    cols = min(3, len(op_names))
    nrows = math.ceil(len(op_names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    copy = result.get("copy_bandwidth", {}).get("gbps")
    for ax, op in zip(axes.flat, op_names):
        for impl in IMPL_ORDER:
            pts = sorted((r["numel"], r["gbps"], r["case"]) for r in rows if r["op"] == op and r["impl"] == impl)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        if copy:
            ax.axhline(copy, color="gray", linestyle="--", linewidth=1, label="copy_")
        for numel, case in sorted({(r["numel"], r["case"]) for r in rows if r["op"] == op and r["tensors"] > 1}):
            ax.axvline(numel, color="gray", linestyle=":", linewidth=0.8)  # model lists: name them
            ax.annotate(case, (numel, 0), xytext=(3, 3), textcoords="offset points", fontsize=7, rotation=90)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_title(op)
        ax.set_xlabel("elements (single tensors and model lists)")
        ax.set_ylabel("GB/s at the bytes floor")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(op_names):]:
        ax.axis("off")
    fig.suptitle(f"GB/s vs size per backend — {result['meta']['device']} ({result['meta']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """Writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (if there is something to plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result) + "\n")
    why_not = plot(result, paths["png"])
    if why_not:
        del paths["png"]
    return paths
