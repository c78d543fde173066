"""Where `kernels.run_seqs` spends its time, line by line (issue 22, item 2): Linux `perf` samples an engine pass,
and each sample's address is mapped to its line of handmodel/kernels.py through the kernel's DWARF line table.

    python -m benchmarks.lineprof [--rules rules] [--corpus ../shared/corpus/tinystories/valid.txt] [--seqs 150]
                                  [--seconds 20] [--top 25]

A child process compiles the kernels with `NUMBA_DEBUGINFO=1` into an empty numba cache (about half a minute),
runs one warm-up pass (every rule on, one ledger row, the KL path, one numba thread), saves run_seqs' object code
and its address, and then repeats the pass while `perf record -e cpu-clock -p CHILD` samples it. Samples inside
run_seqs are mapped with `addr2line` (binutils) on that object code. The helpers and phases are inlined into
run_seqs (kernels._inlined), so a sample reports the line of the helper it ran in (`_add`'s `delta[v] += val`,
wherever it was called from): per line, and per function of kernels.py that holds it. µs per position = share
of run_seqs' samples x run_seqs' share of all samples x the pass's seconds per position.

Needs `perf` allowed to sample this user's processes (kernel.perf_event_paranoid <= 2 or root) and `addr2line`;
without them it says so and exits 2.
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .machine import ROOT
from .workload import add_pass_args

_CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from verify.ledger.evaluate import evaluate
rules, corpus, train, nseq, seconds, out = sys.argv[1:7]
ev = evaluate(None, Path(rules), Path(corpus), 0, 0, Path(train), log=lambda m: None, ledger_rows=False)
mask = np.ones(len(ev.rules.rule_ids), bool)
seqs = ev.ref.seqs[:int(nseq)] if int(nseq) else ev.ref.seqs
logp = ev.ref.logp[:sum(len(s) for s in seqs)]
list(ev.hand.stream_metrics_rows(seqs, logp, [mask]))  # compiles (with debug info) and builds every cache
from handmodel import kernels
(_, cres), = kernels.run_seqs.overloads.items()
lib = cres.library
Path(out, "run_seqs.o").write_bytes(lib.serialize_using_object_code()[2][0])
meta = {"name": cres.fndesc.llvm_func_name, "addr": lib.get_pointer_to_function(cres.fndesc.llvm_func_name),
        "positions": int(sum(len(s) for s in seqs))}
print("READY", json.dumps(meta), flush=True)
t, n = time.perf_counter(), 0
while time.perf_counter() - t < float(seconds) + 3:
    list(ev.hand.stream_metrics_rows(seqs, logp, [mask]))
    n += 1
print("DONE", json.dumps({"passes": n, "seconds": time.perf_counter() - t}), flush=True)
"""


def _functions(src: Path) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every top-level function of a source file."""
    tree = ast.parse(src.read_text())
    return [(n.lineno, n.end_lineno, n.name) for n in tree.body if isinstance(n, ast.FunctionDef)]


def _symbol_range(obj: Path, name: str) -> tuple[str, int, int]:
    """(section, offset, size) of function `name` in the object file (readelf's symbol table)."""
    out = subprocess.run(["readelf", "-sW", str(obj)], capture_output=True, text=True, check=True).stdout
    sections = subprocess.run(["readelf", "-SW", str(obj)], capture_output=True, text=True, check=True).stdout
    index = {}
    for line in sections.splitlines():
        line = line.strip()
        if line.startswith("["):
            num, rest = line[1:].split("]", 1)
            parts = rest.split()
            if parts and num.strip().isdigit():
                index[num.strip()] = parts[0]
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[-1] == name and parts[3] == "FUNC":
            return index[parts[6]], int(parts[1], 16), int(parts[2])
    raise SystemExit(f"lineprof: {name} not found in the object code's symbol table")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pass_args(ap, 150, "the first SEQS sequences (0: all)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long perf samples the repeated passes")
    ap.add_argument("--top", type=int, default=25, help="lines listed")
    a = ap.parse_args(argv)
    missing = [t for t in ("perf", "addr2line", "readelf") if shutil.which(t) is None]
    if missing:
        print(f"lineprof: needs {', '.join(missing)} (linux-perf, binutils) on PATH", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lineprof-"))
    try:
        env = dict(os.environ, NUMBA_DEBUGINFO="1", NUMBA_CACHE_DIR=str(work / "numba"), NUMBA_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        print(f"compiling the kernels with debug info and running a warm-up pass (--seqs {a.seqs}) ...", flush=True)
        child = subprocess.Popen([sys.executable, "-W", "ignore", "-c", _CHILD, str(a.rules), str(a.corpus),
                                  str(a.train_corpus), str(a.seqs), str(a.seconds), str(work)],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline()
        if not line.startswith("READY"):
            child.wait()
            print("lineprof: the engine pass failed before sampling (its error is above)", file=sys.stderr)
            return 2
        meta = json.loads(line.split(" ", 1)[1])
        time.sleep(1.0)
        rec = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", str(child.pid),
                              "-o", str(work / "perf.data"), "--", "sleep", str(a.seconds)],
                             capture_output=True, text=True)
        last = child.stdout.readline()
        child.wait()
        if not last.startswith("DONE"):
            print("lineprof: the engine passes failed while sampled (their error is above)", file=sys.stderr)
            return 2
        done = json.loads(last.split(" ", 1)[1])
        if rec.returncode != 0 or not (work / "perf.data").exists():
            why = (rec.stderr.strip().splitlines() or ["no message"])[-1]
            print(f"lineprof: perf record failed: {why}", file=sys.stderr)
            return 2
        ips = subprocess.run(["perf", "script", "-i", str(work / "perf.data"), "-F", "ip"], capture_output=True,
                             text=True).stdout.split()
        section, start, size = _symbol_range(work / "run_seqs.o", meta["name"])
        offs = collections.Counter(int(x, 16) - meta["addr"] for x in ips)
        inside = {o: n for o, n in offs.items() if 0 <= o < size}
        n_all, n_in = sum(offs.values()), sum(inside.values())
        if not n_in:
            print("lineprof: no sample fell inside run_seqs", file=sys.stderr)
            return 2
        keys = sorted(inside)
        out = subprocess.run(["addr2line", "-e", str(work / "run_seqs.o"), "-j", section, "-a"]
                             + [hex(start + k) for k in keys], capture_output=True, text=True).stdout.splitlines()
        where = {}
        for addr_line, loc in zip(out[0::2], out[1::2]):
            path, _, num = loc.rpartition(":")
            first = num.split()[0] if num.split() else ""
            where[int(addr_line, 16) - start] = (Path(path).name, int(first) if first.isdigit() else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    src = ROOT / "handmodel" / "kernels.py"
    text = src.read_text().splitlines()
    funcs = _functions(src)
    by_line, by_func = collections.Counter(), collections.Counter()
    for o, n in inside.items():
        fname, num = where.get(o, ("?", 0))
        key = num if fname == src.name else 0
        by_line[key] += n
        by_func[next((f for lo, hi, f in funcs if lo <= key <= hi), "(no line)") if key else "(no line)"] += n
    us = done["seconds"] / done["passes"] / meta["positions"] * 1e6 * n_in / n_all
    print(f"{n_all:,} samples, {100 * n_in / n_all:.0f}% in run_seqs; one pass {done['seconds'] / done['passes']:.2f} s "
          f"for {meta['positions']:,} positions (one thread): run_seqs {us:.1f} µs per position\n")
    print(f"{'share':>6} {'µs/pos':>7}  function")
    for f, n in by_func.most_common():
        print(f"{100 * n / n_in:5.1f}% {us * n / n_in:7.2f}  {f}")
    print(f"\n{'share':>6} {'µs/pos':>7}  line of handmodel/kernels.py")
    for num, n in by_line.most_common(a.top):
        body = text[num - 1].strip() if num else "(no line information)"
        print(f"{100 * n / n_in:5.1f}% {us * n / n_in:7.2f}  {num:4d}  {body[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
