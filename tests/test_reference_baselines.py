"""Count n-gram baselines: the interpolated estimates equal a brute-force count on a small stream."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from reference.baselines import _Counts, _fit_lambdas, _mix, _triples, ngram_baselines


def brute_prob(train: list[int], a: int, b: int, c: int, lam, V: int) -> float:
    uni, bi, tri = Counter(train), Counter(zip(train, train[1:])), Counter(zip(train, train[1:], train[2:]))
    ctx1, ctx2 = Counter(train[:-1]), Counter(zip(train[:-2], train[1:-1]))
    w = np.array(lam, dtype=float)
    p3 = p2 = 0.0
    if ctx2[(a, b)]:
        p3 = tri[(a, b, c)] / ctx2[(a, b)]
    else:
        w[0] = 0.0  # unseen context: its weight goes to the lower levels
    if ctx1[b]:
        p2 = bi[(b, c)] / ctx1[b]
    else:
        w[1] = 0.0
    p1 = uni[c] / len(train)
    w = w / w.sum()
    return float(w @ [p3, p2, p1, 1.0 / V])


def test_interpolated_probabilities_match_brute_force_counts():
    rng = np.random.default_rng(0)
    V = 7
    train = rng.integers(0, V - 1, size=200)  # token V-1 never occurs in training
    valid = np.concatenate([rng.integers(0, V, size=40), [V - 1, V - 1, 3]])
    lam = np.array([0.5, 0.25, 0.15, 0.1])
    p, _ = _mix(_Counts(train, V).level_probs(*_triples(valid)), lam)
    a, b, c = _triples(valid)
    want = [brute_prob(train.tolist(), int(x), int(y), int(z), lam, V) for x, y, z in zip(a, b, c)]
    np.testing.assert_allclose(p, want, rtol=1e-12)
    assert (p > 0).all()


def test_baselines_order_and_weights(story_maker):
    from reference.corpus import token_stream
    from reference.tokenizer import train_tokenizer

    stories = story_maker(200, seed=8)
    tok = train_tokenizer(stories, vocab_size=300)
    train, valid = token_stream(tok, stories[:180]), token_stream(tok, stories[180:])
    res = ngram_baselines(train, valid, tok.get_vocab_size())
    assert [r.name for r in res] == ["unigram", "bigram", "trigram (interpolated)"]
    assert res[0].ce > res[1].ce > res[2].ce
    assert res[0].ce < np.log(tok.get_vocab_size())
    for r, zeros in zip(res, (2, 1, 0)):
        assert sum(r.lambdas) == pytest.approx(1.0, abs=1e-3)
        assert r.lambdas[:zeros] == [0.0] * zeros
    lam = _fit_lambdas(_Counts(train, 300).level_probs(*_triples(valid)), 3)
    assert lam.shape == (4,) and (lam >= 0).all()
