"""Would faithful attention make the head_out rows pass their intervention? (issue 21)

For every [[head_out]] rule with a `next` row, at the positions its intervention check reads (the current-token
condition holds and the hand head puts ≥ 0.05 attention on the sources; up to 4 per window), compare the
reference's Δlog p when the head's values at the source positions are mean-ablated (ref_side.source_path_ablated:
the check's own reference side) with the hand model's Δlog p when the rule is switched off, computed three ways:
- hand: the rule's contribution as the hand model computes it (hand attention mass on the sources × row);
- ref-attn: the same row times the REFERENCE head's attention mass on the sources at that position;
- ref-attn, best size: ref-attn with the row rescaled by the one factor per rule that maximises the concordance
  (then concordance = cosine: only the row's direction is judged).
Concordance 2Σxy/(Σx²+Σy²) pooled over the rule's positions, on the tokens the row writes (the check's statistic;
the rule's mean contribution is not subtracted here, so the numbers are close to, not equal to, the check's);
then the same with both Δlog p centred over the vocabulary first (which removes each side's log Z shift: a
constant per position that the whole distribution, not the rule, sets).
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
    sums = {t.index: np.zeros((4, 3)) for t in tg}  # per way: Σxy, Σx², Σy² (hand, ref-attn; then both centred)
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
                    yy = (abl - lp_ref[j, ts]).astype(np.float64)
                    for k, dd in enumerate((d, d_ref)):
                        xx = _dlogp(hand[j, ts], dd)
                        for c, (x, y) in enumerate(((xx, yy), (xx - xx.mean(1, keepdims=True), yy - yy.mean(1, keepdims=True)))):
                            x, y = x[:, written], y[:, written]
                            sums[t.index][2 * c + k] += [(x * y).sum(), (x * x).sum(), (y * y).sum()]
    conc = lambda a: 2 * a[0] / max(a[1] + a[2], 1e-30)
    cos = lambda a: a[0] / max(np.sqrt(a[1] * a[2]), 1e-30)
    rows = [(conc(v[0]), conc(v[1]), cos(v[1]), np.sqrt(v[1][1] / max(v[1][2], 1e-30)), conc(v[2]), conc(v[3]), cos(v[3]))
            for v in sums.values() if v[0][2] > 0]
    a = np.array(rows)
    print(f"{len(a)} head_out rules with positions ({len(tg)} checked), {len(wins)} windows of valid.txt, rules {rules_dir}")
    for name, col in (("hand attention: concordance", 0), ("reference attention: concordance", 1),
                      ("reference attention, best size: cosine", 2), ("reference attention: |hand Δ| / |ref Δ|", 3),
                      ("centred over V, hand attention: concordance", 4), ("centred, reference attention: concordance", 5),
                      ("centred, reference attention, best size: cosine", 6)):
        v = a[:, col]
        print(f"{name:42s} median {np.median(v):.3f}  quartiles {np.quantile(v, .25):.3f}-{np.quantile(v, .75):.3f}  ≥0.5: {(v >= 0.5).sum()}")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["rules"]), *(int(x) for x in sys.argv[2:3]))
