"""Where a run ran and what it used: package versions, the git commit, the hardware, and the
process's memory (recorded per batch, so that growth with the number of edits shows)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("seqedit-harness", "torch", "transformers", "lm-eval", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]  # the checkout holding harness/
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None



def memory_mb() -> dict:
    """Resident set size of this process now (Linux; else its peak so far) and, on a GPU, the
    memory torch holds: logged per batch so that growth with the number of edits shows."""
    import resource

    import torch

    info = {}
    rss = proc_status_mb("VmRSS")
    if rss is not None:
        info["rss_mb"] = rss
    peak = proc_status_mb("VmHWM")
    info["peak_rss_mb"] = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        info["gpu_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
    return info
