"""Where the numbers were measured: CPU, cores, load, library versions, git commit."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_verdict(cores: int | None = None, load: list[float] | None = None) -> str | None:
    """None when the machine is quiet enough to time; else a one-line reason. The 1-minute load average
    counts runnable processes: above the usable cores, some other process holds a core part of the time
    and both sides' threads (torch's above all) stall unpredictably (issue 22: 37,085 -> 1,984 tok/s)."""
    cores = cores or usable_cores()
    load = loadavg() if load is None else load
    if load is None or load[0] <= cores:
        return None
    return (f"load average {load[0]:.2f} (1 min) exceeds the {cores} usable cores: other processes hold cores, so "
            "every timing and ratio here is unreliable")


def git_commit() -> dict:
    """HEAD and whether the tree has local changes (read-only git commands; None outside a checkout)."""
    out: dict = {"commit": None, "dirty": None}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10, check=True).stdout.strip() or None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                            text=True, timeout=10, check=True).stdout
        out["dirty"] = bool(st.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", None))
    except Exception:
        return None


def machine_info() -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable_cores(),
        "mem_total_gib": _mem_total_gib(),
        "loadavg_start": loadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "torch": _version("torch"),
    }
    try:
        import numba

        info["numba_threads"] = int(numba.config.NUMBA_NUM_THREADS)
        info["numba_threading_layer_env"] = numba.config.THREADING_LAYER
    except Exception:
        pass
    try:
        import torch

        info["torch_threads"] = int(torch.get_num_threads())
    except Exception:
        pass
    info.update({f"git_{k}": v for k, v in git_commit().items()})
    return info
