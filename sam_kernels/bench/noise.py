"""How far a benchmark run can be trusted, from the machine's noise measured in the same run (ours).

A result is marked noisy, and no target is judged from it, when any of these holds:

- ``spread``: its repeats disagree: (p80 − p20) / median > ``SPREAD_MAX`` (not judged for SAM
  variants whose step cost varies by design: SS-SAM, AE-SAM, LookSAM, AE-LookSAM);
- ``busy``: other processes (or the hypervisor: VM steal time) used more than ``busy_limit(cores)``
  cores on average while it was timed: CPU time of the whole machine from ``/proc/stat`` minus
  this process's own, over the timing window widened to at least ``MIN_WINDOW_S`` (the counters
  tick every 10 ms; the benchmark's own child processes, e.g. torch.compile's workers, count as its own);
- ``copy drift``: the copy bandwidth (``dst.copy_(src)``) measured before and after the timed work
  differs by more than ``COPY_DRIFT_MAX``: the machine changed under the run (every result is
  marked), or the copy measurement itself had a spread above ``SPREAD_MAX``;
- ``%copy``: a bandwidth-bound op is timed above ``FRAC_COPY_MAX`` of that copy bandwidth: more
  than a little above 100 % means the copy or the op measurement was disturbed;
- ``faster than SGD``: a SAM step with two forward/backward passes timed faster than one SGD step.

The load average is recorded at the start and end but judges nothing: it is a one-minute
average, so it still shows a build that finished just before the run and misses a burst inside it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

SPREAD_MAX = 0.20
COPY_DRIFT_MAX = 0.15
FRAC_COPY_MAX = 1.5
MIN_WINDOW_S = 1.0
MOSTLY_CLEAN = 0.1  # at most this share of noisy results, the verdict points to the clean ones


def busy_limit(cores: int) -> float:
    """Cores that other processes may use on average before a result counts as noisy:
    10 % of the machine, at least 0.2 of a core."""
    return max(0.2, 0.1 * cores)


@dataclass(frozen=True)
class CpuSnapshot:
    t: float  # perf_counter seconds
    busy_s: float  # CPU seconds of the whole machine spent running anything (user, nice, system, irq, softirq)
    steal_s: float  # CPU seconds the hypervisor gave to other VMs while this one wanted to run
    own_s: float  # CPU seconds of this process (all its threads) and of its child processes


def _read_proc_stat() -> Optional[tuple[float, float]]:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    return (user + nice + system + irq + softirq) / hz, steal / hz


def own_cpu_s() -> float:
    """CPU seconds used by this process and every process it started, live or ended: torch.compile's
    worker processes are the benchmark's own work, not noise."""
    t = os.times()
    total = time.process_time() + t.children_user + t.children_system  # children: ended and waited for
    hz = os.sysconf("SC_CLK_TCK")
    todo, seen = [os.getpid()], set()
    while todo:  # live descendants; an ended grandchild is in its parent's cutime/cstime
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = f.read().split()
            except OSError:
                continue
            for kid in kids:
                if kid in seen:
                    continue
                seen.add(kid)
                todo.append(int(kid))
                try:
                    with open(f"/proc/{kid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                total += sum(int(x) for x in fields[11:15]) / hz  # utime, stime, cutime, cstime
    return total


class CpuMonitor:
    """Snapshots of the machine's and this process's CPU time; ``others(since)`` averages what other
    processes used between a snapshot and now. Linux only (``/proc/stat``); elsewhere ``available``
    is False and nothing is judged by it."""

    def __init__(self) -> None:
        self.available = _read_proc_stat() is not None
        self._snaps: list[CpuSnapshot] = []

    def snap(self) -> Optional[CpuSnapshot]:
        stat = _read_proc_stat()
        if stat is None:
            return None
        s = CpuSnapshot(time.perf_counter(), stat[0], stat[1], own_cpu_s())
        self._snaps.append(s)
        return s

    def others(self, since: Optional[CpuSnapshot]) -> Optional[dict]:
        """{"others_cores", "steal_cores", "window_s"} from ``since`` (widened back to at least
        ``MIN_WINDOW_S`` where earlier snapshots allow) to now; None when not measurable."""
        end = self.snap()
        if since is None or end is None:
            return None
        start = since
        for s in reversed(self._snaps):  # the latest snapshot at least MIN_WINDOW_S before the end
            if s.t <= min(since.t, end.t - MIN_WINDOW_S):
                start = s
                break
        else:
            start = min(self._snaps, key=lambda s: s.t)
        return usage(start, end)


def usage(start: CpuSnapshot, end: CpuSnapshot) -> Optional[dict]:
    dt = end.t - start.t
    if dt <= 0:
        return None
    others = max(0.0, (end.busy_s - start.busy_s) - (end.own_s - start.own_s))
    return {"others_cores": others / dt, "steal_cores": max(0.0, end.steal_s - start.steal_s) / dt, "window_s": dt}


def load_average() -> Optional[tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def spread(median: float, p20: float, p80: float) -> float:
    return (p80 - p20) / median if median > 0 else float("inf")


def timing_noise(median: float, p20: float, p80: float, cpu: Optional[dict], cores: int,
                 varies: bool = False) -> list[str]:
    """Why one timed result is noisy (empty: it is not). ``varies``: the work itself changes from
    repeat to repeat (a SAM variant that skips the second pass on some steps), so its spread is
    not judged."""
    reasons = []
    s = spread(median, p20, p80)
    if s > SPREAD_MAX and not varies:
        reasons.append(f"spread {s:.0%}")
    if cpu is not None:
        busy = cpu["others_cores"] + cpu["steal_cores"]
        if busy > busy_limit(cores):
            reasons.append(f"busy {busy:.2f} cores")
    return reasons


def copy_noise(before: Optional[dict], after: Optional[dict]) -> list[str]:
    """Why the copy bandwidth of this run is not a reference (empty: it is). Each dict has the
    copy's ``gbps``, ``median_ms``, ``p20_ms``, ``p80_ms``."""
    reasons = []
    for name, c in (("before", before), ("after", after)):
        if c is not None:
            s = spread(c["median_ms"], c["p20_ms"], c["p80_ms"])
            if s > SPREAD_MAX:
                reasons.append(f"copy {name}: spread {s:.0%}")
    if before is not None and after is not None:
        hi, lo = max(before["gbps"], after["gbps"]), min(before["gbps"], after["gbps"])
        if (hi - lo) / hi > COPY_DRIFT_MAX:
            reasons.append(f"copy drift {before['gbps']:.1f} -> {after['gbps']:.1f} GB/s")
    return reasons


# The first word of every reason names its kind; the verdict counts them under these words.
KINDS = {"spread": "repeats disagree", "busy": "other processes busy", "copy": "copy bandwidth unsteady",
         "%copy": "implausible share of copy bandwidth", "faster": "a SAM step faster than an SGD step",
         "SGD": "the SGD step it is compared with is noisy"}


def mark_ops(rows: list[dict], cores: int, copy_reasons: list[str]) -> None:
    """Sets ``row["noise"]`` (list of reasons, empty = clean) on every per-op row; ``copy_reasons``
    (copy_noise) mark every row, as "copy unsteady" (the details go into the verdict)."""
    for r in rows:
        reasons = timing_noise(r["median_ms"], r["p20_ms"], r["p80_ms"], r.get("cpu"), cores)
        if r.get("bandwidth_bound") and r.get("frac_copy_bw") is not None and r["frac_copy_bw"] > FRAC_COPY_MAX:
            reasons.append(f"%copy {r['frac_copy_bw']:.0%} implausible")
        r["noise"] = reasons + (["copy unsteady"] if copy_reasons else [])


def mark_train(rows: list[dict], cores: int, copy_reasons: list[str]) -> None:
    """Sets ``row["noise"]`` on every training-step row (SGD's noise carries into every x SGD ratio)."""
    by_model = {}
    for r in rows:
        reasons = timing_noise(r["step"]["median_ms"], r["step"]["p20_ms"], r["step"]["p80_ms"], r.get("cpu"), cores,
                               r.get("varies", False))
        if r["protocol"] == "sam" and r.get("ratio_to_sgd") is not None and r["ratio_to_sgd"] < 1.0:
            reasons.append("faster than SGD with two passes")
        r["noise"] = reasons + (["copy unsteady"] if copy_reasons else [])
        if r["method"] == "SGD":
            by_model[r["model"]] = r["noise"]
    for r in rows:
        if r["method"] != "SGD" and by_model.get(r["model"]):
            r["noise"] = r["noise"] + ["SGD step noisy"]


def verdict(result: dict) -> dict:
    """The run as a whole: trustworthy or not, why, and what to do. Plain words for the report's end."""
    rows = result.get("ops", []) + result.get("train", {}).get("rows", [])
    noisy = [r for r in rows if r.get("noise")]
    meta = result["meta"]
    cores = meta.get("cpu_cores") or 1
    facts = []
    copy = result.get("copy_bandwidth") or {}
    if copy.get("before") and copy.get("after"):
        problems = copy_noise(copy["before"], copy["after"])
        facts.append(f"copy bandwidth {copy['before']['gbps']:.1f} GB/s before, {copy['after']['gbps']:.1f} after"
                     + (f": unsteady ({'; '.join(problems)})" if problems else ": steady"))
    cpu = result.get("cpu_usage")
    if cpu:
        facts.append(f"other processes used {cpu['others_cores']:.2f} of {cores} cores on average during the run"
                     + (f" (VM steal {cpu['steal_cores']:.2f})" if cpu["steal_cores"] >= 0.01 else ""))
    elif cpu is None and "cpu_usage" in result:
        facts.append("CPU use of other processes not measurable here (no /proc/stat)")
    la0, la1 = meta.get("loadavg_start"), meta.get("loadavg_end")
    if la0 and la1:
        facts.append(f"load average {la0[0]:.2f} at the start, {la1[0]:.2f} at the end (1 min; {cores} cores)")
    counts: dict[str, int] = {}
    for r in noisy:
        for kind in {why.split(" ")[0] for why in r["noise"]}:
            counts[kind] = counts.get(kind, 0) + 1
    advice = []
    if noisy:
        if any(k in counts for k in ("busy", "copy", "spread")):
            advice.append("close other work (builds, tests, other benchmarks) and run again")
        if meta.get("device_type") == "cpu" and meta.get("torch_threads", 1) > 1:
            advice.append(f"`--threads 1` (now {meta.get('torch_threads')}) leaves a core for the rest of the "
                          f"machine and gives steadier numbers on a shared machine")
        advice.append("repeat the run and compare: figures that move between runs are not results "
                      "(`--repeats 10` for more repeats per row)")
    trustworthy = bool(rows) and not noisy
    if not rows:
        text = "Nothing was timed."
    elif trustworthy:
        text = (f"The run can be trusted: every one of its {len(rows)} results had repeats within "
                f"{SPREAD_MAX:.0%} of each other, no other process took more than "
                f"{busy_limit(cores):.1f} cores while it was timed, and the copy bandwidth held steady "
                f"(within {COPY_DRIFT_MAX:.0%}).")
    else:
        why = "; ".join(f"{KINDS.get(k, k)}: {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        if len(noisy) <= MOSTLY_CLEAN * len(rows) and "copy" not in counts:
            text = (f"Only part of the run can be trusted: {len(noisy)} of its {len(rows)} results were taken under "
                    f"noise (marked NOISY in the tables; reasons: {why}); the unmarked ones can be used. Targets are "
                    f"not judged from noisy results.")
        else:
            text = (f"The run can NOT be trusted: {len(noisy)} of its {len(rows)} results were taken under noise "
                    f"(marked NOISY in the tables; reasons: {why}). Targets are not judged from them.")
    return {"trustworthy": trustworthy, "noisy": len(noisy), "results": len(rows), "facts": facts,
            "advice": advice, "text": text}
