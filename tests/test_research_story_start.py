"""research/story_start.py: the correction matches the reference's top-k probabilities exactly and never raises
the KL, and the rule it writes fires at a story's first position only (engine reading the file back)."""
from __future__ import annotations

import shutil

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from handmodel import HandModel, load_rules
from research import story_start as m

from conftest import SMALL_RULES as FIXTURE, SMALL_VOCAB as VOCAB


def _logsoftmax(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 30), st.data())
def test_correction_matches_top_k_and_lowers_kl(seed, V, data):
    k = data.draw(st.integers(1, V - 1))
    rng = np.random.default_rng(seed)
    ref, hand = _logsoftmax(rng.normal(size=V) * 3), _logsoftmax(rng.normal(size=V) * 3)
    top, delta = m.correction(ref, hand, k)
    new = hand.copy()
    new[top] += delta
    new = _logsoftmax(new)
    np.testing.assert_allclose(np.exp(new[top]), np.exp(ref[top]), rtol=1e-6, atol=1e-12)
    assert set(top) == set(np.argsort(-ref)[:k])
    assert m.kl(ref, new) <= m.kl(ref, hand) + 1e-9


def test_written_rule_fires_at_the_first_position_only(tmp_path):
    rules_dir = tmp_path / "rules"
    shutil.copytree(FIXTURE, rules_dir)
    base = HandModel(load_rules(rules_dir, VOCAB))
    seq = np.array([0, 1, 2, 0, 3, 7], np.int64)  # '<|endoftext|>' first and again later (a second story)
    before = base.log_probs(seq).astype(np.float64)
    ref = _logsoftmax(np.arange(len(VOCAB), dtype=np.float64))
    top, delta = m.correction(ref, before[0], 4)
    text = m.block(VOCAB, top, delta, 4, m.kl(ref, before[0]), 0.0)
    (rules_dir / "99_story.toml").write_text('group = "long tail"\n\n' + text + "\n")
    rules = load_rules(rules_dir, VOCAB)
    assert "story.start" in rules.rule_ids
    after = HandModel(rules).log_probs(seq).astype(np.float64)
    np.testing.assert_allclose(after[0], m.corrected(before[0], top, delta), atol=1e-5)  # what the script reports
    np.testing.assert_allclose(np.exp(after[0][top]), np.exp(ref[top]), atol=1e-5)
    np.testing.assert_allclose(after[1:], before[1:], atol=1e-6)  # the later '<|endoftext|>' has tokens before it


def test_block_is_valid_toml_whatever_the_tokens():
    import tomllib

    vocab = ["a\n", 'b"', "c\\", "'d'", "e"]
    text = m.block(vocab, np.array([0, 1, 2, 3]), np.array([0.5, -1.0, 2.0, 0.25]), 4, 1.0, 0.5)
    rule = tomllib.loads(text)["neuron"][0]
    assert rule["id"] == "story.start" and rule["next"] == {"a\n": 0.5, 'b"': -1.0, "c\\": 2.0, "'d'": 0.25}
    assert repr("a\n") in rule["doc"] and repr('b"') in rule["doc"]


def test_put_block_replaces_the_block_whichever_path_its_marker_names():
    new = m.block(["a", "b"], np.array([0]), np.array([1.0]), 1, 1.0, 0.5)
    for marker in (m.BEGIN, "# --- story.start (written by rules/story_start.py) ---"):  # before the move
        old = "\n".join([marker, 'id = "story.start"', "old numbers", m.END])
        text = m.put_block(f'group = "long tail"\n\n{old}\n\n[[neuron]]\nid = "after"\n', new)
        assert "old numbers" not in text and text.count(m.END) == 1 and text.count(new) == 1
        assert text.startswith('group = "long tail"\n\n') and text.endswith('[[neuron]]\nid = "after"\n')
    assert m.put_block('group = "long tail"\n', new) == 'group = "long tail"\n\n' + new + "\n"  # none yet: appended
