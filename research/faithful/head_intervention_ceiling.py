"""What can pass a [[head]]'s intervention? Concordance of the reference head's mean-ablation with writes a head
rule could make (issue 21).

The check (verify/claims/measure.py `_head`): dh = the hand head's write (centred, minus its mean over the
contexts) taken out of p_ref; dr = log p_ref with the reference head mean-ablated (the MLP recomputed) − log p_ref;
concordance 2Σxy/(Σx²+Σy²) over sampled positions and the tokens the head's readers write (here: every token,
as dense rows write every token). Candidate writes, each through LNf and W_U, centred:
  exact direct   the head's own output head_out_h,t at t's LNf scale (what the head writes with the MLP held)
  dense rows     sum_s a_ref(t,s) row_h[tok_s] (per-source-token rows at the mean scale; head_ceiling.py)
  hand attention the same rows under the shipped hand head's attention
The gap between "exact direct" and 1 is what the head moves through the MLP: a head rule whose write is only
its rows cannot close it; the neurons that read the head (their `attend` terms) must.
Usage: PYTHONPATH=. python research/faithful/head_intervention_ceiling.py [n_train] [n_valid]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch

from handmodel.compiled import load_rules
from verify.claims import hand_side as HS
from verify.claims import ref_side as R
from verify.claims.component import _dlogp
from verify.claims.verified import valid_contexts

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import SHARED, T, centred, head_rows, shipped, value_stats  # noqa: E402


@torch.inference_mode()
def main(n_train: int = 256, n_valid: int = 32, per_window: int = 8) -> None:
    ckpt, oracle, train = shipped(n_train)
    model, V, H = oracle.model, oracle.cfg.vocab_size, oracle.cfg.n_heads
    st = value_stats(oracle, train)
    gamma, W_U = model.ln_final.weight.double(), model.W_U.double()
    rows = head_rows(model, st)
    rules = load_rules(ROOT / "rules", oracle.vocab)
    vec = HS.RuleVectors(rules)
    hand_of_ref = {int(m.group(1)): i for i, r in enumerate(vec.heads) if (m := re.fullmatch(r"head(\d+)", r.id))}
    ctx = valid_contexts(ckpt, SHARED / "valid.txt", n_valid)
    batches = [ctx.windows[s:s + 8] for s in range(0, len(ctx.windows), 8)]
    means = R.context_means(model, batches)
    names = ("exact direct", "dense rows", "hand attention")
    writes = {(h, n): [] for h in range(H) for n in names}
    drs = {h: [] for h in range(H)}
    lps = []
    rng = np.random.default_rng(0)
    for arr in batches:
        b = R.run_batch(model, arr)
        B = len(arr)
        ts = np.stack([np.sort(rng.choice(np.arange(1, T), per_window, replace=False)) for _ in range(B)])
        bi = np.repeat(np.arange(B), per_window)
        ti = ts.ravel()
        lps.append(b.lp.double()[bi, ti].numpy())
        hand_att = {}
        for j, seq in enumerate(arr):
            ws = HS.window_state(vec, seq)
            for h, i in hand_of_ref.items():
                hand_att[(j, h)] = torch.from_numpy(np.asarray(ws.att[i], np.float64))
        for h in range(H):
            drs[h].append((R.head_ablated(model, b, means, h).double() - b.lp.double())[bi, ti].numpy())
            ex = centred((b.head_out[:, :, h].double() * gamma / b.scale.double()) @ W_U)  # [B, T, V]
            writes[(h, "exact direct")].append(ex)
            rw = rows[h][b.idx]  # [B, T, V] the row of each position's token
            writes[(h, "dense rows")].append(b.pattern[:, h].double() @ rw)
            ha = torch.stack([hand_att[(j, h)] if (j, h) in hand_att else torch.zeros(T, T, dtype=torch.float64) for j in range(B)])
            writes[(h, "hand attention")].append(ha @ rw)
    lp = np.concatenate(lps)
    print(f"{len(lp)} positions, every token; concordance of dh (the write, mean-ablated, out of p_ref) with dr")
    for h in range(H):
        dr = np.concatenate(drs[h])
        cells = []
        for n in names:
            W = torch.cat(writes[(h, n)])  # [B', T, V]
            mean = W.reshape(-1, V).mean(0)
            sel = []  # the same positions as drawn above (same seed, same order)
            off = 0
            rng2 = np.random.default_rng(0)
            for arr in batches:
                B = len(arr)
                ts = np.stack([np.sort(rng2.choice(np.arange(1, T), per_window, replace=False)) for _ in range(B)])
                sel.append((off + np.repeat(np.arange(B), per_window), ts.ravel()))
                off += B
            bi = np.concatenate([s[0] for s in sel])
            ti = np.concatenate([s[1] for s in sel])
            d = (W[bi, ti] - mean).numpy()
            dh = _dlogp(lp, d)
            conc = 2 * (dh * dr).sum() / ((dh ** 2).sum() + (dr ** 2).sum())
            r = np.corrcoef(dh.ravel(), dr.ravel())[0, 1]
            cells.append(f"{n}: conc {conc:.3f} r {r:.3f} rms ratio {np.sqrt((dh ** 2).mean() / (dr ** 2).mean()):.2f}")
        print(f"head {h} (hand head {hand_of_ref.get(h)}): " + " | ".join(cells))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
