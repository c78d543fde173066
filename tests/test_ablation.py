"""Ablation recomputes only the sequences a rule can touch (verify/ledger.run_ablation): it must give
exactly what switching the rule off over every sequence gives, for every rule kind."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import handmodel
from verify.ledger import core as L

from conftest import DOC_RULES as FIXTURE, DOC_VOCAB as VOCAB  # docs/rules.md's worked example
EXTRA = '''vocab = "9:10557a0e"
group = "extra"

[[bigram]]
id = "rare.ice"
doc = "After ' ice' comes ' cream'."
now = " ice"
next = { " cream" = 3.0 }

[[head_out]]
id = "copy.cat"
doc = "A cat looked at is named again."
head = "head.prev"
src = " cat"
copy = 2.0

[[head_out]]
id = "dog.after.ice"
doc = "After a dog, an ice looked at suggests '.'."
head = "head.prev"
src = " ice"
now = " dog"
next = { "." = 1.0 }

[[weights]]
id = "pets_w"
doc = "Pets, the cat most; a full stop against."
tokens = { " cat" = 1.0, " dog" = 0.6, "." = -0.5 }

[[neuron]]
id = "pets.again"
doc = "A pet now or looked at: it sits, and pets are named less (a weighted set read and written)."
threshold = 0.3
now = { "@pets_w" = 0.8 }
attend = { "head.prev" = { "@pets_w" = 1.5 } }
next = { " sat" = 0.5, "@pets_w" = -0.7 }
'''


def _rules(tmp: Path):
    d = tmp / "rules"
    d.mkdir(exist_ok=True)
    for f in FIXTURE.glob("*.toml"):
        (d / f.name).write_text(f.read_text())
    (d / "30_extra.toml").write_text(EXTRA)
    return handmodel.load_rules(d, VOCAB)


@pytest.fixture(scope="module")
def doc_rules(tmp_path_factory):
    """The ruleset compiled once for the property tests (nothing mutates CompiledRules; each example builds its
    own HandModel, so no engine cache is shared between examples)."""
    return _rules(tmp_path_factory.mktemp("doc_rules"))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3).map(lambda i: [1, 2, 3, 8][i]) | st.integers(0, 8), min_size=1, max_size=12),
                min_size=1, max_size=6), st.integers(0, 2 ** 31 - 1))
def test_ablation_on_touched_sequences_equals_full_recompute(doc_rules, seqs, seed):
    rules = doc_rules
    hm = handmodel.HandModel(rules)
    seqs = [np.array(s, dtype=np.int64) for s in seqs]
    N = sum(len(s) for s in seqs)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, len(VOCAB))) * 2
    logp = (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(np.float32)
    ref = SimpleNamespace(seqs=seqs, logp=logp)
    full = hm.stream_metrics(seqs, logp)["kl"]
    kl_full = float(np.mean(full))
    fast = {a["rule"]: a["kl_without"] for a in L.run_ablation(hm, rules, ref, kl_full, full)}
    n = len(rules.rule_ids)
    for i, rid in enumerate(rules.rule_ids):
        mask = np.ones(n, bool)
        mask[i] = False
        slow = float(np.mean(hm.stream_metrics(seqs, logp, mask=mask)["kl"]))
        assert abs(fast[rid] - slow) < 1e-6 * max(1.0, abs(slow)), rid


def test_touched_spans_end_at_the_last_position_a_rule_can_fire(tmp_path):
    rules = _rules(tmp_path)
    seqs = [np.array([1, 2, 8, 8]), np.array([4, 5, 8]), np.array([3, 4, 3, 8]), np.array([4, 3, 2, 3])]
    got = {rid: (i.tolist(), e.tolist()) for rid, (i, e) in zip(rules.rule_ids, L.touched_spans(rules, seqs))}
    assert got["rare.ice"] == ([1, 2, 3], [1, 2, 1])  # up to the last ' ice'
    assert got["copy.cat"] == ([0, 3], [4, 4])  # now = @all: to the end once a ' cat' is in
    assert got["dog.after.ice"] == ([2, 3], [3, 4])  # a ' dog' at or after an ' ice'
    assert got["skip.cat_dog"] == ([3], [4])  # a ' dog' strictly after a ' cat'
    assert got["neuron.chase"] == ([0, 1, 2, 3], [4, 3, 4, 4]) and got["head.prev"] == got["neuron.chase"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3).map(lambda i: [1, 2, 3, 8][i]) | st.integers(0, 8), min_size=1, max_size=12),
                min_size=1, max_size=6), st.integers(0, 2 ** 31 - 1), st.floats(0.5, 6.0), st.sampled_from([1, 3, 1 << 20]))
def test_probed_ablation_equals_recomputation(doc_rules, seqs, seed, scale, chunk):
    """verify/probe.fast_ablation (rule scalars probed from the engine, KL change from the rule's support)
    against ledger.run_ablation (the rule switched off and the model re-run), every rule kind; `chunk`: the
    gathered entries per block (1 and 3 split every rule's positions into many blocks)."""
    from unittest import mock

    from verify.ledger import probe

    rules = doc_rules
    hm = handmodel.HandModel(rules)
    seqs = [np.array(s, dtype=np.int64) for s in seqs]
    N = sum(len(s) for s in seqs)
    x = np.random.default_rng(seed).normal(size=(N, len(VOCAB))) * scale
    logp = (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(np.float32)
    ref = SimpleNamespace(seqs=seqs, logp=logp)
    full = hm.stream_metrics(seqs, logp)["kl"]
    kl_full = float(np.mean(full))
    slow = {a["rule"]: a for a in L.run_ablation(hm, rules, ref, kl_full, full)}
    with mock.patch.object(probe, "CHUNK_ENTRIES", chunk):
        fast = {a["rule"]: a for a in probe.fast_ablation(hm, rules, ref, kl_full, full)}
    assert slow.keys() == fast.keys()
    for rid, a in slow.items():
        assert abs(fast[rid]["kl_without"] - a["kl_without"]) < 2e-5 * max(1.0, abs(a["kl_without"])), (rid, fast[rid], a)
        assert fast[rid]["group"] == a["group"] and fast[rid]["doc"] == a["doc"]


def test_probe_reads_each_rules_scalar(tmp_path):
    """The probe's a_t: 1 where a skip fired, the attention mass on `src` for a head_out (0 where `now`
    misses), the activation for a neuron — checked against the twin's own contributions."""
    from handmodel import twin
    from verify.ledger.probe import scalars

    rules = _rules(tmp_path)
    seq = np.array([1, 2, 4, 3, 2, 3, 8, 4, 3], dtype=np.int64)
    idx = [i for i, k in enumerate(rules.rule_kinds) if k in ("neuron", "head_out", "skip")]
    a = scalars(rules, [seq], idx)
    for t in range(len(seq)):
        got = {i: d for i, d, _ in twin.contributions(rules, seq, t)}
        for k, i in enumerate(idx):
            r = rules.rules[i]
            if r.copy is not None:
                continue
            tok, w = next(iter(r.next))
            want = got[i][rules.sets.members(tok)[0]] / w if i in got else 0.0
            assert abs(a[t, k] - want) < 1e-5, (rules.rule_ids[i], t, a[t, k], want)


def test_copying_rules_are_probed_when_a_token_is_absent(tmp_path):
    """A copying head_out's vector (copy × attention on each context token) is read from a probe pass; it
    needs a token no sequence holds (here ' ran') to read it against — and must equal recomputation."""
    from verify.ledger.probe import fast_ablation

    rules = _rules(tmp_path)
    hm = handmodel.HandModel(rules)
    seqs = [np.array([1, 2, 8, 3, 2, 4, 5, 2]), np.array([2, 2, 6, 1, 2, 8]), np.array([0, 3, 2, 1, 2])]
    N = sum(len(s) for s in seqs)
    x = np.random.default_rng(3).normal(size=(N, len(VOCAB))) * 3
    logp = (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(np.float32)
    ref = SimpleNamespace(seqs=seqs, logp=logp)
    full = hm.stream_metrics(seqs, logp)["kl"]
    kl_full = float(np.mean(full))
    msgs = []
    fast = {a["rule"]: a["kl_without"] for a in fast_ablation(hm, rules, ref, kl_full, full, log=msgs.append)}
    assert "1 copying rules probed" in msgs[0], msgs
    slow = {a["rule"]: a["kl_without"] for a in L.run_ablation(hm, rules, ref, kl_full, full)}
    assert abs(fast["copy.cat"] - slow["copy.cat"]) < 1e-5 and abs(fast["copy.cat"] - kl_full) > 1e-3  # it does something
    assert max(abs(fast[k] - slow[k]) for k in slow) < 1e-5
