"""Noise facts for a run's footer (ours): CPU time other processes (and the hypervisor: VM steal)
took while it ran, from ``/proc/stat`` minus this process's own and its children's (torch.compile's
workers are the benchmark's own work), and the load average. They explain an unresolved verdict;
they judge nothing: the verdicts come from paired intervals (``measure``), which hold under load.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

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


def snap() -> Optional[CpuSnapshot]:
    """The machine's and this process's CPU time now; None where there is no ``/proc/stat``."""
    stat = _read_proc_stat()
    if stat is None:
        return None
    return CpuSnapshot(time.perf_counter(), stat[0], stat[1], own_cpu_s())


def usage(start: Optional[CpuSnapshot], end: Optional[CpuSnapshot]) -> Optional[dict]:
    """Cores other processes ("others_cores") and the hypervisor ("steal_cores") took on average
    between two snapshots; None when not measurable."""
    if start is None or end is None:
        return None
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
