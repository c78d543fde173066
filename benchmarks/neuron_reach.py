"""How much of the eval set an edited neuron can change (issue 22, item 3): why a neuron edit is a full pass.

    python -m benchmarks.neuron_reach [--rules rules] [--corpus ../shared/corpus/tinystories/valid.txt]

verify/ledger/incremental.py recomputes, after an edit, only the positions the changed rules can act on; a
neuron counts as acting everywhere, so its edit recomputes its ledger rows in full. A neuron only writes where it
is active, though, so a splice could skip the positions where it is inactive both before and after an edit.
This measures what that would leave: each shipped neuron's activation at every position of the eval set, read
from the engine (handmodel.explain.probe_amounts: one pass of a probe ruleset), and per neuron

- its *active share*: the positions where it fires (activation > explain.ACT_EPS), which such a splice would
  finish again;
- its *prefix share*: the positions up to its last active one in each sequence, whose attention a splice still
  runs (HandModel.stream_metrics_rows with `at`).

It prints their quantiles over the neurons and how many stay under incremental.MAX_SHARE, the share above which
a splice falls back to a full pass.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def shares(act: np.ndarray, offsets: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron (column of act [N, n]): its active share and its prefix share (module doc), offsets [S + 1]
    the sequences' boundaries."""
    N = len(act)
    on = act > eps
    active = on.mean(0) if N else np.zeros(act.shape[1])
    prefix = np.zeros(act.shape[1])
    for a, b in zip(offsets[:-1], offsets[1:]):
        seg = on[a:b]
        hit = seg.any(0)
        last = (b - a) - np.argmax(seg[::-1], axis=0)  # one past the last active position
        prefix += np.where(hit, last, 0)
    return active, prefix / max(N, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", type=Path, default=ROOT / "rules")
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "tinystories" / "valid.txt")
    args = ap.parse_args()
    from handmodel import load_rules
    from handmodel.explain import ACT_EPS, probe_amounts
    from handmodel.vocab import load_vocab
    from verify.ledger import data as D
    from verify.ledger.incremental import MAX_SHARE

    ckpt = D.checkpoint_info(None)
    ref = D.get_ref_cache(ckpt, D.EvalSpec(corpus=args.corpus, sampled=0, seed=0), log=print)
    rules = load_rules(args.rules, load_vocab(ckpt.path / "tokenizer.json"))
    idx = [i for i, k in enumerate(rules.rule_kinds) if k == "neuron"]
    act = probe_amounts(rules, ref.seqs, idx, np.ones(len(rules.rule_ids), np.bool_))
    active, prefix = shares(act, np.asarray(ref.offsets), ACT_EPS)
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    print(f"{len(idx)} neurons, {len(act):,} positions of {args.corpus.name}")
    print("quantiles over the neurons:  " + "  ".join(f"{int(p * 100)}%" .rjust(6) for p in q))
    print("active share (finished)      " + "  ".join(f"{x:6.1%}" for x in np.quantile(active, q)))
    print("prefix share (attention run) " + "  ".join(f"{x:6.1%}" for x in np.quantile(prefix, q)))
    print(f"neurons active on at most {MAX_SHARE:.0%} of the positions: {int((active <= MAX_SHARE).sum())} of "
          f"{len(idx)}; with a prefix share that low: {int((prefix <= MAX_SHARE).sum())}")
    for i, k in enumerate(idx[:1]):
        print(f"the first neuron ({rules.rule_ids[k]}, the one benchmarks/edit_loop.py edits): active {active[i]:.1%}, "
              f"prefix {prefix[i]:.1%}")


if __name__ == "__main__":
    main()
