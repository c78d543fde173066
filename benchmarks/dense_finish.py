"""When a position should finish densely: time the engine on the shipped rules at several `dense_min`.

    python benchmarks/dense_finish.py [--tokens 16384] [--repeats 3] [--rules rules]

A position whose outputs touch at least `HandModel.dense_min` tokens (or writes a weighted set) finishes
log Z and the argmax with one pass over the vocabulary, and the position after it writes every output
without touched-token bookkeeping (kernels.run_seqs). This times the three engine paths verify uses —
the KL path (stream_metrics), full log-probs and the ledger's fused rows (stream_metrics_rows over the
ruleset's cumulative groups) — at dense_min = V + 1 (per touched token, except weighted-set positions),
V/4, V/2 (the default, engine.DENSE_SHARE) and 0 (every position dense). Settings are interleaved within
each repeat and compared with V + 1 in the same run (the machine is shared: read the ratios). The
reference log-probs are random: the timing does not depend on their values. Run it with PYTHONPATH
pointing at another checkout to time that engine (its HandModel must have dense_min).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rules", type=Path, default=ROOT / "rules")
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "tinystories" / "valid.txt")
    args = ap.parse_args()

    import handmodel
    from weighted_sets import corpus_windows  # run as a script: benchmarks/ is on sys.path

    vocab, seqs, n = corpus_windows(args.corpus, args.tokens)
    V = len(vocab)
    rules = handmodel.load_rules(args.rules, vocab)
    hm = handmodel.HandModel(rules)
    z = np.random.default_rng(1).normal(0, 2, size=(n, V))
    ref = (z - np.log(np.exp(z).sum(1, keepdims=True))).astype(np.float16)
    masks = [np.asarray(rules.rule_group) <= g for g in range(len(rules.groups))]
    paths = {"KL path": lambda: hm.stream_metrics(seqs, ref),
             "full log-probs": lambda: hm.log_probs_batch(seqs),
             "ledger rows": lambda: hm.stream_metrics_rows(seqs, ref, masks)}
    settings = {"V + 1": V + 1, "V / 4": V // 4, "V / 2": V // 2, "0": 0}
    hm.stream_metrics(seqs[:1], ref[: len(seqs[0])])  # compile (or load the numba cache) and build base rows
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for path, f in paths.items():
            for name, dm in settings.items():
                hm.dense_min = dm
                t0 = time.perf_counter()
                f()
                times.setdefault((path, name), []).append(time.perf_counter() - t0)
    print(f"{handmodel.__file__}: {len(rules.rule_ids)} rules in {args.rules}, {n:,} tokens in {len(seqs)} sequences, "
          f"V = {V}, median of {args.repeats}")
    print(f"{'path':16s}" + "".join(f"{'dense_min = ' + k:>22s}" for k in settings))
    for path in paths:
        base = np.median(times[(path, "V + 1")])
        cells = [f"{np.median(times[(path, k)]):8.2f} s ({base / np.median(times[(path, k)]):4.2f}×)" for k in settings]
        print(f"{path:16s}" + "".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
