"""What can a faithful bigram table explain? The ceiling of rows that state what the current token writes.

Fits, on training windows only, a per-token table of each definition of the current token's write (the
centred difference of the reference's log-probs with that path mean-ablated; see compare.py):
  narrow = the token-alone path (direct + MLP, heads held: the bigram check's component);
  wide   = narrow + each head's value at its own position (patterns held).
Then, on valid.txt windows, KL(p_ref || softmax(prior + table[token])) against the prior alone and the
unigram (the ledger's baseline: the reference's average next-token distribution on the same windows),
and the oracle bigram (the mean centred log p_ref after each token, fitted on the same training windows),
as fractions of KL explained = 1 - KL / KL_unigram.
Usage: python research/bigram_component/ceiling.py [n_train_windows] [n_valid_windows]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from verify.claims import ref_side as R
from verify.claims.verified import valid_contexts

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faithful"))
from compare import own_position_ablated  # noqa: E402
from tables import SHARED, centred, shipped  # noqa: E402


@torch.inference_mode()
def main(n_train: int = 512, n_valid: int = 64) -> None:
    ckpt, oracle, train = shipped(n_train)
    model, V = oracle.model, oracle.cfg.vocab_size
    means = R.context_means(model, [train[i:i + 8] for i in range(0, len(train), 8)])
    tabs = {k: np.zeros((V, V)) for k in ("narrow", "wide", "oracle")}
    cnt = np.zeros(V)
    prior = np.zeros(V)
    for s in range(0, len(train), 8):
        arr = train[s:s + 8]
        b = R.run_batch(model, arr)
        lp = centred(b.lp).numpy()
        tok = arr.ravel()
        np.add.at(cnt, tok, 1)
        prior += lp.reshape(-1, V).sum(0)
        np.add.at(tabs["oracle"], tok, lp.reshape(-1, V))
        for name, abl in (("narrow", R.token_alone_ablated(model, b, means)), ("wide", own_position_ablated(model, b, means))):
            np.add.at(tabs[name], tok, (lp - centred(abl).numpy()).reshape(-1, V))
    prior /= cnt.sum()
    seen = cnt > 0
    for k in tabs:
        tabs[k][seen] /= cnt[seen, None]
    tabs["oracle"][seen] -= prior  # the oracle bigram as prior + row
    print(f"fitted on {int(cnt.sum()):,} training positions, {int(seen.sum())} distinct tokens")
    ctx = valid_contexts(ckpt, SHARED / "valid.txt", n_valid)
    kl = {k: 0.0 for k in ("unigram", "prior", "narrow", "wide", "oracle")}
    n = 0
    lps = []
    for s in range(0, len(ctx.windows), 8):
        arr = ctx.windows[s:s + 8]
        lps.append((arr.ravel(), R.run_batch(model, arr).lp.double().reshape(-1, V).numpy()))
    uni = np.log(np.concatenate([np.exp(lp) for _, lp in lps]).mean(0))
    for tok, lp in lps:
        p = np.exp(lp)
        for name in kl:
            logits = uni if name == "unigram" else prior + (tabs[name][tok] if name != "prior" else 0.0)
            logits = np.broadcast_to(logits, lp.shape)
            lq = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            kl[name] += float((p * (lp - lq)).sum())
        n += len(tok)
    base = kl["unigram"] / n
    for name, v in kl.items():
        print(f"{name:8s} KL {v / n:.4f}  explained {1 - v / n / base:+.1%}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
