"""A gated neuron edit against a full pass, on the real eval set (verify/ledger/incremental.find_gate).

    python -m benchmarks.gate_exact [--rule neuron.576] [--field threshold|now|present|attend|next]

Copies the rules to a temporary folder and runs the all-rules ledger's row cache the way `verify` does
(core.cached_metrics with lineage), then edits one number of the rule twice: the first edit's rows are computed
by full passes (the gate switched off), so the second edit's gated rows stand on rows of one pass grouping.
The second edit's rows are then compared with a full pass over the same rows: kl, ce, agree and dense must be
bit-identical. Prints the share of positions kept and both times. Needs verify's reference cache of valid.txt
(a first `handmodel verify --corpus ../shared/corpus/tinystories/valid.txt` builds it).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", type=Path, default=ROOT / "rules")
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "tinystories" / "valid.txt")
    ap.add_argument("--rule", default="neuron.250")
    ap.add_argument("--field", default="threshold", choices=["threshold", "now", "present", "attend", "next"])
    args = ap.parse_args()
    from benchmarks.edit_loop import edit_field
    from handmodel import HandModel, load_rules
    from handmodel.vocab import load_vocab
    from verify.ledger import core as C
    from verify.ledger import data as D
    from verify.ledger import incremental as I

    ckpt = D.checkpoint_info(None)
    ref = D.get_ref_cache(ckpt, D.EvalSpec(corpus=args.corpus, sampled=0, seed=0), log=print)
    vocab = load_vocab(ckpt.path / "tokenizer.json")
    find_gate = I.find_gate

    def ledger(d: Path, gate: bool):
        I.find_gate = find_gate if gate else (lambda *a, **k: None)
        rules = load_rules(d, vocab)
        hm = HandModel(rules)
        masks = C.group_masks(rules)
        t = time.perf_counter()
        got = C.cached_metrics(hm, rules, ref, [m for _, m in masks], True, labels=C.lineage_labels(rules, masks))
        return got, time.perf_counter() - t, hm, [m for _, m in masks]

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "rules"
        shutil.copytree(args.rules, d)
        f = next(p for p in sorted(d.glob("*.toml")) if f'id = "{args.rule}"' in p.read_text())
        ledger(d, gate=True)
        rng = np.random.default_rng()  # new numbers each run, so no row comes from the cache
        print(f"{args.rule}.{args.field}:", edit_field(f, args.rule, args.field, float(rng.uniform(0.001, 0.002))))
        _, t1, _, _ = ledger(d, gate=False)
        print(f"{args.rule}.{args.field}:", edit_field(f, args.rule, args.field, float(rng.uniform(0.001, 0.002))))
        got, t2, hm, masks = ledger(d, gate=True)
        I.find_gate = find_gate
    rows = [i for i, m in enumerate(got) if "kept" in m]
    t = time.perf_counter()
    full = hm.stream_metrics_rows(ref.seqs, ref.logp, [masks[i] for i in rows], ref_key=ref.content_key)
    t3 = time.perf_counter() - t
    bad = [(i, k) for i, b in zip(rows, full) for k in ("kl", "ce", "agree", "dense")
           if not np.array_equal(np.asarray(got[i][k]), np.asarray(b[k]), equal_nan=True)]
    print(f"rows recomputed: {rows}; positions kept: {np.mean(got[rows[0]]['kept']):.1%}" if rows else "no rows recomputed")
    print(f"ledger after the first edit (full passes) {t1:.2f} s, after the second (gated) {t2:.2f} s; "
          f"a full pass of the same rows {t3:.2f} s")
    print("mismatches: " + (", ".join(f"row {i} {k}" for i, k in bad) if bad else "none (bit-identical)"))
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
