"""Section 6: rule compilation (load_rules) and numba kernel compile, cold (empty NUMBA_CACHE_DIR, in a
fresh process) vs warm (the same cache dir, filled by the cold run).

Standalone: `python -m benchmarks.compile_cost [--rules rules]` times the kernels' first calls (cold, then warm).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .child import run_probe
from .results import Section
from .stats import summarize


class ColdProbe:
    """The cold compile probe (an empty NUMBA_CACHE_DIR, in a fresh process), started now on a thread; the warm
    probes then reuse its cache dir. --overlap-compile starts it before section 1 so that its wall time is hidden
    behind the other sections (every timing of the run then includes that contention)."""

    def __init__(self, w, log=print):
        self.spec = {"kind": "compile", "checkpoint": str(w.ckpt), "rules": str(w.rules_dir), **w.files()}
        self.ndir = Path(tempfile.mkdtemp(prefix="numba-", dir=w.work))
        self.env = {"NUMBA_CACHE_DIR": str(self.ndir)}
        log("  numba cold compile (empty NUMBA_CACHE_DIR) ...")
        self._ex = ThreadPoolExecutor(1)
        self._fut = self._ex.submit(run_probe, self.spec, self.env)

    def result(self):
        return self._fut.result()

    def close(self) -> None:
        """Wait for the probe (its errors are result()'s to raise) and remove its cache dir."""
        self._ex.shutdown(wait=True)
        shutil.rmtree(self.ndir, ignore_errors=True)


def run(w, cfg, log=print, cold: ColdProbe | None = None) -> Section:
    """`cold`: the cold probe when already started (--overlap-compile); else it starts after the load_rules timings."""
    from handmodel import load_rules

    sec = Section("compile")
    # load_rules in this process: a cold parse cache (fresh HANDMODEL_CACHE), then warm repeats
    old = os.environ.get("HANDMODEL_CACHE")
    pdir = Path(tempfile.mkdtemp(prefix="parse-", dir=w.work))
    try:
        os.environ["HANDMODEL_CACHE"] = str(pdir)
        t = time.perf_counter()
        load_rules(w.rules_dir, w.vocab)
        cold_parse = time.perf_counter() - t
        warm_parse = []
        for _ in range(cfg.repeats):
            t = time.perf_counter()
            load_rules(w.rules_dir, w.vocab)
            warm_parse.append(time.perf_counter() - t)
    finally:
        if old is None:
            os.environ.pop("HANDMODEL_CACHE", None)
        else:
            os.environ["HANDMODEL_CACHE"] = old
        shutil.rmtree(pdir, ignore_errors=True)
    sec.add("load_rules_warm_s", "load_rules (parse cache warm)", "s", "lower", warm_parse)
    sec.add("load_rules_cold_s", "load_rules (parse cache empty)", "s", "lower", cold_parse)

    if not cfg.cold_compile:  # --no-cold-compile: the warm probes only, on this checkout's numba cache
        spec = {"kind": "compile", "checkpoint": str(w.ckpt), "rules": str(w.rules_dir), **w.files()}
        warm = [run_probe(spec) for _ in range(cfg.compile_repeats)]
        sec.add("numba_warm_first_calls_s", "first log-probs + KL call, numba cache warm (load)", "s", "lower",
                [r["first_logp_s"] + r["first_kl_s"] for r, _ in warm])
        sec.add("process_warm_s", "whole probe process, numba cache warm", "s", "lower", [c.wall for _, c in warm])
        sec.details = {"cold": None, "warm": [r for r, _ in warm], "n_rules": len(w.rules.rule_ids)}
        sec.notes.append("--no-cold-compile: the cold numba compile was not measured (warm probes on this checkout's "
                         "numba cache only)")
        return sec
    overlapped = cold is not None
    probe = cold or ColdProbe(w, log=log)
    try:
        cold, cold_child = probe.result()
        warm = [run_probe(probe.spec, env=probe.env) for _ in range(cfg.compile_repeats)]
    finally:
        probe.close()

    def first(rep):
        return rep["first_logp_s"] + rep["first_kl_s"]

    def compiled(rep):
        return max(1e-6, first(rep) - rep["second_logp_s"] - rep["second_kl_s"])

    wf = [first(r) for r, _ in warm]
    sec.add("numba_cold_first_calls_s", "first log-probs + KL call, numba cache empty (compile)", "s", "lower",
            first(cold), note=f"of which compile ~{compiled(cold):.1f} s; one run")
    sec.add("numba_warm_first_calls_s", "first log-probs + KL call, numba cache warm (load)", "s", "lower", wf)
    sec.add("numba_cold_over_warm", "cold / warm first calls", "x", "none", first(cold) / summarize(wf)["median"])
    sec.add("process_cold_s", "whole probe process, numba cache empty", "s", "lower", cold_child.wall)
    sec.add("process_warm_s", "whole probe process, numba cache warm", "s", "lower", [c.wall for _, c in warm])
    sec.details = {"cold": cold, "warm": [r for r, _ in warm], "n_rules": len(w.rules.rule_ids)}
    sec.notes.append("probe process: import handmodel, load_rules, first + second log_probs_batch and stream_metrics "
                     "calls on 4 short sequences; compile = first - second")
    if overlapped:
        sec.notes.append("--overlap-compile: the cold probe ran alongside sections 1-5, so its times and theirs include "
                         "that contention (a smoke run's numbers, not a measurement)")
    return sec


# `python -m benchmarks.compile_cost`: the numba cold compile alone, in a fresh process with an empty
# NUMBA_CACHE_DIR (then again with that cache warm), on the shipped model's vocabulary and the rules given.
_CHILD = r"""
import json, resource, sys, time
import numpy as np
t0 = time.perf_counter()
from handmodel import HandModel, load_rules, load_vocab, kernels
per_kernel = {}  # kernel -> CPU seconds of its calls in the calling threads (numba compiles there; a thread
# waiting for another's compile of the same kernel sleeps on numba's lock), summed over the first calls
def timed(name, f):
    def call(*a):
        ru = resource.getrusage(resource.RUSAGE_THREAD)
        try:
            return f(*a)
        finally:
            ru2 = resource.getrusage(resource.RUSAGE_THREAD)
            per_kernel[name] = per_kernel.get(name, 0.0) + ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime
    return call
for name in ("build_base", "build_uncond", "ref_stats", "ref_atom_mass", "base_dot", "run_seqs"):
    setattr(kernels, name, timed(name, getattr(kernels, name)))  # the engine's entry kernels (helpers are compiled in)
vocab = load_vocab(sys.argv[1])
hm = HandModel(load_rules(sys.argv[2], vocab))
rng = np.random.default_rng(0)
small = [rng.integers(0, len(vocab), 16) for _ in range(4)]
ref = np.full((64, len(vocab)), -np.log(len(vocab)), np.float16)
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = ru.ru_utime + ru.ru_stime
t = time.perf_counter()
hm.log_probs_batch(small)
hm.stream_metrics(small, ref)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"first_calls_s": time.perf_counter() - t, "first_calls_cpu_s": ru.ru_utime + ru.ru_stime - cpu0,
                  "process_s": time.perf_counter() - t0, "per_kernel_cpu_s": per_kernel}))
"""


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description="numba cold compile of the engine's kernels (empty NUMBA_CACHE_DIR)")
    ap.add_argument("--rules", type=Path, default=root / "rules")
    ap.add_argument("--tokenizer", type=Path, default=root / "reference" / "default" / "tokenizer.json")
    a = ap.parse_args(argv)
    ndir = Path(tempfile.mkdtemp(prefix="numba-cold-"))
    try:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(ndir)}
        for label in ("cold (cache empty)", "warm (cache filled)"):
            p = subprocess.run([sys.executable, "-c", _CHILD, str(a.tokenizer), str(a.rules)], env=env, cwd=root,
                               capture_output=True, text=True)
            if p.returncode:
                print(p.stderr, file=sys.stderr)
                return 1
            rep = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{label}: first log-probs + KL calls {rep['first_calls_s']:.1f} s wall, "
                  f"{rep['first_calls_cpu_s']:.1f} s CPU; whole process {rep['process_s']:.1f} s", flush=True)
            print("  first call per kernel, CPU s in the calling thread: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in rep["per_kernel_cpu_s"].items()), flush=True)
    finally:
        shutil.rmtree(ndir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
