"""Result rows: written as JSON lines, read back, shown as text tables and drawn (matplotlib).

The tables and the plot are made from the rows only; the schema is in the package docstring
(``sam_kernels.bench``). ``python -m sam_kernels.bench.results ROWS.jsonl [--plot OUT.png]``
prints the tables of a rows file (and draws it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .steps import label

SUITE_TITLES = {"step": "SAM optimizer step (first_step + second_step, SGD momentum; forward/backward excluded)"}


def write(rows: list[dict], path: Path) -> None:
    """Writes ``rows`` to ``path`` (one JSON object a line), replacing the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _size(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 10**6 else f"{n / 1e3:.3g}k" if n >= 1000 else str(n)


def _ratio(r: dict) -> str:
    if r.get("ratio") is None:
        return "-"
    if r["provider"] == r["vs"]:
        return "1 (reference)"
    return f"{r['ratio']:.2f} [{r['ratio_low']:.2f}, {r['ratio_high']:.2f}]"


def _goal(r: dict) -> str:
    return "" if r.get("target") is None else f">= {r['target']:.2f}"


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["suite"], r["op"], r["case"]), []).append(r)
    return out


def table(rows: list[dict]) -> str:
    """One text table per (suite, op, case): time, ratio to the reference with its interval, share
    of the memory floor, target and verdict."""
    lines = []
    for (suite, op, case), rs in groups(rows).items():
        first = rs[0]
        timed = [r for r in rs if r.get("median_ms") is not None]
        rounds = max((r["rounds"] for r in timed), default=0)
        title = SUITE_TITLES.get(suite, f"op {op}")
        lines += ["", f"{title}", f"  on {case}: {first['tensors']} tensors, {_size(first['numel'])} elements, "
                  f"{first['dtype']}; {rounds} interleaved rounds; copy {first['copy_gbps']:.1f} GB/s"]
        head = f"  {'':44s} {'median ms':>10s} {'x ' + str(first['vs']) + ' time [95% CI]':>24s} " \
               f"{'of floor':>9s} {'target':>8s}  verdict"
        lines.append(head)
        for r in rs:
            name = label(r["provider"]) if suite == "step" else r["provider"]
            if r.get("skipped"):
                lines.append(f"  {name:44s} skipped: {r['skipped']}")
            elif r.get("mismatch"):
                lines.append(f"  {name:44s} WRONG RESULT, not timed: {r['mismatch']}")
            else:
                floor = "" if r.get("floor_fraction") is None else f"{r['floor_fraction']:.0%}"
                lines.append(f"  {name:44s} {r['median_ms']:10.3g} {_ratio(r):>24s} {floor:>9s} "
                             f"{_goal(r):>8s}  {r.get('verdict') or ''}")
        setup = ", ".join(f"{r['provider']} {r['setup_s']:.1f} s" for r in timed if r.get("setup_s", 0) >= 1.0)
        if setup:
            lines.append(f"  untimed setup (check and first call; torch.compile compiles here): {setup}")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("verdict") is None:
            continue
        out.append(f"  {r['verdict'].upper():10s} {r['case']}: {label(r['vs'])} vs {label(r['provider'])}: "
                   f"{r['ratio']:.2f}x [{r['ratio_low']:.2f}, {r['ratio_high']:.2f}], target >= {r['target']:.2f}x")
    return out


def plot(rows: list[dict], path: Path) -> Optional[str]:
    """Ratio to the reference with its interval, one panel per (suite, op, case); returns why no
    plot was drawn (None: drawn)."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, [r for r in rs if r.get("ratio") is not None]) for key, rs in groups(rows).items()]
    panels = [(key, rs) for key, rs in panels if rs]
    if not panels:
        return "no timed rows with a ratio"
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 0.45 * sum(len(rs) for _, rs in panels)),
                             squeeze=False)
    for ax, ((suite, op, case), rs) in zip(axes[:, 0], panels):
        names = [label(r["provider"]) if suite == "step" else r["provider"] for r in rs]
        y = range(len(rs))
        err = [[r["ratio"] - r["ratio_low"] for r in rs], [r["ratio_high"] - r["ratio"] for r in rs]]
        ax.barh(list(y), [r["ratio"] for r in rs], xerr=err, color="#4c72b0", capsize=3)
        for i, r in enumerate(rs):
            if r.get("target") is not None:
                ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="#c44e52", lw=2)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.set_xscale("log")  # ratios: 2x faster and 2x slower are the same distance from 1
        ax.xaxis.set_major_formatter(plt.FormatStrFormatter("%gx"))
        low, high = ax.get_xlim()
        if high / low < 10:  # within a decade the minor ticks are the only labels; beyond, they crowd
            ax.xaxis.set_minor_formatter(plt.FormatStrFormatter("%gx"))
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{op if suite == 'op' else 'SAM step'} on {case} ({rs[0]['tensors']} tensors): "
                     f"time / {rs[0]['vs']}'s time (red: target)", fontsize=9)
    axes[-1, 0].set_xlabel(f"ratio, {rows[0]['device']}, {rows[0]['timestamp'][:10]}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.bench.results", description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path, help="a rows file written by python -m sam_kernels.bench")
    ap.add_argument("--plot", type=Path, metavar="PNG", help="draw the ratios into this file")
    args = ap.parse_args(argv)
    rows = read(args.rows)
    print(table(rows))
    print("\n".join(verdicts(rows)))
    if args.plot:
        why = plot(rows, args.plot)
        print(f"no plot: {why}" if why else f"written: {args.plot}")


if __name__ == "__main__":
    main()
