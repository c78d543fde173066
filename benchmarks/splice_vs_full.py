"""Incremental ledger rows against a full pass, in one process and the same minutes.

    python -m benchmarks.splice_vs_full [--corpus ../shared/corpus/tinystories/valid.txt] [--rules rules]

For each edit (one number; each on top of the last, in a temporary copy of the rules): the ledger rows it
leaves missing, computed by one full engine pass over the eval set (stream_metrics_rows over the missing masks:
what `verify` did before) and by verify/ledger/core.cached_metrics with lineage (spliced), with wall and CPU
seconds and the largest difference between the two.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.edit_loop import edit_number

EDITS = [("30_bigram_tokens.toml", "after.dog"), ("30_bigram_tokens.toml", "after.their"), ("41_head1.toml", "head1.be")]


def main() -> None:
    from handmodel import HandModel, load_rules
    from handmodel.vocab import load_vocab
    from verify.ledger import core as L
    from verify.ledger import data as D

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/corpus/tinystories/valid.txt")
    ap.add_argument("--rules", default="rules")
    a = ap.parse_args()
    ckpt = D.checkpoint_info(None)
    vocab = load_vocab(ckpt.path / "tokenizer.json")
    ref = D.get_ref_cache(ckpt, D.EvalSpec(corpus=Path(a.corpus), sampled=0, seed=0), log=print)
    tmp = Path(tempfile.mkdtemp(prefix="splice"))
    shutil.copytree(a.rules, tmp / "rules")
    for f, rid in EDITS:
        rules = load_rules(tmp / "rules", vocab)
        labels = ["all:" + label for label, _ in L.group_masks(rules)]
        L.cached_metrics(HandModel(rules), rules, ref, [m for _, m in L.group_masks(rules)], labels=labels)  # the base
        print(edit_number(tmp / "rules" / f, rid, 0.1 + random.SystemRandom().random() / 10))
        rules = load_rules(tmp / "rules", vocab)
        ms = [m for _, m in L.group_masks(rules)]
        todo = [i for i, k in enumerate(L.row_keys(rules, ms, ref)) if L._load_row(ref, k) is None]
        hm = HandModel(rules)
        load0, c0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
        full = hm.stream_metrics_rows(ref.seqs, ref.logp, [ms[i] for i in todo])
        c1, t1 = time.process_time(), time.perf_counter()
        got = L.cached_metrics(hm, rules, ref, ms, labels=labels)
        c2, t2 = time.process_time(), time.perf_counter()
        pairs = [(got[i], full[j]) for j, i in enumerate(todo)]
        diff = {k: max(float(np.nanmax(np.abs(g[k].astype(float) - w[k].astype(float)))) for g, w in pairs)
                for k in L.ROW_FIELDS}
        print(f"{rid}: {len(todo)} rows; full pass {t1 - t0:.1f} s wall {c1 - c0:.1f} s cpu; spliced {t2 - t1:.1f} s "
              f"wall {c2 - c1:.1f} s cpu; max abs. difference {diff}; load {load0:.2f} -> {os.getloadavg()[0]:.2f}",
              flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
