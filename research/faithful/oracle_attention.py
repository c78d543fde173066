"""Why do head_out rows fail their intervention? Attention, row size, or the base distribution? (issue 21)

For every [[head_out]] rule with a `next` row, at the positions its intervention check reads (the current-token
condition holds and the hand head puts ≥ 0.05 attention on the sources; up to 4 per window), compare the
reference's Δlog p when the head's values at the source positions are mean-ablated (ref_side.source_path_ablated:
the check's own reference side) with the Δlog p of taking the rule's write d out of a distribution:
- base: the hand model's log-probs (the check until this stop) or the reference's (the check now);
- attention: d as the hand model computes it (hand attention mass on the sources × row), or the same row times
  the REFERENCE head's attention mass on the sources (what a faithful [[head]] would give);
- best size: the row rescaled by the one factor per rule that maximises the concordance (= the cosine).
Concordance 2Σxy/(Σx²+Σy²) pooled over the rule's positions, on the tokens the row writes (the check's statistic;
the rule's mean contribution is not subtracted here, so the numbers are close to, not equal to, the check's).
Usage: python research/faithful/oracle_attention.py [rules_dir] [n_windows]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from handmodel.compiled import load_rules
from verify.claims import hand_side as H
from verify.claims import ref_side as R
from verify.claims.component import MIN_MASS, _dlogp, targets
from verify.claims.records import read_checks
from verify.claims.verified import valid_contexts
from verify.ledger.data import checkpoint_info, load_oracle
from handmodel.engine import HandModel


def main(rules_dir: str = "rules", n_windows: int = 24) -> None:
    ckpt = checkpoint_info(None)
    oracle = load_oracle(ckpt)
    model = oracle.model
    rules = load_rules(Path(rules_dir), oracle.vocab)
    checks = read_checks(Path(rules_dir))
    vec = H.RuleVectors(rules)
    tg = [t for t in targets(oracle, rules, checks) if t.rule.kind == "head_out" and t.rule.next and t.ref is not None]
    wins = valid_contexts(ckpt, Path("../shared/corpus/tinystories/valid.txt"), n_windows).windows
    hm = HandModel(rules)
    torch.set_num_threads(1)
    means = R.context_means(model, [wins[i:i + 8] for i in range(0, len(wins), 8)])
    rng = np.random.default_rng(0)
    ways = [(base, att) for base in ("hand", "ref") for att in ("hand", "ref")]
    sums = {t.index: np.zeros((len(ways), 3)) for t in tg}  # per way: Σxy, Σx², Σy²
    with torch.inference_mode():
        for s in range(0, len(wins), 8):
            arr = wins[s:s + 8]
            b = R.run_batch(model, arr)
            lp_ref = b.lp.numpy()
            hand = np.stack(hm.log_probs_batch(list(arr)))
            for j, seq in enumerate(arr):
                ws = H.window_state(vec, seq)
                for t in tg:
                    r = t.rule
                    pos = np.flatnonzero(H.acts(vec, r, ws) & (H.source_mass(vec, r, ws) >= MIN_MASS))
                    if not len(pos):
                        continue
                    ts = pos if len(pos) <= 4 else np.sort(rng.choice(pos, 4, replace=False))
                    written = vec.written(r.next)
                    src = torch.from_numpy(vec.member(r.src)[seq])
                    m_hand = H.source_mass(vec, r, ws)[ts]
                    m_ref = (b.pattern[j, t.ref][torch.from_numpy(ts)] * src.float()).sum(1).numpy()
                    d = H.contribution(vec, r, ws, ts)  # m_hand × row (+ nothing else for a next-only row)
                    d_ref = d * (m_ref / np.maximum(m_hand, 1e-12))[:, None]
                    abl = R.source_path_ablated(model, b, means, t.ref, src[None].expand(b.idx.shape[0], -1),
                                                np.full(len(ts), j), ts).numpy()
                    y = (abl - lp_ref[j, ts])[:, written].astype(np.float64)
                    for k, (base, att) in enumerate(ways):
                        x = _dlogp((hand if base == "hand" else lp_ref)[j, ts], d if att == "hand" else d_ref)[:, written]
                        sums[t.index][k] += [(x * y).sum(), (x * x).sum(), (y * y).sum()]
    conc = lambda a: 2 * a[0] / max(a[1] + a[2], 1e-30)
    cos = lambda a: a[0] / max(np.sqrt(a[1] * a[2]), 1e-30)
    ok = [v for v in sums.values() if v[0][2] > 0]
    print(f"{len(ok)} head_out rules with positions ({len(tg)} checked), {len(wins)} windows of valid.txt, rules {rules_dir}")
    for k, (base, att) in enumerate(ways):
        for name, f in (("concordance", conc), ("best size: cosine", cos)):
            v = np.array([f(x[k]) for x in ok])
            print(f"base {base:4s} attention {att:4s} {name:18s} median {np.median(v):.3f}  quartiles "
                  f"{np.quantile(v, .25):.3f}-{np.quantile(v, .75):.3f}  ≥ 0.5: {(v >= 0.5).sum()}")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["rules"]), *(int(x) for x in sys.argv[2:3]))
