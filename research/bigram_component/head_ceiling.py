"""How much KL do faithful head rows carry, given the reference's own attention? (issue 21: where the KL lives)

On training windows: the narrow token-alone table (ceiling.py) and, per head h and source token x, the head's
mean value vbar_h[x] (the value at positions holding x, through LN1 at that position). On valid.txt windows,
fractions of KL explained (1 - KL / KL_unigram) of
  prior + narrow                                  (faithful bigram rows alone)
  prior + narrow + sum_h sum_s a_ref(t,s) row_h[tok_s]   (+ per-source-token head rows, reference attention)
  the same with each row cut to its top-k tokens by |logit - the row's median| (the budget a rule file can afford)
  the same with each head's rows [sources x V] replaced by their best rank-r approximation (SVD): r shared
    weighted token sets per head, each source token a weight on each (r x (sources + V) numbers per head)
  the dense rows with the shipped hand heads' attention in place of the reference's (rules/, by ref_head)
where row_h[x] = vbar_h[x] W_O[h] * gamma / sigma_bar @ W_U, centred over the vocabulary (sigma_bar: the mean
LNf scale on the training positions: a rule cannot read the per-position scale). The neurons' interaction part
is what is left: the reference itself is 0 KL.
Usage: PYTHONPATH=. python research/bigram_component/head_ceiling.py [n_train] [n_valid] [k ...] (k < 0: rank -k)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from verify.claims import ref_side as R
from verify.claims.verified import valid_contexts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faithful"))
from tables import SHARED, centred, head_rows, shipped, top_k, value_stats  # noqa: E402


@torch.inference_mode()
def main(n_train: int = 512, n_valid: int = 64, *ks: int) -> None:
    ckpt, oracle, train = shipped(n_train)
    model, V, H = oracle.model, oracle.cfg.vocab_size, oracle.cfg.n_heads
    means = R.context_means(model, [train[i:i + 8] for i in range(0, len(train), 8)])
    narrow = torch.zeros(V, V, dtype=torch.float64)
    prior = torch.zeros(V, dtype=torch.float64)

    def each(b):  # the prior (mean centred log p_ref) and the token-alone write per token, in the same pass
        lp = centred(b.lp).reshape(-1, V)
        prior.add_(lp.sum(0))
        narrow.index_add_(0, b.idx.reshape(-1), lp - centred(R.token_alone_ablated(model, b, means)).reshape(-1, V))

    st = value_stats(oracle, train, each)
    cnt, seen = st.count, st.seen
    prior /= cnt.sum()
    narrow[seen] /= cnt[seen, None]
    rows = head_rows(model, st)  # [H, V, V]
    variants = {"unigram": None, "prior": None, "prior + narrow": None, "+ head rows (dense)": rows}
    for k in ks:
        if k < 0:  # rank -k
            r = -k
            low = torch.zeros_like(rows)
            for h in range(H):
                U_, S_, Vt = torch.linalg.svd(rows[h][seen], full_matrices=False)
                low[h][seen] = (U_[:, :r] * S_[:r]) @ Vt[:r]
            variants[f"+ head rows (rank {r})"] = low
            # weighted by how often each source token occurs (the KL weighs a row by how often it is read)
            w = cnt[seen].sqrt()[:, None]
            low = torch.zeros_like(rows)
            for h in range(H):
                U_, S_, Vt = torch.linalg.svd(rows[h][seen] * w, full_matrices=False)
                low[h][seen] = (U_[:, :r] * S_[:r]) @ Vt[:r] / w
            variants[f"+ head rows (rank {r}, by frequency)"] = low
        else:
            variants[f"+ head rows (top {k})"] = top_k(rows, k)
    variants["+ dense rows, hand attention"] = rows
    from handmodel.compiled import load_rules
    from verify.claims import hand_side as HS
    hand_rules = load_rules(Path(__file__).resolve().parents[2] / "rules", oracle.vocab)
    vec = HS.RuleVectors(hand_rules)
    import re
    hand_of_ref = {int(m.group(1)): i for i, r in enumerate(vec.heads) if (m := re.fullmatch(r"head(\d+)", r.id))}
    print("hand heads standing for reference heads:", hand_of_ref)
    ctx = valid_contexts(ckpt, SHARED / "valid.txt", n_valid)
    batches = [R.run_batch(model, ctx.windows[s:s + 8]) for s in range(0, len(ctx.windows), 8)]
    uni = torch.log(torch.cat([b.lp.double().exp().reshape(-1, V) for b in batches]).mean(0))
    kl = dict.fromkeys(variants, 0.0)
    n = 0
    for b in batches:
        lp = b.lp.double()
        p = lp.exp()
        tok = b.idx
        for name, rw in variants.items():
            if name == "unigram":
                logits = uni.expand_as(lp)
            else:
                logits = prior + (narrow[tok] if name != "prior" else 0.0)
                if rw is not None:
                    pat = b.pattern.double()  # [B, H, T, T]
                    if "hand attention" in name:
                        pat = pat.clone()
                        for j, seq in enumerate(b.idx.numpy()):
                            ws = HS.window_state(vec, seq)
                            for h, i in hand_of_ref.items():
                                pat[j, h] = torch.from_numpy(np.asarray(ws.att[i], np.float64))
                    for h in range(H):
                        logits = logits + pat[:, h] @ rw[h][tok]  # [B, T, V]
            lq = torch.log_softmax(logits, -1)
            kl[name] += float((p * (lp - lq)).sum())
        n += tok.numel()
    base = kl["unigram"] / n
    for name, v in kl.items():
        print(f"{name:26s} KL {v / n:.4f}  explained {1 - v / n / base:+.1%}")
    nz = {k: int(seen.sum()) * H * k if k > 0 else H * -k * (int(seen.sum()) + V) for k in ks}
    print("numbers (head rows, top-k, seen source tokens):", nz)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
