"""Bigram structure for `handmodel suggest`: a unigram prior, token classes whose next-token rows look
alike, one class-level default row per class, and per-token exceptions, under a budget of numbers.

Everything starts from the oracle bigram b[c] (verify/ledger/baselines.py: the mean of the reference's
next-token distributions over training positions with current token c), so a draft row is the best
sparse approximation of what the reference does after c:

* For a row with base logits β (the prior, plus the class row for token rows) and a chosen support S,
  the hand distribution q_v ∝ exp(β_v + δ_v·[v ∈ S]) closest to b in KL(b ‖ q) puts exactly b_v on
  every v ∈ S and spreads the rest in proportion to exp(β): δ_v = log b_v + log Z − β_v with
  Z = Σ_{v∉S} e^{β_v} / (1 − Σ_{v∈S} b_v). (The I-projection onto indicator features; no iteration.)
* S is the k entries contributing most to KL(b ‖ softmax β); k per row grows with the token's
  frequency (∝ count^0.5), so the budget goes where the eval positions are.
* Classes: k-means on Hellinger rows √b[c] of the frequent tokens; each class is named after its
  most frequent members so a reader knows what it holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from handmodel.writer import name_part

PRIOR_FLOOR = -20.0  # log-prob written for tokens the reference (almost) never predicts


@dataclass
class SparseRow:
    support: np.ndarray  # int token ids
    delta: np.ndarray  # logit added to each


@dataclass
class BigramDraft:
    prior: np.ndarray  # [V] logits (log unigram, floored)
    class_names: list[str] = field(default_factory=list)
    class_members: list[np.ndarray] = field(default_factory=list)
    class_rows: list[SparseRow] = field(default_factory=list)
    token_rows: dict[int, SparseRow] = field(default_factory=dict)
    label: np.ndarray | None = None  # [V] class index or -1

    @property
    def n_numbers(self) -> int:
        return len(self.prior) + sum(len(r.support) for r in self.class_rows) + \
            sum(len(r.support) for r in self.token_rows.values())


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def project(target: np.ndarray, base: np.ndarray, k: int, min_gain: float = 0.0) -> SparseRow:
    """Best k-sparse logit change to `base` so that softmax(base + δ) is closest to `target` (see module doc)."""
    if k <= 0:
        return SparseRow(np.zeros(0, np.int64), np.zeros(0))
    lq = log_softmax(base)
    t = np.maximum(target, 1e-12)
    gain = target * (np.log(t) - lq)
    k = min(k, int((gain > min_gain).sum()))
    if k <= 0:
        return SparseRow(np.zeros(0, np.int64), np.zeros(0))
    S = np.argpartition(-gain, k - 1)[:k]
    S = S[np.argsort(-gain[S])]
    mass = float(target[S].sum())
    if mass >= 1 - 1e-6:  # keep a sliver for everything else, else log Z blows up
        mass = 1 - 1e-6
    off = np.ones(len(base), bool)
    off[S] = False
    m = base[off].max()
    logR = m + np.log(np.exp(base[off] - m).sum())
    logZ = logR - np.log1p(-mass)
    return SparseRow(S.astype(np.int64), np.log(t[S]) + logZ - base[S])


def kmeans_hellinger(rows: np.ndarray, weights: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Labels for rows (already √-probabilities) by weighted k-means with k-means++ seeding."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    k = min(k, n)
    centres = [rows[rng.choice(n, p=weights / weights.sum())]]
    d2 = ((rows - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 * weights
        centres.append(rows[rng.choice(n, p=p / p.sum())])
        d2 = np.minimum(d2, ((rows - centres[-1]) ** 2).sum(1))
    C = np.stack(centres)
    sq = (rows ** 2).sum(1)
    for _ in range(iters):
        dist = sq[:, None] - 2 * rows @ C.T + (C ** 2).sum(1)[None]
        lab = dist.argmin(1)
        newC = np.zeros_like(C)
        np.add.at(newC, lab, rows * weights[:, None])
        wsum = np.bincount(lab, weights=weights, minlength=k)
        empty = wsum == 0
        newC[~empty] /= wsum[~empty, None]
        newC[empty] = C[empty]
        if np.allclose(newC, C):
            break
        C = newC
    return lab


def class_name(members: np.ndarray, counts: np.ndarray, vocab: list[str], taken: set[str]) -> str:
    top = members[np.argsort(-counts[members])][:3]
    parts = []
    for t in top:
        p = name_part(vocab[t])
        if p not in parts:
            parts.append(p)
    base = "like_" + "_".join(parts)
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def allocate(counts: np.ndarray, budget: int, k_max: int, alpha: float = 0.5, weight: np.ndarray | None = None) -> np.ndarray:
    """Entries per row ∝ count^alpha (or ∝ `weight`, e.g. the KL current rules leave after each token),
    capped at k_max, summing to about `budget`."""
    w = np.where(counts > 0, counts.astype(np.float64) ** alpha, 0.0)
    if weight is not None:
        w = np.where(counts > 0, np.maximum(weight, 0.0) + 1e-9, 0.0)
    k = np.zeros(len(counts), np.int64)
    free = w > 0
    left = budget
    for _ in range(20):
        if left <= 0 or not free.any():
            break
        share = left * w[free] / w[free].sum()
        add = np.minimum(np.floor(share).astype(np.int64), k_max - k[free])
        if add.sum() == 0:
            break
        k[free] += add
        left -= int(add.sum())
        free = free & (k < k_max)
    return k


def draft_bigrams(log_unigram: np.ndarray, log_bigram: np.ndarray, counts: np.ndarray, vocab: list[str],
                  budget: int, n_classes: int = 64, class_k: int = 96, k_max: int = 256,
                  min_count: int = 20, seed: int = 0, row_weight: np.ndarray | None = None) -> BigramDraft:
    """Prior + classes + class rows + token exceptions; `budget` counts the token-exception numbers."""
    V = len(vocab)
    prior = np.maximum(log_unigram.astype(np.float64), PRIOR_FLOOR)
    d = BigramDraft(prior=prior, label=np.full(V, -1))
    freq = np.flatnonzero(counts >= min_count)
    B = np.exp(np.asarray(log_bigram, np.float64))
    if len(freq) >= 2 and n_classes > 0:
        lab = kmeans_hellinger(np.sqrt(B[freq]), counts[freq].astype(np.float64), n_classes, seed=seed)
        taken: set[str] = set()
        order = sorted(set(lab.tolist()), key=lambda c: -counts[freq[lab == c]].sum())
        for c in order:
            mem = freq[lab == c]
            pooled = (B[mem] * counts[mem, None]).sum(0) / counts[mem].sum()
            d.class_names.append(class_name(mem, counts, vocab, taken))
            d.class_members.append(np.sort(mem))
            d.class_rows.append(project(pooled, prior, class_k if len(mem) > 1 else 0))
            d.label[mem] = len(d.class_names) - 1
    ks = allocate(counts, budget, k_max, weight=row_weight)
    for c in np.flatnonzero(ks):
        base = prior.copy()
        if d.label[c] >= 0:
            r = d.class_rows[d.label[c]]
            base[r.support] += r.delta
        row = project(B[c], base, int(ks[c]), min_gain=1e-6)
        if len(row.support):
            d.token_rows[int(c)] = row
    return d


def draft_logits(d: BigramDraft, c: int) -> np.ndarray:
    """The hand model's logits after current token c under this draft (for tests and budgeting)."""
    z = d.prior.copy()
    if d.label is not None and d.label[c] >= 0:
        r = d.class_rows[d.label[c]]
        z[r.support] += r.delta
    if c in d.token_rows:
        r = d.token_rows[c]
        z[r.support] += r.delta
    return z
