"""How big is what the current token writes at its own position, and does the hand model's bigram total match it?

Two definitions of "the current token's component" at position t (reference log-probs at t, mean-ablated):
- narrow (token-alone path, the shipped check): E[tok] -> Ē in the residual the direct path and the MLP read;
  every head's output held at its clean value.
- wide (everything the token writes at its own position): the same, and in every head the value at key t
  for query t recomputed from Ē + P[t] (attention patterns held at their clean values).
Per position: rms of the centred write, and Pearson r over the vocabulary of the centred write and the hand
model's summed bigram-row logits at t (class + token rows), and of the write and the oracle-bigram shape.
Usage: python research/bigram_component/compare.py [n_windows]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from handmodel.compiled import load_rules
from verify.claims import hand_side as H
from verify.claims import ref_side as R
from verify.claims.verified import valid_contexts
from verify.ledger.data import checkpoint_info, load_oracle


@torch.inference_mode()
def own_position_ablated(model, b: R.RefBatch, means: R.RefMeans) -> torch.Tensor:
    """[B, T, V] log-probs with everything the current token writes at its own position mean-ablated: the
    token-alone path (ref_side.token_alone_ablated) and, in every head, the value the query at t reads from key
    t, recomputed from Ē + P[t] instead of E[tok] + P[t] (attention patterns held at their clean values).
    x1' = resid_mid − E[tok] + Ē + Σ_h a_h(t, t)·(v'_h,t − v_h,t)·W_O[h]; the MLP recomputed."""
    x0 = means.embed + model.W_pos[: b.idx.shape[1]]  # [T, D] the average token at each position
    _, _, v_bar = model.attn_qkv(model.ln1(x0))  # [T, H, Dh]
    self_att = torch.diagonal(b.pattern, dim1=-2, dim2=-1)  # [B, H, T] a_h(t, t)
    dv = v_bar[None] - b.v  # [B, T, H, Dh]
    d_attn = torch.einsum("bht,bthe,hed->btd", self_att, dv, model.W_O)
    x1 = b.resid_mid + (means.embed - model.W_E[b.idx]) + d_attn
    return R.lp_of_resid(model, x1 + model.mlp(x1))


def main(n_windows: int = 16) -> None:
    ckpt = checkpoint_info(None)
    oracle = load_oracle(ckpt)
    model = oracle.model
    rules = load_rules(Path("rules"), oracle.vocab)
    vec = H.RuleVectors(rules)
    bigrams = [r for r in rules.rules if r.kind == "bigram"]
    ctx = valid_contexts(ckpt, Path("../shared/corpus/tinystories/valid.txt"), n_windows)
    wins = ctx.windows
    torch.set_num_threads(1)
    means = R.context_means(model, [wins[i:i + 8] for i in range(0, len(wins), 8)])
    stats = {k: [] for k in ("rms_narrow", "rms_wide", "r_narrow", "r_wide", "rms_hand")}
    writes = {"narrow": [], "wide": []}  # per window [T, V] float32 centred writes (the table ceiling below)
    with torch.inference_mode():
        for s in range(0, len(wins), 8):
            arr = wins[s:s + 8]
            b = R.run_batch(model, arr)
            narrow = R.token_alone_ablated(model, b, means)
            wide = own_position_ablated(model, b, means)
            for j, seq in enumerate(arr):
                ws = H.window_state(vec, seq)
                T = len(seq)
                hand = np.zeros((T, vec.V))
                for r in bigrams:
                    pos = np.flatnonzero(H.acts(vec, r, ws))
                    if len(pos):
                        hand[pos] += H.contribution(vec, r, ws, pos)
                hand -= hand.mean(1, keepdims=True)
                lp = b.lp[j].double().numpy()
                for name, abl in (("narrow", narrow), ("wide", wide)):
                    w = lp - abl[j].double().numpy()
                    w -= w.mean(1, keepdims=True)
                    stats[f"rms_{name}"].append(np.sqrt((w ** 2).mean(1)))
                    writes[name].append(w.astype(np.float32))
                    num = (w * hand).sum(1)
                    den = np.sqrt((w ** 2).sum(1) * (hand ** 2).sum(1))
                    stats[f"r_{name}"].append(num / np.maximum(den, 1e-12))
                stats["rms_hand"].append(np.sqrt((hand ** 2).mean(1)))
    for k, v in stats.items():
        v = np.concatenate(v)
        print(f"{k:12s} median {np.median(v):.3f}  mean {v.mean():.3f}  p10 {np.quantile(v, .1):.3f}  p90 {np.quantile(v, .9):.3f}")
    # The ceiling of a bigram table: the per-token mean write fitted on the even windows, pooled Pearson r
    # over (position, token) on the odd windows' positions whose token the even windows saw.
    for name, ws_ in writes.items():
        V = ws_[0].shape[1]
        tot, cnt = np.zeros((V, V)), np.zeros(V)
        for w, seq in zip(ws_[0::2], wins[0::2]):
            np.add.at(tot, seq, w)
            np.add.at(cnt, seq, 1)
        xs, ys = [], []
        for w, seq in zip(ws_[1::2], wins[1::2]):
            ok = cnt[seq] > 0
            xs.append((tot[seq[ok]] / cnt[seq[ok], None]).ravel())
            ys.append(w[ok].ravel())
        x, y = np.concatenate(xs), np.concatenate(ys)
        print(f"table ceiling ({name}): pooled r {np.corrcoef(x, y)[0, 1]:.3f} on {int(sum(len(a) for a in xs) / V)} positions")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
