"""The inner loop (issue 22, item 3): `verify` on valid.txt after nothing, a comment, and one edited number.

    python -m benchmarks.edit_loop [--corpus ../shared/corpus/tinystories/valid.txt] [--rules rules] [--watch]

Copies the rules to a temporary folder and runs `python -m verify.cli verify --corpus ... --rules COPY`
(all-rules and verified ledgers, this checkout's code) once per step, in order: a warm-up, nothing
touched, a comment appended to the largest rule file, one number of a bigram row, one number of a
head_out, a neuron's threshold. Prints per step the CLI's `wall time` footer, the process's wall, user
and system seconds, and the load average before and after (the machine is shared: compare steps run
in the same minutes only). The edits are real: each step's rows and compiled ruleset are new.

--watch: the same edits under one `verify --watch` process (verify/cli/watch.py), each timed from just before
the file is written until the process prints that it is watching again: the save-to-ledger latency a user
sees, its polling (<= 0.125 s) included.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (step, file, rule id): one number each. Reach = the rule's span (the sequence prefixes up to its last position:
# verify/ledger/incremental.py) as a share of valid.txt's positions; over the shipped rules the median is 14% for a
# bigram, 28% for a head_out with a `next` table (35% counting copy-only ones). Only the positions where the rule
# acts are finished: after.their's current token, or for head1.be (no `now`) every position from the first ' be'.
EDITS = [
    ("bigram number, median reach (after.their: its span is 15% of the positions)", "30_bigram_tokens.toml", "after.their"),
    ("bigram number, 10th-percentile reach (after.dog: 4%)", "30_bigram_tokens.toml", "after.dog"),
    ("head_out number, median reach (head1.be: 28%)", "41_head1.toml", "head1.be"),
    ("neuron threshold (spans every position)", "50_neurons.toml", None),
]
_NUM = re.compile(r"(=\s*)(-?\d+\.\d+)")


def edit_number(path: Path, rule_id: str | None, delta: float) -> str:
    """Add `delta` to the first number of the rule's `next` table (a bigram/head_out) or, with no id, to the
    first neuron threshold. Returns what changed."""
    if rule_id:
        return edit_field(path, rule_id, "next", delta)
    text = path.read_text()
    return _bump(path, text, text.index("threshold ="), delta)


def edit_field(path: Path, rule_id: str, field: str, delta: float) -> str:
    """Add `delta` to the first number of the rule's `field` (its value, or the first in its table). Returns what
    changed; a rule without that key is an error saying so."""
    text = path.read_text()
    at = text.index(f'id = "{rule_id}"')
    end = text.find("\n[[", at)
    start = text.find(f"\n{field} =", at, len(text) if end < 0 else end)
    if start < 0:
        raise SystemExit(f"{path.name}: rule {rule_id} has no `{field}`; pick another")
    return _bump(path, text, start, delta)


def _bump(path: Path, text: str, start: int, delta: float) -> str:
    m = _NUM.search(text, start)
    new = f"{float(m.group(2)) + delta:.6f}"
    path.write_text(text[:m.start(2)] + new + text[m.end(2):])
    return f"{m.group(2)} -> {new} at {path.name}:{text.count(chr(10), 0, m.start()) + 1}"


def run(rules: Path, corpus: str, step: str) -> dict:
    load0 = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "verify.cli", "verify", "--corpus", corpus, "--rules", str(rules)],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = " ".join(p.stdout.split())
    footer, final = _summary(out)
    return {"step": step, "rc": p.returncode, "wall": wall, "user": r1.ru_utime - r0.ru_utime,
            "sys": r1.ru_stime - r0.ru_stime, "load": (load0, os.getloadavg()[0]),
            "footer": footer or p.stderr[-300:], "final": final}


def _summary(text: str) -> tuple[str | None, str]:
    """verify's `wall time` footer (None when absent) and its final-KL line ("" when absent), from its output."""
    footer = re.search(r"wall time [^;]*\)", text)
    final = re.search(r"final KL [^%]*%[^%]*%[^%]*%", text)
    return footer.group(0) if footer else None, final.group(0) if final else ""


def watched(rules: Path, corpus: str, steps: list) -> None:
    """The steps' edits under one `verify --watch` process: seconds from each write to the next prompt."""
    import threading

    p = subprocess.Popen([sys.executable, "-m", "verify.cli", "verify", "--corpus", corpus, "--rules", str(rules),
                          "--watch"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: [lines.append((time.perf_counter(), ln)) for ln in p.stdout], daemon=True).start()

    def until_prompt(k: int) -> int:
        t_end = time.perf_counter() + 600
        while time.perf_counter() < t_end:
            while k < len(lines):
                k += 1
                if lines[k - 1][1].startswith("watching"):
                    return k
            if p.poll() is not None:
                raise SystemExit("verify --watch ended:\n" + "".join(ln for _, ln in lines[-30:]))
            time.sleep(0.01)
        raise SystemExit("verify --watch did not answer in 600 s:\n" + "".join(ln for _, ln in lines[-30:]))

    t0 = time.perf_counter()
    k = until_prompt(0)
    print(f"verify --watch started: first ledger after {lines[k - 1][0] - t0:.2f} s", flush=True)
    try:
        for step, change in steps:
            if change is None:
                continue
            load0 = os.getloadavg()[0]
            time.sleep(0.5)  # the watcher's stamp of the previous write is settled
            t0 = time.perf_counter()
            change()
            k0, k = k, until_prompt(k)
            text = " ".join(" ".join(ln.split()) for _, ln in lines[k0:k])
            footer, final = _summary(text)
            print(f"{step}: {lines[k - 1][0] - t0:.2f} s from the write to the prompt, load {load0:.2f} -> "
                  f"{os.getloadavg()[0]:.2f}\n    {footer or text[-300:]}\n    {final}", flush=True)
    finally:
        p.terminate()
        p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/corpus/tinystories/valid.txt")
    ap.add_argument("--rules", default="rules")
    ap.add_argument("--watch", action="store_true", help="time the edits under one `verify --watch` process")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="inner_loop"))
    rules = tmp / "rules"
    shutil.copytree(a.rules, rules)
    steps = [("warm-up", None), ("nothing touched", None)]
    largest = max(rules.glob("*.toml"), key=lambda p: p.stat().st_size)
    steps.append((f"comment appended to {largest.name}", lambda: largest.write_text(largest.read_text() + "\n# a comment\n")))
    # a new number on every run: an edit this machine measured before would find its rows cached
    delta = 0.1 + random.SystemRandom().randrange(1, 10**6) / 1e7
    for step, f, rid in EDITS:
        steps.append((step, lambda f=f, rid=rid: print("   ", edit_number(rules / f, rid, delta))))
    if a.watch:
        watched(rules, a.corpus, steps)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    for step, change in steps:
        if change is not None:
            change()
        r = run(rules, a.corpus, step)
        print(f"{r['step']}: rc {r['rc']}, {r['wall']:.2f} s wall, {r['user']:.2f} s user, {r['sys']:.2f} s sys, "
              f"load {r['load'][0]:.2f} -> {r['load'][1]:.2f}\n    {r['footer']}\n    {r['final']}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
