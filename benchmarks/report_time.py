"""Where a warm `handmodel report` spends its time, stage by stage (issue 22, item 5).

    python benchmarks/report_time.py [--max-tokens 3000] [--repeat 2] [--out /tmp/r.html]

Runs the report's own stages in one process (the page's positions computed, not read from the page cache;
then the page cache's fill and hit), after a warm-up `evaluate` (caches warm: reference log-probs,
ledger rows, verdicts; numba compiled), and prints seconds per stage plus the load average beside it. The
whole command (interpreter start-up included) is `time python -m verify.cli report ...`: see README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/report_time.html"))
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus/tinystories/valid.txt"),
                    help="as spelled on the command line: the reference cache is keyed by the path as given")
    a = ap.parse_args(argv)

    from verify.cli import options as O
    from verify.cli.ledger import _measure, _verdicts
    from verify.reports import report as R

    quiet = lambda m: None  # noqa: E731
    for k in range(a.repeat):
        load = os.getloadavg()[0]
        t = {}
        t0 = time.perf_counter()
        ev = _measure(O.DEFAULT_CHECKPOINT, O.DEFAULT_RULES, a.corpus, None, 0, O.DEFAULT_TRAIN, quiet)
        t["evaluate (cached rows)"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        vi = _verdicts(ev, O.DEFAULT_CHECKPOINT, O.DEFAULT_RULES, a.corpus, None)
        t["verdicts"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        data, n = R.token_data(ev, a.max_tokens, vi, timings=t)
        t["token data (total)"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        R.write_report(a.out, ev, a.max_tokens, vi, data=(data, n))
        t["write page"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        R.token_data(ev, a.max_tokens, vi, cache=True)  # fills the page cache (or reads it)
        t["token data (page cache, 1st)"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        cached = R.token_data(ev, a.max_tokens, vi, cache=True)
        t["token data (page cache hit)"] = time.perf_counter() - t1
        assert cached[0] == data, "the page cache gave other positions than computing them"
        t["total (without the cache lines)"] = time.perf_counter() - t0 - t["token data (page cache, 1st)"] - \
            t["token data (page cache hit)"]
        print(f"run {k + 1}: load average {load:.2f} (1 min) at start, {n:,} tokens, "
              f"page {a.out.stat().st_size / 1e6:.1f} MB")
        for name, s in t.items():
            print(f"  {name:28s} {s:7.2f} s")


if __name__ == "__main__":
    main()
