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


OPS_LEGEND = """\
What the columns mean:
- **op**: the operation timed; `sam_step` / `sam_optimizer_step` = one whole SAM optimizer step (first_step +
  second_step, SGD with momentum; the second through the `sam_kernels.SAM` object), `sam_adamw_step` = the same
  around AdamW.
- **case**: the parameter list, as (elements, tensors): one tensor of 1M elements, the 161 tensors of ResNet-50,
  the 148 of GPT-2 small, or `host` (161 tensors of 16 elements: the kernels have nothing to do, so the time is
  the host's: Python, dispatch, launches).
- **impl**: who did the work: `loop` = a Python loop over the parameters, written like the popular PyTorch SAM
  class (davda54/sam); `eager` = sam_kernels' reference, one `torch._foreach_*` call per step of the maths;
  `compile` = `torch.compile` of that reference; `cpp` / `cuda` / `triton` = sam_kernels' fused kernels.
- **ms**: median time of one call in milliseconds, over the repeats. **p20–p80**: the middle 60 % of the repeats
  fell in this range. **spread**: (p80 − p20) / median; how much the repeats disagree.
- **GB/s**: the least memory traffic the op needs (its bytes floor: each input read once, each output written
  once; 40 bytes per fp32 parameter for a whole SAM step; `sam_kernels/bench/op_specs.py`) divided by the median
  time: an effective bandwidth, higher is better.
- **%copy**: that GB/s as a share of what a plain `dst.copy_(src)` reached on this machine in this run: how close
  the op runs to the memory-bandwidth limit. Somewhat above 100 % can be real on a CPU (`copy_` is not always the
  fastest way to move memory); far above (> 150 %) means a disturbed measurement and is marked NOISY. `(sort)`:
  not limited by memory bandwidth (a selection), no share given.
- **vs loop / vs eager / vs compile**: speedup over that implementation on the same op and case (its median / this
  median); above 1.00x = faster. **check**: `ok` = this implementation's result matched the reference before it
  was timed; MISMATCH = it did not, and its speed means nothing.
- **fused**: the share of the op's elements that a compiled backend ran (the rest fell back to the eager
  reference: tensors whose layouts differ); bold when a compiled implementation is below 100 %.
- **noise**: `ok`, or NOISY and why (see the verdict at the end); a NOISY row's figures are not results."""

TRAIN_LEGEND = """\
What the columns mean: **model** and **method** (the optimizer; `loop` = the popular SAM class's per-parameter
loop, `eager` / `fused` = sam_kernels.SAM on its reference or its kernels; the variants as their papers set
them); **step ms**: mean time of one whole training step (forward, backward and optimizer; SAM methods run two
forward/backward passes); **p20–p80** as above; **fwd+bwd ms** and **optimizer ms**: the step split into model
work and optimizer work; **x SGD**: step time / the SGD step's (a SAM step costs about 2x: two passes);
**backends**: the sam_kernels backends that ran; **noise** as above."""


def _noise(r: dict) -> str:
    return "ok" if not r.get("noise") else "**NOISY**: " + "; ".join(r["noise"])


def _spread(r: dict) -> str:
    return f"{(r['p80_ms'] - r['p20_ms']) / r['median_ms']:.0%}" if r["median_ms"] > 0 else "–"


def _run_facts(result: dict) -> list[str]:
    meta, out = result["meta"], []
    copy = result.get("copy_bandwidth")
    if copy:
        peak = meta.get("spec_peak_gbps")
        before, after = copy.get("before"), copy.get("after")
        measured = (f"{before['gbps']:.1f} GB/s before the timed work, {after['gbps']:.1f} GB/s after; the shares "
                    f"of copy below use the higher, **{copy['gbps']:.1f} GB/s**" if before and after
                    else f"**{copy['gbps']:.1f} GB/s**")
        out.append(f"Copy bandwidth (`dst.copy_(src)` on {_size(copy['numel'])} fp32, bytes read + written / time): "
                   + measured + (f" ({copy['gbps'] / peak:.0%} of the {peak:.0f} GB/s spec peak)." if peak else "."))
    cpu = result.get("cpu_usage")
    if cpu:
        out.append(f"Other processes used {cpu['others_cores']:.2f} of the {meta.get('cpu_cores')} cores on average "
                   f"during the run (VM steal {cpu['steal_cores']:.2f}); load average (1 min) "
                   + " → ".join(f"{la[0]:.2f}" for la in (meta.get("loadavg_start"), meta.get("loadavg_end")) if la)
                   + ".")
    return out


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
    for fact in _run_facts(result):
        lines += [fact, ""]
    if result.get("ops"):
        lines += ["## Per-op microbenchmarks", "", OPS_LEGEND, ""]
        rows = sorted(result["ops"], key=lambda r: (list(SPECS).index(r["op"]), r["numel"],
                                                     IMPL_ORDER.index(r["impl"])))
        lines += _table(
            ["op", "case", "impl", "ms", "p20–p80", "spread", "GB/s", "%copy", "vs loop", "vs eager", "vs compile",
             "fused", "check", "noise"],
            [[r["op"], f"{r['case']} ({_size(r['numel'])}, {r['tensors']}t)", r["impl"], _ms(r["median_ms"]),
              f"{_ms(r['p20_ms'])}–{_ms(r['p80_ms'])}", _spread(r), f"{r['gbps']:.1f}",
              f"{r['frac_copy_bw']:.0%}" if r["bandwidth_bound"] else "(sort)",
              _x(r["speedup"].get("loop")), _x(r["speedup"].get("eager")), _x(r["speedup"].get("compile")),
              _fused(r), "ok" if r["correct"] else f"**MISMATCH** {r['mismatch_at']}", _noise(r)] for r in rows])
        lines.append("")
    if result.get("ops_skipped"):
        lines += ["Skipped:", ""] + _skipped(result["ops_skipped"], ("op", "case"), "impl") + [""]
    if result.get("targets"):
        lines += ["## Targets", "",
                  "The performance goals this project set itself (its issue #7): on CPU, the fused SAM step at "
                  "least 1.5x faster than the foreach reference on ResNet-50's parameters; on GPU, at least 5x the "
                  "per-parameter loop, 1.5x the reference and 1.2x its torch.compile, and every memory-bound op at "
                  ">= 85 % of copy bandwidth from 16M elements. **value** = the median ratio; **range** = its "
                  "least and most favourable values from the p20–p80 ranges. **met**: `yes` only when the whole "
                  "range clears the target and no row involved is NOISY, `NO` when the whole range falls short, "
                  "`–` when not judged (noise, an overlapping range, or a row that did not run).", ""]
        lines += _table(["target", "value", "range", "met", "note"],
                        [[t["name"], "–" if t["value"] is None else f"{t['value']:.2f}",
                          "–" if t.get("low") is None else f"{t['low']:.2f}–{t['high']:.2f}",
                          {True: "yes", False: "**NO**", None: "–"}[t["met"]], t["note"]] for t in result["targets"]])
        lines.append("")
    train = result.get("train")
    if train and (train["rows"] or train["skips"]):
        lines += ["## End-to-end training step", "", TRAIN_LEGEND, ""]
        lines += _table(["model", "method", "step ms", "p20–p80", "fwd+bwd ms", "optimizer ms", "x SGD",
                         "backends", "note", "noise"],
                        [[r["model"], r["method"], _ms(r["step"]["mean_ms"]),
                          f"{_ms(r['step']['p20_ms'])}–{_ms(r['step']['p80_ms'])}", _ms(r["fwd_bwd_mean_ms"]),
                          _ms(r["optimizer_mean_ms"]), _x(r["ratio_to_sgd"]), ",".join(r["backends_ran"]) or "–",
                          r["note"], _noise(r)] for r in train["rows"]])
        lines.append("")
        if train["skips"]:
            lines += ["Skipped:", ""] + _skipped(train["skips"], ("model",), "method") + [""]
    v = result.get("verdict")
    if v:
        lines += ["## Verdict", "", v["text"], ""]
        lines += [f"- {f}" for f in v["facts"]]
        if v["advice"]:
            lines += ["", "What to do: " + "; ".join(v["advice"]) + "."]
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Optional[str]:
    """GB/s vs size, one panel per bandwidth-bound op, one line per impl. Returns why not, if not drawn."""
    rows = [r for r in result.get("ops", []) if r["bandwidth_bound"]]
    if not rows:
        return "no bandwidth-bound op rows to plot"
    try:  # optional (the [bench] extra)
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
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


def write(result: dict, out_dir: Path, stem: str) -> tuple[dict[str, Path], Optional[str]]:
    """Writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``; returns the paths and why there is no
    PNG (None when there is one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result) + "\n")
    why_not = plot(result, paths["png"])
    if why_not:
        del paths["png"]
    return paths, why_not
