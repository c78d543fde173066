"""The reference rebuilt from its own components, each written the way a rule writes it, to find how many
explicit numbers faithful rules need (issue 21: the budget curve).

logits_t ≈ c + D[tok_t] + Σ_h Σ_s a_ref,h(t,s) row_h[tok_s] + Σ_n post_ref,n(t) out_n
  D[x]      = E[x]·γ/σ̄ @ W_U                    the direct path as a bigram table (one row per token)
  row_h[x]  = vbar_h[x] W_O[h]·γ/σ̄ @ W_U         head h's mean value at source token x (head_ceiling.py)
  out_n     = W_out[n]·γ/σ̄ @ W_U                 neuron n's write per unit of activation
  c         = the mean, over training positions, of the centred reference log-probs minus the rest (a prior)
all centred over the vocabulary, σ̄ the mean LNf scale (a rule cannot read the per-position scale); a_ref and
post_ref are the reference's own attention and activations (the rules' triggers assumed perfect). Each part
is then cut to its k largest |entries| per row (D and row_h: per token row; out_n: per neuron; k < 0: every
row written through the -k shared sets that best span the unembedding, see `cut`), and the
fraction of KL explained (1 − KL / KL_unigram) on valid.txt windows is printed with the numbers that costs.
Fitted on train.txt windows only. Usage: PYTHONPATH=. python research/faithful/budget_ceiling.py [--positive] [n_train] [n_valid] [k ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from verify.claims import ref_side as R
from verify.claims.verified import valid_contexts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import SHARED, centred, head_rows, shipped, top_k, value_stats  # noqa: E402

POSITIVE = False  # --positive: keep each row's k LARGEST entries (after the median shift), not the largest |entries|


@torch.inference_mode()
def main(n_train: int = 512, n_valid: int = 64, *ks: int) -> None:
    ckpt, oracle, train = shipped(n_train)
    model, V, H = oracle.model, oracle.cfg.vocab_size, oracle.cfg.n_heads
    st = value_stats(oracle, train)
    seen, sig = st.seen, st.sigma
    g = model.ln_final.weight.double() / sig
    W_U = model.W_U.double()
    D = centred((model.W_E.double() * g) @ W_U)  # [V, V]
    D[~seen] = 0
    rows = head_rows(model, st)  # [H, V, V]
    W_out = model.W_out.double()
    W_out = W_out if W_out.shape[0] == model.cfg.d_mlp else W_out.T  # [N, D]
    out = centred((W_out * g) @ W_U)  # [N, V]

    # rank-r variants (k = -r): every part written through r shared weighted token sets, the top-r right singular
    # vectors of the centred unembedding (γ/σ̄ W_U): each row then costs r numbers, the sets r x V once
    Wc = centred(g[:, None] * W_U)  # [d_model, V]
    _, _, basis = torch.linalg.svd(Wc, full_matrices=False)  # [d_model, V], orthonormal rows

    def cut(x: torch.Tensor, k: int) -> torch.Tensor:
        if k < 0:
            B_ = basis[:-k]
            return (x @ B_.T) @ B_
        return top_k(x, k, POSITIVE)

    def parts(b, D_, rows_, out_):
        tok = b.idx
        z = D_[tok] + sum(b.pattern[:, h].double() @ rows_[h][tok] for h in range(H))
        return z + b.post.double() @ out_

    # the constant (a prior): mean over training positions of centred log p_ref − the parts, at full size
    c = torch.zeros(V, dtype=torch.float64)
    n = 0
    for s in range(0, len(train), 8):
        b = R.run_batch(model, train[s:s + 8])
        c += (centred(b.lp) - parts(b, D, rows, out)).reshape(-1, V).sum(0)
        n += b.idx.numel()
    c /= n
    ctx = valid_contexts(ckpt, SHARED / "valid.txt", n_valid)
    batches = [R.run_batch(model, ctx.windows[s:s + 8]) for s in range(0, len(ctx.windows), 8)]
    uni = torch.log(torch.cat([b.lp.double().exp().reshape(-1, V) for b in batches]).mean(0))
    n_src = int(seen.sum())
    N = out.shape[0]
    settings = [("unigram", None)] + [(f"top {k}" if k > 0 else "dense", k) for k in ks]
    print(f"σ̄ {sig:.3f}; {n_src} source tokens seen in training; {N} neurons")
    print("| entries per row | direct + heads + neurons | direct + heads | numbers (D + rows + out) |")
    for name, k in settings:
        if k is None:
            kl = sum(float((b.lp.double().exp() * (b.lp.double() - torch.log_softmax(uni, -1))).sum()) for b in batches)
            base = kl / sum(b.idx.numel() for b in batches)
            continue
        D_, rows_, out_ = cut(D, k), cut(rows, k), cut(out, k)
        kl_all = kl_heads = 0.0
        m = 0
        for b in batches:
            lp = b.lp.double()
            p = lp.exp()
            tok = b.idx
            zh = c + D_[tok] + sum(b.pattern[:, h].double() @ rows_[h][tok] for h in range(H))
            za = zh + b.post.double() @ out_
            kl_all += float((p * (lp - torch.log_softmax(za, -1))).sum())
            kl_heads += float((p * (lp - torch.log_softmax(zh, -1))).sum())
            m += tok.numel()
        kk = V if k == 0 else abs(k)
        numbers = n_src * kk + H * n_src * kk + N * kk + (-k * V if k < 0 else 0)
        name = f"rank {-k} (shared sets)" if k < 0 else name
        print(f"| {name} | {1 - kl_all / m / base:+.1%} | {1 - kl_heads / m / base:+.1%} | {numbers:,} |", flush=True)


if __name__ == "__main__":
    POSITIVE = "--positive" in sys.argv
    main(*(int(a) for a in sys.argv[1:] if a != "--positive"))
