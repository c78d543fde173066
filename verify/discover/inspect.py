"""`handmodel inspect token|head|neuron`: what the reference does, read off its weights and a corpus sample.

Every function returns a plain dict (the `--json` output); commands.py renders it as rich tables.
Logit tables are printed CENTRED (logit − mean over the vocabulary): softmax ignores the constant, and
centred numbers compare across rows. QK scores are centred over sources for each destination for the
same reason. Nothing here builds a vocab × vocab matrix: QK/OV are read through reference.oracle.Factored.
"""
from __future__ import annotations

import numpy as np

from handmodel.errors import UserError

from .common import context_text, run_pass, sample_windows, typical_ln_scale


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max()
    e = np.exp(z)
    return e / e.sum()


def _top(vec: np.ndarray, k: int, vocab, largest: bool = True, extra=None) -> list[dict]:
    idx = np.argsort(-vec if largest else vec, kind="stable")[:k]
    rows = []
    for i in idx:
        r = {"token": vocab[i], "id": int(i), "value": round(float(vec[i]), 4)}
        if extra is not None:
            r.update(extra(int(i)))
        rows.append(r)
    return rows


def token_counts(windows: np.ndarray, V: int) -> np.ndarray:
    return np.bincount(windows.ravel(), minlength=V)


def frequent(counts: np.ndarray, min_count: int) -> np.ndarray:
    """Token ids seen at least min_count times in the sample (all ids if that leaves fewer than 8)."""
    idx = np.flatnonzero(counts >= min_count)
    return idx if len(idx) >= 8 else np.arange(len(counts))


def centred_qk(oracle, head: int, dst_ids=None, src_ids=None):
    """QK of `head` restricted to dst/src ids, each row centred over the kept sources (softmax-invariant)."""
    from reference.oracle import Factored

    f = oracle.qk(head)
    left = f.left if dst_ids is None else f.left[dst_ids]
    right = f.right if src_ids is None else f.right[:, src_ids]
    return Factored(left, right - right.mean(axis=1, keepdims=True))


def centred_ov(oracle, head: int, ln_scale: float, src_ids=None):
    """OV of `head` (source -> logit effect), each row centred over outputs (softmax-invariant)."""
    from reference.oracle import Factored

    f = oracle.ov(head, ln_scale=ln_scale)
    left = f.left if src_ids is None else f.left[src_ids]
    return Factored(left, f.right - f.right.mean(axis=1, keepdims=True))


def neuron_output_effect(oracle, n: int, ln_scale: float) -> np.ndarray:
    """Centred logit effect of neuron n firing at activation 1 (through LNf at a typical scale)."""
    import torch

    m = oracle.model
    with torch.inference_mode():
        w = m.W_out[n] - m.W_out[n].mean()
        eff = ((w * m.ln_final.weight / ln_scale) @ m.W_U).numpy()
    return eff - eff.mean()


def token_alone_activations(oracle, tokens=None) -> np.ndarray:
    """[n, N] MLP post-activations for tokens on their own (x0 = E[tok] + mean position, no attention)."""
    import torch

    m = oracle.model
    with torch.inference_mode():
        x0 = oracle._x0(tokens, None)
        return m.mlp_act(m.mlp_pre(m.ln2(x0))).numpy()  # the model's own activation (GELU, SoLU: imported models)


def _check_token(oracle, t: int) -> None:
    if not 0 <= t < oracle.cfg.vocab_size:
        raise UserError(f"token id {t} is out of range: this model has ids 0..{oracle.cfg.vocab_size - 1}")


# ---------------------------------------------------------------------------------------------------
def inspect_token(oracle, t: int, corpus, k: int = 10, n_tokens: int = 16384, min_count: int = 3) -> dict:
    _check_token(oracle, t)
    vocab, V, H = oracle.vocab, oracle.cfg.vocab_size, oracle.cfg.n_heads
    logits = oracle.direct_path([t])[0]
    cent = logits - logits.mean()
    p = _softmax(logits)
    prob = lambda i: {"prob": round(float(p[i]), 4)}  # noqa: E731
    out: dict = {"token": vocab[t], "id": t,
                 "direct_path": {"note": "attention removed, MLP kept, mean position; centred logits",
                                 "boosted": _top(cent, k, vocab, True, prob),
                                 "suppressed": _top(cent, k, vocab, False, prob)}}
    windows = sample_windows(oracle, corpus, n_tokens)
    counts = token_counts(windows, V)
    keep_ids = frequent(counts, min_count)
    ps = run_pass(oracle, windows, lambda c, b: {"pat": c["attn.pattern"], "post": c["mlp.post"]})
    pat, post = ps.data["pat"], ps.data["post"]  # [B,H,T,T], [B,T,N]
    bi, ti = np.nonzero(windows == t)
    out["occurrences"] = int(len(bi))
    heads = []
    W = 16
    T = windows.shape[1]
    for h in range(H):
        row = {"head": h}
        qrow = centred_qk(oracle, h, [t], keep_ids).rows([0])[0]
        row["qk_top_sources"] = [{"token": vocab[keep_ids[i]], "score": round(float(qrow[i]), 3)}
                                 for i in np.argsort(-qrow)[:5]]
        f = oracle.qk(h)
        colv = (f.left[keep_ids] @ f.right[:, [t]])[:, 0] - f.left[keep_ids] @ f.right[:, keep_ids].mean(axis=1)
        row["qk_top_destinations"] = [{"token": vocab[keep_ids[i]], "score": round(float(colv[i]), 3)}
                                      for i in np.argsort(-colv)[:5]]
        if len(bi):
            P = pat[bi, h, ti]  # [occ, T] attention FROM t (as destination)
            mass = np.zeros(V)
            np.add.at(mass, windows[bi][:, :].ravel(), P.ravel())
            row["attends_from_to_prev"] = round(float(np.mean([P[j, ti[j] - 1] if ti[j] else 0 for j in range(len(ti))])), 3)
            row["attends_from_to_self"] = round(float(P[np.arange(len(ti)), ti].mean()), 3)
            row["from_top_sources"] = [{"token": vocab[i], "mass": round(float(mass[i] / len(bi)), 3)}
                                       for i in np.argsort(-mass)[:5]]
            # attention this token RECEIVES from the next W positions, vs the average source token
            got = [pat[b_, h, ti_ + 1 : min(T, ti_ + 1 + W), ti_].mean() for b_, ti_ in zip(bi, ti) if ti_ + 1 < T]
            all_recv = np.mean([pat[:, h, d, d - W : d].mean() for d in range(W, T, max(1, T // 16))])
            row["attended_to_mean"] = round(float(np.mean(got)), 4) if got else None
            row["attended_to_lift"] = round(float(np.mean(got) / max(all_recv, 1e-9)), 2) if got else None
        heads.append(row)
    out["heads"] = heads
    act = token_alone_activations(oracle, [t])[0]
    ln = typical_ln_scale(oracle, windows)
    neurons = []
    for n in np.argsort(-act)[:k]:
        eff = neuron_output_effect(oracle, int(n), ln)
        r = {"neuron": int(n), "token_alone_act": round(float(act[n]), 3),
             "corpus_mean_act": round(float(post[bi, ti, n].mean()), 3) if len(bi) else None,
             "boosts": [vocab[i] for i in np.argsort(-eff)[:4]]}
        neurons.append(r)
    out["neurons"] = neurons
    return out


# ---------------------------------------------------------------------------------------------------
def head_profile(pat: np.ndarray, head: int, max_dist: int = 16) -> tuple[np.ndarray, float]:
    """Mean attention of `head` by relative distance d = dst − src over all destinations (sums to 1).
    Returns (profile[0..max_dist], mass at distances > max_dist)."""
    B, H, T, _ = pat.shape
    P = pat[:, head]
    prof = np.zeros(T)
    for d in range(T):
        prof[d] = np.diagonal(P, offset=-d, axis1=1, axis2=2).sum()
    prof /= B * T
    return prof[: max_dist + 1], float(prof[max_dist + 1 :].sum())


def skip_trigram_grid(oracle, h: int, src: int, dsts: list[int], outs: list[int], windows: np.ndarray,
                      window: int = 32) -> list[dict]:
    """Implied skip-trigrams "src … dst ⇒ out" for every (dst, out) in the grid, with corpus counts.
    A factored head boosts the whole grid; the combinations the corpus never shows are its "bugs"."""
    stream = windows.ravel()
    rows = []
    for d in dsts:
        for o in outs:
            pos = np.flatnonzero((stream[:-1] == d) & (stream[1:] == o))
            n_seen = sum(1 for i in pos if src in stream[max(0, i - window) : i])
            rows.append({"src": oracle.vocab[src], "dst": oracle.vocab[d], "out": oracle.vocab[o],
                         "bigram_count": int(len(pos)), "with_src_count": int(n_seen)})
    seen = any(r["with_src_count"] > 0 for r in rows)
    for r in rows:  # a bug: boosted by the factorisation, never seen, while a sibling combination is real
        r["bug"] = seen and r["with_src_count"] == 0
    return rows


def inspect_head(oracle, h: int, corpus, k: int = 10, n_tokens: int = 16384, min_count: int = 3,
                 max_dist: int = 16, dense: bool = False) -> dict:
    oracle._check_head(h)
    vocab, V = oracle.vocab, oracle.cfg.vocab_size
    windows = sample_windows(oracle, corpus, n_tokens)
    counts = token_counts(windows, V)
    keep = frequent(counts, min_count)
    ps = run_pass(oracle, windows, lambda c, b: {"pat": c["attn.pattern"][:, h : h + 1], "s": c["ln_final.scale"][..., 0]})
    prof, rest = head_profile(ps.data["pat"], 0, max_dist)
    ln = float(np.median(ps.data["s"]))
    out: dict = {"head": h, "sample_tokens": int(windows.size), "min_count": min_count, "ln_scale": round(ln, 3),
                 "profile": [round(float(x), 4) for x in prof], "profile_rest": round(rest, 4),
                 "previous_token_score": round(float(prof[1]) if len(prof) > 1 else 0.0, 4)}
    kind = "previous-token head" if len(prof) > 1 and prof[1] > 0.5 else (
        "self/current-token head" if prof[0] > 0.5 else ("long-range / content head" if rest > 0.5 else "mixed"))
    out["kind"] = kind
    qk = centred_qk(oracle, h, keep, keep)
    out["qk_top_pairs"] = [{"dst": vocab[keep[r]], "src": vocab[keep[c]], "score": round(v, 3)}
                           for r, c, v in qk.top_entries(k)]
    ov = centred_ov(oracle, h, ln, keep)
    out["ov_top"] = [{"src": vocab[keep[r]], "out": vocab[c], "logit": round(v, 3)} for r, c, v in ov.top_entries(k)]
    out["ov_bottom"] = [{"src": vocab[keep[r]], "out": vocab[c], "logit": round(v, 3)}
                        for r, c, v in ov.top_entries(k, largest=False)]
    # per-source summary for the strongest sources: where they are attended from and what they write
    strength = np.abs(ov.left @ ov.right).max(axis=1) if len(keep) <= 8192 else None
    srcs = [keep[i] for i in np.argsort(-strength)[:5]] if strength is not None else []
    skip = []
    for s in srcs[:3]:
        col = centred_qk(oracle, h, keep, keep).cols([int(np.flatnonzero(keep == s)[0])])[:, 0]
        dsts = [int(keep[i]) for i in np.argsort(-col)[:3]]
        row = ov.rows([int(np.flatnonzero(keep == s)[0])])[0]
        outs = [int(i) for i in np.argsort(-row)[:3]]
        skip += skip_trigram_grid(oracle, h, int(s), dsts, outs, windows)
    out["skip_trigrams"] = skip
    if dense:
        out["qk_full_shape"] = list(qk.shape)
    return out


# ---------------------------------------------------------------------------------------------------
def inspect_neuron(oracle, n: int, corpus, k: int = 10, n_tokens: int = 16384, min_count: int = 3) -> dict:
    import torch
    import torch.nn.functional as F

    N = oracle.cfg.d_mlp
    if not 0 <= n < N:
        raise UserError(f"neuron {n} does not exist: this model has neurons 0..{N - 1}")
    vocab, V = oracle.vocab, oracle.cfg.vocab_size
    windows = sample_windows(oracle, corpus, n_tokens)
    m = oracle.model
    w_out = m.W_out[n].detach()

    def keep(c, b):
        post = c["mlp.post"][..., n]
        logits = c["logits"][:, :-1]
        abl = m.unembed(c["resid_post"] - post[..., None] * w_out)[:, :-1]
        tgt = b[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none").view(tgt.shape)
        ce_a = F.cross_entropy(abl.reshape(-1, V), tgt.reshape(-1), reduction="none").view(tgt.shape)
        lp, lq = F.log_softmax(logits, -1), F.log_softmax(abl, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        return {"act": post, "ce": ce, "ce_abl": ce_a, "kl": kl, "s": c["ln_final.scale"][..., 0]}

    with torch.inference_mode():
        ps = run_pass(oracle, windows, keep)
    act, ln = ps.data["act"], float(np.median(ps.data["s"]))
    flat = act.ravel()
    out: dict = {"neuron": n, "sample_tokens": int(windows.size), "ln_scale": round(ln, 3),
                 "fires_fraction": round(float((flat > 0).mean()), 4), "mean_act": round(float(flat.mean()), 4),
                 "max_act": round(float(flat.max()), 4)}
    order = np.argsort(-flat)[:k]
    out["top_contexts"] = [{"act": round(float(flat[i]), 3),
                            "context": context_text(oracle, windows[i // windows.shape[1]], i % windows.shape[1])}
                           for i in order]
    toks = windows.ravel()
    sums = np.bincount(toks, weights=flat, minlength=V)
    cnt = np.bincount(toks, minlength=V)
    mean = np.where(cnt >= min_count, sums / np.maximum(cnt, 1), -np.inf)
    out["top_tokens"] = [{"token": vocab[i], "mean_act": round(float(mean[i]), 3), "count": int(cnt[i])}
                         for i in np.argsort(-mean)[:k] if np.isfinite(mean[i])]
    alone = token_alone_activations(oracle)[:, n]
    out["top_tokens_alone"] = [{"token": vocab[i], "act": round(float(alone[i]), 3)} for i in np.argsort(-alone)[:k]]
    eff = neuron_output_effect(oracle, n, ln)
    out["output_boosted"] = _top(eff, k, vocab, True)
    out["output_suppressed"] = _top(eff, k, vocab, False)
    ce, ce_a = ps.data["ce"].mean(), ps.data["ce_abl"].mean()
    out["ablation"] = {"ce": round(float(ce), 5), "ce_zero_ablated": round(float(ce_a), 5),
                       "loss_cost": round(float(ce_a - ce), 5), "kl_ref_to_ablated": round(float(ps.data["kl"].mean()), 5)}
    return out
