"""A tiny reference with large, known mechanisms, and rules derived from its weights (the power tests of
the component checks, tests/test_claims_power.py).

The position embedding is zero, so every head's attention score is a function of the (current, source)
token pair alone: a [[head]] whose score table lists every pair reproduces the head exactly. Attention
is sharp (W_Q, W_K scaled up) so the four heads attend differently; the attention write is small
(W_O scaled down) so the MLP and the next-token distribution depend mostly on the current token; b_in
is negative so neurons are sparse; W_U is tied to W_E (E·E is largest on the diagonal), and head 3's
OV is set to the identity so it copies.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

N_CTX = 32


def build_reference(out: Path, stories: list[str]) -> Path:
    import torch

    from reference.checkpoint import save_checkpoint
    from reference.model import ModelConfig, OneLayerTransformer
    from reference.tokenizer import train_tokenizer

    tok = train_tokenizer(stories, vocab_size=300)
    torch.manual_seed(0)
    m = OneLayerTransformer(ModelConfig(vocab_size=tok.get_vocab_size(), n_ctx=N_CTX, d_model=64, n_heads=4, d_mlp=32))
    with torch.no_grad():
        m.W_E.normal_(0, 1.0)
        m.W_E[:, :16] *= 4.0 / m.W_E[:, :16].norm(dim=1, keepdim=True)  # head 3 copies every token equally strongly
        m.W_pos.zero_()
        m.W_Q.mul_(4.0)
        m.W_K.mul_(4.0)
        m.W_O.mul_(0.3)
        m.W_V[3] = torch.eye(64)[:, :16]  # head 3 copies: value = its first 16 dims, written back in place
        m.W_O[3] = torch.eye(64)[:16] * 0.3
        m.b_in.fill_(-0.6)
        m.W_U.copy_(m.W_E.T * 1.5)
    save_checkpoint(m, out, tok.to_str(), {"note": "tiny reference with planted mechanisms (claims power tests)"})
    return out


def _s(tok: str) -> str:
    return json.dumps("@" + tok if tok.startswith("@") else tok, ensure_ascii=True)


def _table(vocab, vals: dict[int, float]) -> str:
    return "{ " + ", ".join(f"{_s(vocab[v])} = {w:.4f}" for v, w in vals.items()) + " }"


def _top(vec: np.ndarray, k: int) -> dict[int, float]:
    idx = np.argsort(-np.abs(vec))[:k]
    return {int(v): float(vec[v]) for v in idx}


def derive(oracle, windows: np.ndarray, n_src: int = 10, n_rows: int = 20, top: int = 12):
    """(true rule text, wrong rule text): the prior, heads, head_outs, neurons and bigram rows read off the
    weights (a bigram row: the top of its token's token-alone write, docs/claims.md).
    The true set has a head_out row for every source token of the contexts (so switching a [[head]] off
    removes all of its write); the wrong set has the first n_src rows, each on the next source token."""
    import torch

    m = oracle.model
    vocab = oracle.vocab
    V, Hn, N = oracle.cfg.vocab_size, oracle.cfg.n_heads, oracle.cfg.d_mlp
    used, counts = np.unique(windows, return_counts=True)
    freq = used[np.argsort(-counts)]
    with torch.inference_mode():
        x = m.ln1(m.W_E)
        q, k, v = m.attn_qkv(x)  # [V, H, Dh]
        cache = oracle.run_with_cache(windows)
        sigma = float(cache["ln_final.scale"].mean())
        pre = m.mlp_pre(m.ln2(m.W_E)).numpy()  # [V, N] the token's own pre-activation (attention left out)
        # the token-alone path (direct path + MLP, the position embedding is zero here): what token c writes
        # compared with the mean embedding of the contexts, attention's small write left out; centred logits
        e_bar = m.W_E[torch.from_numpy(windows)].reshape(-1, m.cfg.d_model).mean(0, keepdim=True)
        tok_write = m.unembed(m.W_E + m.mlp(m.W_E)) - m.unembed(e_bar + m.mlp(e_bar))
        tok_write = (tok_write - tok_write.mean(1, keepdim=True)).numpy()  # [V, V]
        lp = torch.log_softmax(torch.from_numpy(cache["logits"]), -1).numpy()
        mean_lp = lp.reshape(-1, V).mean(0)  # each token's mean log-prob over the contexts (the prior)
        ov = []
        for h in range(Hn):
            W_Oc = m.W_O[h] - m.W_O[h].mean(-1, keepdim=True)
            lg = ((v[:, h] @ W_Oc) * m.ln_final.weight / sigma) @ m.W_U
            ov.append((lg - lg.mean(1, keepdim=True)).numpy())
        W_outU = ((m.W_out - m.W_out.mean(-1, keepdim=True)) * m.ln_final.weight / sigma @ m.W_U).numpy()  # [N, V]
    true, wrong = [], []
    rng = np.random.default_rng(0)
    prior = _top(mean_lp - mean_lp.mean(), 2 * top)  # the reference's mean output, its most extreme tokens
    true.append(f'[[prior]]\nid = "prior"\ndoc = "The mean output."\nnext = {_table(vocab, prior)}\n')
    for n in range(n_src // 2):  # the same values moved onto other tokens of the contexts
        moved = dict(zip(rng.choice(np.setdiff1d(np.arange(V), list(prior)), len(prior), replace=False).tolist(), prior.values()))
        wrong.append(f'[[prior]]\nid = "prior.moved{n}"\ndoc = "Values on other tokens."\nnext = {_table(vocab, moved)}\n')
    for h in range(Hn):
        sc = (q[:, h][used] @ k[:, h][used].T).numpy() / math.sqrt(oracle.cfg.d_head)
        entries = ", ".join(f"{{ now = {_s(vocab[c])}, src = {_s(vocab[s])}, w = {sc[i, j]:.4f} }}"
                            for i, c in enumerate(used) for j, s in enumerate(used))
        true.append(f'[[head]]\nid = "head{h}"\ndoc = "Reference head {h}, every token pair."\nscore = [{entries}]\n')
    for h in range(Hn - 1):  # head 3 (the copying head) is described by its copy rule below
        for n, s in enumerate(freq):
            row = _table(vocab, _top(ov[h][s], top))
            other = freq[(n + 1) % n_src]
            for out, src in ((true, s), (wrong, other)) if n < n_src else ((true, s),):
                out.append(f'[[head_out]]\nid = "head{h}.out{n}"\ndoc = "Head {h} reading a source."\nhead = "head{h}"\n'
                           f'src = {_s(vocab[src])}\nnext = {row}\n')
    w = float(np.mean(ov[3][used, used]))  # head 3 copies: its OV output's logit on the source token itself
    for out, hh in ((true, 3), (wrong, 0)):  # a copy rule on a head that does not copy is the wrong pairing
        out.append(f'[[head_out]]\nid = "head{hh}.copy"\ndoc = "Head {hh} copies what it reads."\nhead = "head{hh}"\n'
                   f'src = "@all"\ncopy = {w:.4f}\n')
    for n in range(N):
        on = {int(c): float(pre[c, n]) for c in used}
        true.append(f'[[neuron]]\nid = "neuron.{n}"\ndoc = "Reference neuron {n}."\nnow = {_table(vocab, on)}\nnext = {_table(vocab, _top(W_outU[n], top))}\n')
    for n, c in enumerate(freq[:n_rows]):
        row = _top(tok_write[c], top)
        other = freq[(n + 1) % n_rows]
        shuffled = dict(zip(rng.choice(used, len(row), replace=False).tolist(), row.values()))
        true.append(f'[[bigram]]\nid = "bigram.{n}"\ndoc = "After a token."\nnow = {_s(vocab[c])}\nnext = {_table(vocab, row)}\n')
        wrong.append(f'[[bigram]]\nid = "bigram.{n}"\ndoc = "After another token."\nnow = {_s(vocab[other])}\n'
                     f'next = {_table(vocab, row)}\n')
        wrong.append(f'[[bigram]]\nid = "bigram.{n}.shuffled"\ndoc = "Values on other tokens."\nnow = {_s(vocab[c])}\n'
                     f'next = {_table(vocab, shuffled)}\n')
    same = [t for t in true if t.startswith("[[head]]") or t.startswith("[[neuron]]")]  # paired wrongly by wrong_checks
    return "\n".join(true), "\n".join(same + wrong)


def wrong_checks(rules, n_heads: int, d_mlp: int) -> dict[str, dict]:
    """check tables pairing every [[head]] and [[neuron]] with another reference head / neuron."""
    out = {}
    for r in rules.rules:
        if r.kind == "head":
            out[r.id] = {"ref_head": (int(r.id[4:]) + 1) % n_heads}
        elif r.kind == "neuron":
            out[r.id] = {"ref_neuron": (int(r.id.split(".")[1]) + 7) % d_mlp}
    return out
