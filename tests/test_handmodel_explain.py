"""HandModel.explain_batch (engine probe pass + attention rows) == twin.contributions at every position."""
from __future__ import annotations

import re

import numpy as np
from hypothesis import HealthCheck, given, settings

from handmodel import twin
from test_handmodel_engine import cases, compile_text

from handmodel import HandModel

NUM = re.compile(r"[-+]?\d+\.\d+")
TINY = 1e-4  # activations this small are float32 rounding in the probe (explain.ACT_EPS); both sides drop them


def _parts(desc: str) -> tuple[str, list[float]]:
    return NUM.sub("#", desc), [float(x) for x in NUM.findall(desc)]


def _twin_list(rules, seq, t, mask, next_w):
    out = []
    for i, d, desc in twin.contributions(rules, seq, t, mask):
        if rules.rule_kinds[i] == "neuron" and np.abs(d).max() < TINY * np.abs(next_w[i]).max():
            continue  # activation (d = act x next) below TINY
        out.append((i, float(np.abs(d).max()), desc))
    return out


def _check(case):
    vocab, files, seqs, seed = case
    rules = compile_text(vocab, files)
    rng = np.random.default_rng(seed)
    hm = HandModel(rules)
    for mask in (None, rng.random(len(rules.rule_ids)) < 0.6):
        got = hm.explain_batch(seqs, mask)
        assert len(got) == sum(len(s) for s in seqs)
        n = 0
        for s in seqs:
            for t in range(len(s)):
                mine = [f for f in got[n + t] if not (rules.rule_kinds[f.rule] == "neuron" and f.amount < TINY)]
                want = _twin_list(rules, s, t, mask, hm._explainer.next_w)
                assert [f.rule for f in mine] == [i for i, _, _ in want], (t, [f.desc for f in mine], want)
                for f, (_, size, desc) in zip(mine, want):
                    (ga, gn), (wa, wn) = _parts(f.desc), _parts(desc)
                    assert ga == wa, (f.desc, desc)  # same words, same tokens, same order
                    np.testing.assert_allclose(gn, wn, atol=2e-3)  # printed to 2-3 decimals
                    assert abs(f.size - size) <= 1e-4 * max(1.0, size)
            n += len(s)
        # explain (one position) is the same record
        s = seqs[0]
        assert hm.explain(s, len(s) - 1, mask) == [(rules.rule_ids[f.rule], f.desc) for f in got[len(s) - 1]]


@settings(deadline=None, derandomize=True, max_examples=60, suppress_health_check=list(HealthCheck))
@given(cases())
def test_explain_batch_matches_twin_contributions(case):
    _check(case)


@settings(deadline=None, derandomize=True, max_examples=25, suppress_health_check=list(HealthCheck))
@given(cases(shared=True))
def test_explain_batch_matches_twin_with_shared_weighted_sets(case):
    _check(case)
