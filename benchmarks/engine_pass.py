"""Time one engine pass over an eval set with every rule on (`HandModel.stream_metrics_rows`, one mask):
the number a kernel change must not make worse. Run from the project root:

    python -m benchmarks.engine_pass [--rules rules] [--corpus ../shared/corpus/tinystories/valid.txt] [--repeats 3]

The first pass may include the numba compile (reported apart); the others are the steady cost.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from .workload import add_pass_args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pass_args(ap, 0, "only the first SEQS sequences (0: all)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    import os
    import resource

    import numba

    from verify.ledger.evaluate import evaluate

    ev = evaluate(None, a.rules, a.corpus, 0, 0, a.train_corpus, log=lambda m: None, ledger_rows=False)
    mask = np.ones(len(ev.rules.rule_ids), bool)
    seqs, logp = ev.ref.seqs, ev.ref.logp
    if a.seqs:
        seqs = seqs[:a.seqs]
        logp = logp[:sum(len(s) for s in seqs)]
    n = sum(len(s) for s in seqs)
    for i in range(a.repeats):
        load = os.getloadavg()[0]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        list(ev.hand.stream_metrics_rows(seqs, logp, [mask]))
        ru2 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime
        print(f"pass {i}: {time.perf_counter() - t:.2f} s wall, {cpu:.2f} s CPU for {n:,} positions "
              f"({numba.get_num_threads()} numba threads; load {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
