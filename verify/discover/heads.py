"""Head drafts for `handmodel suggest`: each reference head becomes a hand [[head]] (where it looks)
plus [[head_out]] rules (what attending to a source token adds to the logits).

Where it looks: the hand head's attention is softmax_s(position[t−s] + score[tok_s]) (docs/rules.md,
[[head]]); both tables are fitted to the reference head's real attention patterns on training text
by minimising the cross-entropy of the hand pattern against the reference pattern (torch, Adam).
A query-dependent part of the reference's attention is not captured; the fit's KL says how much.

What it adds: for the source tokens that receive the most attention, a [[head_out]] row whose
entries are fitted by moment matching (iterative scaling, scaling.py) against the reference's
next-token distributions, with the rest of the hand model in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from handmodel import twin



@dataclass
class HeadDraft:
    ref_head: int
    position: np.ndarray  # [D] score at distance 0..D-1
    pos_default: float  # score at distance >= D
    score_tok: np.ndarray  # token ids with a source score
    score_w: np.ndarray
    fit_kl: float  # mean KL(ref attention ‖ hand attention) on the sample, nats
    uniform_kl: float  # same for the position table alone at its best (no token scores)
    prev_share: float  # mean reference attention at distance 1
    self_share: float  # mean reference attention at distance 0
    kind: str  # "previous-token", "self", "content" (a label for docs)
    query: object = None  # jointfit.QueryScores: score entries { now = @class, src = @class, w } (joint fit only)


def reference_patterns(oracle, windows: np.ndarray, batch: int = 16) -> np.ndarray:
    """[B, H, T, T] float32 attention patterns of the reference on windows."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(windows), batch):
            cache: dict = {}
            oracle.model(torch.from_numpy(windows[s:s + batch]), cache=cache)
            out.append(cache["attn.pattern"].float().numpy())
    return np.concatenate(out)


def hand_attention(tokens: np.ndarray, position: np.ndarray, pos_default: float, score: np.ndarray) -> np.ndarray:
    """[T, T] attention of a hand head with a position table and a dense per-token source score [V]
    (handmodel.twin.attention_pattern with score entries now = @all)."""
    return twin.attention_pattern(position, pos_default, score[tokens])


def fit_head(pat: np.ndarray, windows: np.ndarray, V: int, max_dist: int, n_scores: int, min_count: int,
             steps: int = 150, seed: int = 0) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, float, float]:
    """Fit position[0..max_dist-1], default and per-token source scores to one head's patterns [B, T, T].
    Returns (position, default, score tokens, score weights, fitted KL, KL with positions only)."""
    import torch

    from . import torchsem as sem

    torch.manual_seed(seed)
    B, T, _ = pat.shape
    A = torch.from_numpy(pat)
    W = torch.from_numpy(windows)
    causal = sem.distances(T) >= 0
    counts = np.bincount(windows.ravel(), minlength=V)
    neg_ent = torch.where(A > 0, A * torch.log(A.clamp(min=1e-30)), torch.zeros(())).sum(-1).mean()

    def run(allowed: np.ndarray | None, n_steps: int):
        pos = torch.zeros(max_dist + 1, requires_grad=True)
        sc = torch.zeros(V, requires_grad=True)
        mask = torch.zeros(V) if allowed is None else torch.from_numpy(allowed.astype(np.float32))
        opt = torch.optim.Adam([pos, sc], lr=0.1)
        for _ in range(n_steps):
            opt.zero_grad()
            s = sem.position_scores(pos[:max_dist], pos[max_dist], T)[None] + (sc * mask)[W][:, None, :]  # pos[max_dist]: default
            s = s.masked_fill(~causal, float("-inf"))
            ce = -(A * torch.log_softmax(s, -1).masked_fill(~causal, 0.0)).sum(-1).mean()
            ce.backward()
            opt.step()
        return pos.detach().numpy(), (sc * mask).detach().numpy(), float(ce.detach() + neg_ent)

    pos0, _, kl_pos = run(None, steps)
    cand = counts >= min_count
    pos1, sc1, _ = run(cand, steps)
    # keep the n_scores tokens whose score moves the most attention (|w| x how often they appear)
    imp = np.abs(sc1) * np.sqrt(counts)
    keep = np.zeros(V, bool)
    top = np.argsort(-imp)[:n_scores]
    keep[top[imp[top] > 0]] = True
    pos2, sc2, kl2 = run(keep, steps)
    toks = np.flatnonzero(keep)
    return pos2[:max_dist], float(pos2[max_dist]), toks, sc2[toks], kl2, kl_pos


def draft_heads(oracle, windows: np.ndarray, max_dist: int = 16, n_scores: int = 400, min_count: int = 20,
                steps: int = 150, log=print) -> list[HeadDraft]:
    V = oracle.cfg.vocab_size
    pats = reference_patterns(oracle, windows)
    T = windows.shape[1]
    out = []
    for h in range(oracle.cfg.n_heads):
        p = pats[:, h]
        prev = float(np.mean([np.diagonal(p[b], -1).mean() for b in range(len(p))]))
        self_ = float(np.mean([np.diagonal(p[b]).mean() for b in range(len(p))]))
        pos, default, toks, w, kl, kl_pos = fit_head(p, windows, V, min(max_dist, T - 1), n_scores, min_count, steps)
        kind = "previous-token" if prev > 0.5 else ("self" if self_ > 0.5 else "content")
        out.append(HeadDraft(h, pos, default, toks, w, kl, kl_pos, prev, self_, kind))
        log(f"head {h}: {kind} (attention at distance 1: {prev:.2f}, 0: {self_:.2f}); "
            f"hand attention KL {kl:.3f} nats (positions only: {kl_pos:.3f})")
    return out
