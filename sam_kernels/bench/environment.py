"""What a result was measured on: device, versions, commit. Recorded with every run."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

import sam_kernels

REPO = Path(__file__).resolve().parents[2]

# Spec memory bandwidth (GB/s) by device-name fragment, most specific first; context for the
# copy bandwidth measured in each run (which is what the fractions in the report are taken of).
SPEC_PEAK_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
                  ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may use (affinity), which is what the CPU kernels get."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({cpu_cores()} cores, {threads} thread{'s' if threads != 1 else ''})"


def device_slug(device: torch.device) -> str:
    """File-name-safe device label, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-intel-xeon-processor-2c``."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = f"cpu {cpu_model()} {cpu_cores()}c"
    raw = re.sub(r"\((r|tm)\)", "", raw.lower())
    return re.sub(r"[^a-z0-9]+", "-", raw).strip("-")


def spec_peak_gbps(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for frag, gbps in SPEC_PEAK_GBPS if frag in name), None)


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: torch.device) -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "spec_peak_gbps": spec_peak_gbps(device),
        "cpu": cpu_model(),
        "cpu_cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "sam_kernels": sam_kernels.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backends": {name: {"available": b["available"], "devices": b["devices"], "reason": b["reason"]}
                     for name, b in sam_kernels.backends().items()},
    }
