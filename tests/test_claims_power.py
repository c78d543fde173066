"""Component checks (verify/claims/): the hand side equals the twin, the reference's ablated passes are
what they say, and the checks have power — true rules read off a reference with known mechanisms pass,
the same rules paired with the wrong component fail at least 95% of the time (docs/claims.md)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SMALL_RULES, SMALL_VOCAB

DOC_RULES = ROOT / "tests" / "fixtures" / "rules_doc_example"
DOC_VOCAB = ["<|endoftext|>", " the", " cat", " dog", " ice", " cream", " sat", " ran", "."]


@pytest.mark.parametrize("folder,vocab", [(DOC_RULES, DOC_VOCAB), (SMALL_RULES, SMALL_VOCAB)])
def test_hand_side_equals_twin(folder, vocab):
    from handmodel import load_rules, twin
    from verify.claims import hand_side as H

    rules = load_rules(folder, vocab)
    vec = H.RuleVectors(rules)
    rng = np.random.default_rng(0)
    seqs = [np.array([0, 1, 2, 6, 8, 1, 3])] + [rng.integers(0, len(vocab), 10) for _ in range(16)]  # docs' sequence first
    for seq in seqs:
        ws = H.window_state(vec, seq)
        for t in range(len(seq)):
            twin_d = {i: d for i, d, _ in twin.contributions(rules, seq, t)}
            for h, r in enumerate(vec.heads):
                assert np.allclose(ws.att[h][t, : t + 1], twin.attention(rules, r, seq, t), atol=1e-12)
                assert np.all(ws.att[h][t, t + 1:] == 0)
            for i, r in enumerate(rules.rules):
                if r.kind == "head":
                    continue
                d = H.contribution(vec, r, ws, np.array([t]))[0]
                assert np.allclose(d, twin_d.get(i, np.zeros(len(vocab))), atol=1e-12), (r.id, t)
                assert H.acts(vec, r, ws)[t] == bool(np.any(d != 0)) or not np.any(d != 0), (r.id, t)


# -- a reference with known mechanisms, and rules read off its weights (tests/claims_world.py) -------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import claims_world as CW
    from conftest import make_stories
    from handmodel import load_rules
    from reference.corpus import token_stream
    from reference.oracle import Oracle
    from verify.claims.measure import windows_of

    d = tmp_path_factory.mktemp("claims_world")
    oracle = Oracle.load(CW.build_reference(d / "ckpt", make_stories(200, 1)))
    windows = windows_of(token_stream(oracle.tokenizer, make_stories(60, 2)), CW.N_CTX, 32)
    true, wrong = CW.derive(oracle, windows)
    for name, text in (("true", true), ("wrong", wrong)):
        (d / name).mkdir()
        (d / name / "rules.toml").write_text(text, encoding="utf-8")
    rt, rw = load_rules(d / "true", oracle.vocab), load_rules(d / "wrong", oracle.vocab)
    return oracle, windows, rt, rw, CW.wrong_checks(rw, oracle.cfg.n_heads, oracle.cfg.d_mlp)


@pytest.fixture(scope="module")
def verdicts(world):
    from verify.claims.measure import check_components

    oracle, windows, rt, rw, wrong_checks = world
    return check_components(oracle, rt, {}, windows), check_components(oracle, rw, wrong_checks, windows)


def _kind(v) -> str:
    return "copy" if v.id.endswith(".copy") else v.kind


def test_true_rules_pass(verdicts):
    true, _ = verdicts
    by = Counter((_kind(v), v.verdict) for v in true)
    for kind in ("head", "head_out", "copy", "neuron", "bigram"):
        n = sum(c for (k, _), c in by.items() if k == kind)
        assert n > 0 and by[(kind, "pass")] >= 0.9 * n, (kind, by)


def test_wrong_components_fail(verdicts):
    _, wrong = verdicts
    by = Counter((_kind(v), v.verdict) for v in wrong)
    for kind in ("head", "head_out", "copy", "neuron", "bigram"):
        n = sum(c for (k, _), c in by.items() if k == kind)
        assert n > 0 and by[(kind, "fail")] >= 0.95 * n, (kind, by)


def test_verdict_interval_rules():
    from verify.claims.component import MIN_WINDOWS, verdict_of

    rng = np.random.default_rng(1)

    def sums(r: float, n_win: int):
        out = {}
        for w in range(n_win):
            x = rng.normal(size=50)
            y = r * x + np.sqrt(1 - r * r) * rng.normal(size=50)
            out[w] = np.array([50, x.sum(), y.sum(), x @ x, y @ y, x @ y])
        return out

    assert verdict_of("readout", "corr", 0.5, sums(0.9, 40), 0, 0).verdict == "pass"
    assert verdict_of("readout", "corr", 0.5, sums(0.1, 40), 0, 0).verdict == "fail"
    assert verdict_of("readout", "corr", 0.5, sums(0.5, 40), 0, 0).verdict == "undecided"  # straddles
    few = verdict_of("readout", "corr", 0.5, sums(0.9, MIN_WINDOWS - 1), 0, 0)
    assert few.verdict == "undecided" and few.windows == MIN_WINDOWS - 1
    assert verdict_of("readout", "corr", 0.5, {}, 0, 0).verdict == "undecided"
