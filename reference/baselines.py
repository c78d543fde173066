"""Count n-gram yardsticks: unigram, bigram and interpolated trigram cross-entropy on held-out text.

All three are linear interpolations of maximum-likelihood count estimates down to the uniform
distribution, so no held-out token ever gets probability 0:
    P(c | a b) = l3·C(abc)/C(ab) + l2·C(bc)/C(b) + l1·C(c)/N + l0/V
The weights are chosen by EM on the last 10% of the training stream with counts from the first 90%
(deleted interpolation), then the counts are refit on the whole training stream. A level whose
context was never seen contributes nothing and its weight is spread over the lower levels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class _Counts:
    """Sorted-key count tables for n-grams of a token stream (keys packed into int64)."""

    def __init__(self, stream: np.ndarray, V: int):
        s = stream.astype(np.int64)
        self.V, self.N = V, len(s)
        self.uni = np.bincount(s, minlength=V).astype(np.float64)
        self.bi_keys, self.bi_n = np.unique(s[:-1] * V + s[1:], return_counts=True)
        self.tri_keys, self.tri_n = np.unique((s[:-2] * V + s[1:-1]) * V + s[2:], return_counts=True)
        # context counts: how often a (or ab) is followed by anything
        self.ctx1 = np.bincount(s[:-1], minlength=V).astype(np.float64)
        self.ctx2_keys, self.ctx2_n = np.unique(s[:-2] * V + s[1:-1], return_counts=True)

    @staticmethod
    def _lookup(keys, counts, q):
        i = np.searchsorted(keys, q)
        i = np.minimum(i, len(keys) - 1)
        hit = keys[i] == q
        return np.where(hit, counts[i], 0).astype(np.float64)

    def level_probs(self, a, b, c) -> tuple[np.ndarray, ...]:
        """Per-target ML estimates (p3, p2, p1, p0) and masks of which contexts were seen."""
        V = self.V
        p1 = self.uni[c] / self.N
        c1 = self.ctx1[b]
        p2 = np.where(c1 > 0, self._lookup(self.bi_keys, self.bi_n, b * V + c) / np.maximum(c1, 1), 0.0)
        c2 = self._lookup(self.ctx2_keys, self.ctx2_n, a * V + b)
        p3 = np.where(c2 > 0, self._lookup(self.tri_keys, self.tri_n, (a * V + b) * V + c) / np.maximum(c2, 1), 0.0)
        return p3, p2, p1, np.full(len(c), 1.0 / V), c2 > 0, c1 > 0


def _mix(levels, lam):
    p3, p2, p1, p0, seen3, seen2 = levels
    w = np.tile(lam, (len(p0), 1))
    w[~seen3, 0] = 0.0
    w[~seen2, 1] = 0.0
    w /= w.sum(1, keepdims=True)
    return w[:, 0] * p3 + w[:, 1] * p2 + w[:, 2] * p1 + w[:, 3] * p0, w


def _fit_lambdas(levels, order: int, iters: int = 50) -> np.ndarray:
    """EM for interpolation weights; `order` 1, 2 or 3 zeroes the unused higher levels."""
    lam = np.array([0.4, 0.3, 0.2, 0.1])
    lam[: 3 - order] = 0.0
    lam /= lam.sum()
    P = np.stack(levels[:4], 1)
    for _ in range(iters):
        _, w = _mix(levels, lam)
        resp = w * P
        resp /= resp.sum(1, keepdims=True)
        new = resp.mean(0)
        new[: 3 - order] = 0.0
        lam = new / new.sum()
    return lam


@dataclass
class NgramResult:
    name: str
    ce: float  # nats/token on the held-out stream
    lambdas: list[float]


def _triples(stream: np.ndarray):
    s = stream.astype(np.int64)
    # the first target has no token two back; repeat the first token (the stream starts with EOT)
    a = np.concatenate([[s[0]], s[:-2]])  # a[i] = s[i-1]: the token before the current one
    b = s[:-1]
    c = s[1:]
    return a, b, c


def ngram_baselines(train: np.ndarray, valid: np.ndarray, V: int) -> list[NgramResult]:
    """CE of interpolated unigram, bigram and trigram count models, trained on `train`, scored on `valid`."""
    cut = int(len(train) * 0.9)
    held = _Counts(train[:cut], V)
    lv_held = held.level_probs(*_triples(train[cut:]))
    full = _Counts(train, V)
    lv_valid = full.level_probs(*_triples(valid))
    out = []
    for order, name in [(1, "unigram"), (2, "bigram"), (3, "trigram (interpolated)")]:
        lam = _fit_lambdas(lv_held, order)
        p, _ = _mix(lv_valid, lam)
        out.append(NgramResult(name, float(-np.log(p).mean()), [round(float(x), 4) for x in lam]))
    return out
