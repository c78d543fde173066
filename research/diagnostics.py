"""Interventions on the shipped reference that say where its behaviour lives (research/README.md, Findings).

Each row is KL(p_ref ‖ p_intervened) in nats/token over windows of valid.txt: how much of the
reference's next-token distribution the intervened part carries. An additive rule set can only match
what survives its own form, so these also bound what the rule language can reach.

    python -m research.diagnostics [--windows 64]      # ~1 minute on 2 cores

- unigram: the reference's mean next-token distribution on these windows (the ledger's yardstick);
- attention mean-ablated: every head's output replaced by its mean over all positions;
- queries frozen: each head's query replaced by its mean query at that position (attention then depends
  on the sources only: what a position table + per-source scores can express);
- MLP blind to attention: the MLP reads the token + position embedding only, not the heads' output;
- final LN scale per token: the final LayerNorm's scale (‖resid‖, a multiplicative effect no sum of
  logits can express) replaced by its mean for the current token.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from reference.oracle import Oracle
    from verify.discover.common import sample_windows

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=64, help="256-token windows of valid.txt")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "tinystories" / "valid.txt"))
    a = ap.parse_args()
    o = Oracle.load(ROOT / "reference" / "default")
    m = o.model
    X = torch.from_numpy(sample_windows(o, a.corpus, a.windows * 256).astype(np.int64)[: a.windows])

    def run(mode: str | None = None) -> torch.Tensor:
        B, T = X.shape
        x0 = m.W_E[X] + m.W_pos[:T]
        q, k, v = m.attn_qkv(m.ln1(x0))
        if mode == "qmean":
            q = q.mean(0, keepdim=True).expand_as(q)
        sc = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(m.cfg.d_head)
        pat = sc.masked_fill(~m.causal[:T, :T], float("-inf")).softmax(-1)
        ho = torch.einsum("bhqk,bkhe->bqhe", pat, v)
        ho = torch.einsum("bqhe,hed->bqhd", ho, m.W_O)
        if mode == "attn_mean":
            ho = ho.mean((0, 1), keepdim=True).expand_as(ho)
        x1 = x0 + ho.sum(2) + m.b_O
        x2 = x1 + m.mlp(x0 if mode == "mlp_blind" else x1)
        if mode == "ln_scale":
            xc = x2 - x2.mean(-1, keepdim=True)
            s = torch.sqrt(x2.var(-1, unbiased=False) + m.cfg.ln_eps).reshape(-1)
            V = m.cfg.vocab_size
            mean = torch.zeros(V).index_add(0, X.reshape(-1), s) / torch.zeros(V).index_add(0, X.reshape(-1), torch.ones_like(s)).clamp(min=1)
            return F.log_softmax((xc / mean[X][..., None] * m.ln_final.weight + m.ln_final.bias) @ m.W_U + m.b_U, -1)
        return F.log_softmax(m.unembed(x2), -1)

    with torch.inference_mode():
        ref = run()
        assert float((ref - F.log_softmax(m(X), -1)).abs().max()) < 1e-3  # run() is the model's own forward

        def kl(lp: torch.Tensor) -> float:
            return float((ref.exp() * (ref - lp)).sum(-1).mean())

        uni = kl(torch.log(ref.exp().mean((0, 1)))[None, None])
        rows = [("unigram", uni)] + [(name, kl(run(mode))) for name, mode in (
            ("attention mean-ablated", "attn_mean"), ("queries frozen (mean query)", "qmean"),
            ("MLP blind to attention", "mlp_blind"), ("final LN scale per token", "ln_scale"))]
    print(f"{len(X)} windows x {X.shape[1]} tokens of {Path(a.corpus).name}")
    print(f"{'intervention':32s} {'KL(ref‖·)':>10s} {'% of unigram KL':>16s}")
    for name, v in rows:
        print(f"{name:32s} {v:10.4f} {100 * v / uni:15.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
