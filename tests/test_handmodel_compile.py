"""Compiler semantics: classes, rule order, groups, number counts, the shipped fixture; no torch needed."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from handmodel import HandModel, load_rules

from conftest import ROOT, SMALL_RULES as FIXTURE, SMALL_VOCAB as VOCAB


def test_handmodel_never_imports_torch_or_reference():
    bad = re.compile(r"^\s*(import torch|from torch|import reference|from reference)", re.M)
    for f in (ROOT / "handmodel").glob("*.py"):
        assert not bad.search(f.read_text()), f


def test_runs_with_torch_unimportable(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\nsys.modules['reference'] = None\n")
    code = (
        "import numpy as np, handmodel\n"
        f"r = handmodel.load_rules({str(FIXTURE)!r}, {VOCAB!r})\n"
        "lp = handmodel.HandModel(r).log_probs(np.array([0, 4, 5], dtype=np.int32))\n"
        "assert np.isfinite(lp).all()\n"
        "import sys; assert sys.modules['torch'] is None\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_fixture_order_groups_numbers():
    r = load_rules(FIXTURE, VOCAB)
    assert r.rule_ids == ["prior.common", "bigram.after_the", "bigram.table", "head.prev", "head.prev.ice",
                          "skip.cat_dog", "neuron.dessert"]
    assert r.rule_kinds == ["prior", "bigram", "bigram", "head", "head_out", "skip", "neuron"]
    assert r.groups == ["00_prior", "20_bigram", "30_heads"]
    assert list(r.rule_group) == [0, 1, 1, 2, 2, 2, 2]
    assert list(r.rule_numbers) == [2, 2, 4, 2, 1, 1, 5]
    assert r.vocab_size == len(VOCAB) and all(r.rule_docs) and r.rule_files[0].endswith("00_prior.toml")


def test_class_union_pattern_except_and_escape(tmp_path):
    vocab = ["a", " A", " B", " c", "@x", "Cat"]
    (tmp_path / "c.toml").write_text(
        '[[class]]\nid = "caps"\ndoc = "space then capital"\npattern = "^ [A-Z]"\n'
        '[[class]]\nid = "more"\ndoc = "union, minus"\ntokens = ["@caps", "@@x", "a"]\npattern = "^C"\nexcept = [" B"]\n'
        '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "@more" = 1.0, "a" = 0.5 }\n')
    r = load_rules(tmp_path, vocab)
    assert list(r.sets.class_members[r.sets.class_ids["caps"]]) == [1, 2]
    assert list(r.sets.class_members[r.sets.class_ids["more"]]) == [0, 1, 4, 5]
    lp = HandModel(r).log_probs(np.array([3], dtype=np.int32))[0]
    logits = np.array([1.5, 1.0, 0.0, 0.0, 1.0, 1.0])  # overlapping targets add up
    np.testing.assert_allclose(lp, logits - np.log(np.exp(logits).sum()), atol=1e-6)


def test_group_keys_and_rule_order_within_file(tmp_path):
    (tmp_path / "b.toml").write_text('group = "late"\n[[skip]]\nid = "s"\ndoc = "d"\nearlier = "x"\nnext = { "y" = 1 }\n'
                                     '[[prior]]\nid = "p2"\ndoc = "d"\ngroup = "own"\nnext = { "y" = 1 }\n')
    (tmp_path / "a.toml").write_text('[[bigram]]\nid = "b"\ndoc = "d"\nnow = "x"\nnext = { "y" = 1 }\n'
                                     '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "y" = 1 }\n')
    r = load_rules(tmp_path, ["x", "y"])
    assert r.rule_ids == ["b", "p", "s", "p2"]
    assert r.groups == ["a", "late", "own"] and list(r.rule_group) == [0, 0, 1, 2]


def test_big_table_compiles(tmp_path):
    vocab = [f"t{i}" for i in range(500)]
    rng = np.random.default_rng(0)
    rows = "\n".join(f'"t{i}" = {{ ' + ", ".join(f'"t{j}" = {w:.3f}' for j, w in zip(rng.choice(500, 20, replace=False), rng.normal(size=20))) + " }"
                     for i in range(500))
    (tmp_path / "t.toml").write_text(f'[[bigram]]\nid = "table"\ndoc = "top-20 table"\n[bigram.rows]\n{rows}\n')
    r = load_rules(tmp_path, vocab)
    assert r.rule_numbers[0] == 500 * 20
    assert len(r.arrays.blk_tok) == 500 * 20


def test_weighted_set_numbers_count_once_on_the_first_user(tmp_path):
    """A [[weights]] table's entries are explicit numbers once, on the first rule in ledger order that references it
    (here a prior in an earlier file than the set itself); the ledger's cumulative numbers column counts them once;
    an unreferenced weighted set counts 0 and changes nothing."""
    from types import SimpleNamespace

    from verify.ledger import core as L

    vocab = ["a", "b", "c", "d"]
    (tmp_path / "00_first.toml").write_text('group = "one"\n[[prior]]\nid = "p"\ndoc = "d"\nnext = { "@w" = 1.0, "d" = 0.5 }\n')
    later = ('group = "two"\n[[weights]]\nid = "w"\ndoc = "three entries"\ntokens = { "a" = 1.0, "b" = 0.5, "@all" = 0.1 }\n'
             '[[neuron]]\nid = "n"\ndoc = "d"\nthreshold = -1\nnow = { "@w" = 1.0 }\nnext = { "@w" = 2.0 }\n'
             '[[bigram]]\nid = "b"\ndoc = "d"\nrows = { "c" = { "@w" = -1.0 }, "a" = { "@w" = 1.0 } }\n')
    (tmp_path / "10_later.toml").write_text(later)
    r = load_rules(tmp_path, vocab)
    assert r.rule_ids == ["p", "n", "b"]
    assert list(r.rule_numbers) == [2 + 3, 3, 2]
    assert [int(r.rule_numbers[m].sum()) for _, m in L.group_masks(r)] == [0, 5, 10]
    assert list(r.sets.members(r.rules[0].next[0][0])) == [0, 1, 2, 3]
    np.testing.assert_allclose(r.sets.weights_of(r.rules[0].next[0][0]), [1.1, 0.6, 0.1, 0.1])
    # the same rules with an extra, unreferenced weighted set: same numbers, same log-probs
    (tmp_path / "20_unused.toml").write_text('[[weights]]\nid = "spare"\ndoc = "nobody reads it"\ntokens = { "c" = 4.0, "d" = 1.0 }\n')
    r2 = load_rules(tmp_path, vocab)
    assert list(r2.rule_numbers) == [5, 3, 2]
    seq = np.array([0, 2, 1, 3], dtype=np.int32)
    np.testing.assert_allclose(HandModel(r2).log_probs(seq), HandModel(r).log_probs(seq), atol=1e-7)
    # a weighted set is not a rule: it is neither in the ledger nor in masks, and its file keys the cached rows
    meta = SimpleNamespace(meta={"key": "eval"})
    masks = [m for _, m in L.group_masks(r2)]
    before = L.row_keys(r2, masks, meta)
    (tmp_path / "10_later.toml").write_text(later.replace('"b" = 0.5', '"b" = 0.25'))
    after = L.row_keys(load_rules(tmp_path, vocab), masks, meta)
    assert before[1] != after[1]  # row "+ one" holds only p (00_first), which reads @w from 10_later
