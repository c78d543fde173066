"""Run a child process and get its wall time and its own peak RSS.

Peak RSS is the child's VmHWM from /proc/<pid>/status, polled every few ms while it runs (a high-water
mark, so only growth in the last poll interval before exit could be missed). Not ru_maxrss: Python
starts children with vfork/exec, and Linux carries the PARENT's high-water mark into the child's
ru_maxrss at exec, so every child of a big benchmark process would report the benchmark's own size
(RUSAGE_CHILDREN has the same flaw and also keeps the max over all children). ru_maxrss is the
fallback where /proc is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .machine import ROOT


@dataclass
class ChildResult:
    cmd: list[str]
    rc: int
    wall: float
    maxrss_bytes: int
    stdout: str
    stderr: str

    def check(self, what: str) -> "ChildResult":
        if self.rc != 0:
            tail = "\n".join((self.stderr or self.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{what} failed (exit {self.rc}): {' '.join(self.cmd)}\n{tail}")
        return self


def _vmhwm(status_file: Path) -> int:
    try:
        for line in status_file.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_child(cmd: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 900) -> ChildResult:
    full_env = dict(os.environ)
    if env:
        full_env.update({k: str(v) for k, v in env.items()})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env, cwd=cwd or ROOT)
        deadline = t0 + timeout
        hwm = 0
        status_file = Path(f"/proc/{p.pid}/status")
        while True:
            hwm = max(hwm, _vmhwm(status_file))
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.003)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildResult(cmd, p.returncode, wall, hwm or int(ru.ru_maxrss) * 1024, out.read(), err.read())


def run_probe(spec: dict, env: dict | None = None) -> tuple[dict, ChildResult]:
    """`python -m benchmarks.probe` with a JSON spec; returns (the probe's JSON report, child result)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        res = run_child([sys.executable, "-m", "benchmarks.probe", path], env=env).check(f"probe {spec.get('kind')}")
    finally:
        os.unlink(path)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"probe {spec.get('kind')} printed no JSON:\n{res.stdout}\n{res.stderr}")
    return json.loads(lines[-1]), res
