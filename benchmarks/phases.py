"""Where an engine pass spends its time (issue 22, item 2): the ledger's groups switched on one after another,
each pass timed, so a group's increment is what its phase costs per position; next to the vocabulary-row floor
and the full-distribution pass. Run from the project root on an idle machine:

    python -m benchmarks.phases [--rules rules] [--corpus ../shared/corpus/tinystories/valid.txt] [--seqs 400]

Per cumulative row (`verify`'s ledger groups: prior, bigram rows, each head with its head_outs, copying,
neurons, long tail): the KL path (`stream_metrics`, cached float16 reference rows) in µs per position, best of
`--repeats` steady passes, and the increment over the row before. A head's increment is its attention (scores,
softmax, running sums) plus its head_out writes; the neurons' increment their activations (reading the heads'
attention) plus their output writes; the prior row is the finish alone (base row, log Z, KL, argmax) with
nothing to accumulate. Then the full distribution (`log_probs_batch`: the finish writes every vocabulary
entry) with every rule on and with the prior alone, and the floor (one exp and one float32 write per
vocabulary entry, `benchmarks/floor.py`) on the same number of positions. The groups interact (a neuron reads
the heads' attention, which its row computes even when the head's own group came earlier): read increments as
what switching a group on adds, not as a partition of one pass.
"""
from __future__ import annotations

import argparse
import os
import time

from .workload import add_pass_args


def best_of(f, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call (compile, base rows, reference stats)."""
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pass_args(ap, 400, "the first SEQS sequences of the eval set (0: all)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    if a.seqs < 0 or a.repeats < 1:
        ap.error("--seqs must be >= 0 and --repeats >= 1")

    import numba

    from verify.ledger.core import group_masks
    from verify.ledger.evaluate import evaluate

    from .floor import floor_pass

    ev = evaluate(None, a.rules, a.corpus, 0, 0, a.train_corpus, log=lambda m: None, ledger_rows=False)
    hm, rules = ev.hand, ev.rules
    seqs = ev.ref.seqs[:a.seqs] if a.seqs else ev.ref.seqs
    n = sum(len(s) for s in seqs)
    logp = ev.ref.logp[:n]
    us = 1e6 / n
    load0 = os.getloadavg()[0]
    print(f"{n:,} positions ({len(seqs)} sequences), {rules.vocab_size} tokens, {numba.get_num_threads()} numba "
          f"threads, best of {a.repeats} steady passes; load {load0:.2f}")
    print(f"{'KL path, groups on':<34} {'µs/pos':>8} {'increment':>10}")
    rows = group_masks(rules)
    prev = 0.0
    for label, mask in rows:
        t = best_of(lambda: hm.stream_metrics(seqs, logp, mask), a.repeats) * us
        print(f"{label:<34} {t:8.2f} {t - prev:+10.2f}", flush=True)
        prev = t
    first_label, first = rows[0]
    full_all = best_of(lambda: hm.log_probs_batch(seqs), a.repeats) * us
    full_prior = best_of(lambda: hm.log_probs_batch(seqs, first), a.repeats) * us
    floor = best_of(floor_pass(n, rules.vocab_size), a.repeats) * us
    print(f"{'full distribution, every rule':<34} {full_all:8.2f}")
    print(f"{'full distribution, ' + first_label:<34} {full_prior:8.2f}")
    print(f"{'floor (exp + write per token)':<34} {floor:8.2f}   hand full / floor {full_all / floor:.1f}x")
    print(f"load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
