"""The compiled-ruleset cache (handmodel/rulecache.py): a cached load is the fresh compile, field by field; an
edited number is never served stale; a doc or comment edit reuses the arrays but shows the new text; an
edited rule is resolved alone; a damaged entry is reported, deleted and rebuilt."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import handmodel
from handmodel import compiled, rulecache

from conftest import DOC_RULES as FIXTURE, DOC_VOCAB as VOCAB  # docs/rules.md's worked example
EXTRA = '''vocab = "9:10557a0e"
group = "extra"

[[weights]]
id = "pets_w"
doc = "Pets, the cat most; a full stop against."
tokens = { " cat" = 1.0, " dog" = 0.6, "." = -0.5 }

[[head_out]]
id = "copy.cat"
doc = "A cat looked at is named again."
head = "head.prev"
src = " cat"
copy = 2.0

[[neuron]]
id = "pets.again"
doc = "A pet now or looked at."
threshold = 0.3
now = { "@pets_w" = 0.8 }
attend = { "head.prev" = { "@pets_w" = 1.5 } }
next = { " sat" = 0.5, "@pets_w" = -0.7, "@animal" = 0.2 }

[[bigram]]
id = "rare.ice"
doc = "After ' ice' comes ' cream'."
now = " ice"
next = { " cream" = 3.0 }
'''


def _folder(tmp: Path) -> Path:
    d = tmp / "rules"
    d.mkdir()
    for f in FIXTURE.glob("*.toml"):
        (d / f.name).write_text(f.read_text())
    (d / "30_extra.toml").write_text(EXTRA)
    return d


def _assert_same(a, b) -> None:
    """Every field of two CompiledRules: arrays by dtype, shape and value; rules, sets and metadata."""
    assert repr(a.rules) == repr(b.rules)  # resolved rules incl. types (tuples, ints, floats), docs and lines
    assert vars(a.arrays).keys() == vars(b.arrays).keys()
    for k, x in vars(a.arrays).items():
        y = getattr(b.arrays, k)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k
    for f in ("vocab", "vocab_size", "n_heads", "rule_ids", "rule_docs", "rule_kinds", "rule_files", "rule_lines", "groups"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("rule_group", "rule_numbers"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and np.array_equal(x, y), f
    for f in ("class_names", "class_ids", "class_entries", "class_docs", "V"):
        assert getattr(a.sets, f) == getattr(b.sets, f), f
    for x, y in zip(a.sets.class_members, b.sets.class_members, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    for x, y in zip(a.sets.class_weights, b.sets.class_weights, strict=True):
        assert (x is None) == (y is None) and (x is None or (x.dtype == y.dtype and np.array_equal(x, y)))
    assert np.array_equal(a.sets.member_matrix, b.sets.member_matrix)
    assert a.rule_digests() == b.rule_digests() == [compiled.rule_digest(r) for r in b.rules]


def _fresh(d: Path, tmp: Path, monkeypatch):
    """A compile with an empty cache of its own."""
    with monkeypatch.context() as m:
        m.setenv("HANDMODEL_CACHE", str(tmp))
        return handmodel.load_rules(d, VOCAB)


def _no_compile(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compiled again")
    monkeypatch.setattr(compiled, "build_arrays", boom)
    monkeypatch.setattr(compiled, "resolve_entry", boom)


def test_cached_load_equals_fresh_compile(tmp_path, monkeypatch):
    d = _folder(tmp_path)
    first = handmodel.load_rules(d, VOCAB)
    rulecache.flush()  # the entry is written on a thread
    assert len(list(rulecache.cache_root().glob("*.npz"))) == 1
    _no_compile(monkeypatch)  # the second load must come from the cache
    again = handmodel.load_rules(d, VOCAB)
    _assert_same(again, first)
    assert {"head_out", "neuron", "bigram", "prior", "head", "skip"} <= set(again.rule_kinds)
    assert any(w is not None for w in again.sets.class_weights)
    # the engine gives the same numbers from either
    seq = np.array([1, 2, 8, 3, 4, 5, 2, 3, 6], dtype=np.int64)
    assert np.array_equal(handmodel.HandModel(first).log_probs(seq), handmodel.HandModel(again).log_probs(seq))


def test_an_edited_number_is_recompiled_and_only_its_rule_resolved(tmp_path, monkeypatch):
    d = _folder(tmp_path)
    handmodel.load_rules(d, VOCAB)
    f = d / "30_extra.toml"
    f.write_text(f.read_text().replace('next = { " cream" = 3.0 }', 'next = { " cream" = 2.5 }'))
    resolved = []
    real = compiled.resolve_entry
    monkeypatch.setattr(compiled, "resolve_entry", lambda e, *a: resolved.append(e.id) or real(e, *a))
    got = handmodel.load_rules(d, VOCAB)
    assert resolved == ["rare.ice"]  # the others came from the last entry with the same token sets
    assert got.rules[got.rule_ids.index("rare.ice")].rows == [(4, [(5, 2.5)])]
    _assert_same(got, _fresh(d, tmp_path / "fresh", monkeypatch))


# (file, old, new): numbers only of a prior, a bigram row of a class, a head_out's next, a copy, a skip, two rules
# at once, and a neuron's outputs, threshold and present inputs; then edits that build_arrays must lay out again (a
# token added; a neuron's now and attend numbers, spread over tables of every neuron)
NUMBER_EDITS = {
    "prior": ("10_base.toml", '"@food" = -1.0', '"@food" = -0.25'),
    "bigram rows": ("10_base.toml", '"@animal" = { " sat" = 1.0, " ran" = 1.0 }', '"@animal" = { " sat" = 1.5, " ran" = -1.0 }'),
    "head_out": ("20_attention.toml", 'next = { " sat" = 2.0 }', 'next = { " sat" = -0.5 }'),
    "copy": ("30_extra.toml", "copy = 2.0", "copy = 0.75"),
    "skip": ("20_attention.toml", 'next = { " ran" = 1.5 }', 'next = { " ran" = 0.5 }'),
    "two rules": ("10_base.toml", '" ice" = { " cream" = 3.0 }\n" dog" = { " ran" = 0.5 }', '" ice" = { " cream" = 1.0 }\n" dog" = { " ran" = 0.5 }'),
    "neuron next": ("20_attention.toml", 'next = { " ran" = 1.0, "." = -0.5 }', 'next = { " ran" = 1.0, "." = -0.25 }'),
    "neuron threshold": ("20_attention.toml", "threshold = 1.0", "threshold = -0.25"),  # and now it always fires
    "neuron present": ("20_attention.toml", 'present = { " cat" = 1.0, "@animal" = 0.5 }', 'present = { " cat" = 1.0, "@animal" = 1.5 }'),
    "neuron class and set outputs": ("30_extra.toml", '"@pets_w" = -0.7, "@animal" = 0.2', '"@pets_w" = 0.4, "@animal" = -1.0'),
}
LAYOUT_EDITS = {
    "token added": ("10_base.toml", '" ice" = { " cream" = 3.0 }', '" ice" = { " cream" = 3.0, "." = 1.0 }'),
    "neuron now number": ("20_attention.toml", 'now = { " dog" = 1.0 }', 'now = { " dog" = 1.5 }'),
    "neuron attend number": ("30_extra.toml", '{ "@pets_w" = 1.5 }', '{ "@pets_w" = 0.5 }'),
}


@pytest.mark.parametrize("kind", list(NUMBER_EDITS) + list(LAYOUT_EDITS))
def test_an_edited_number_patches_the_arrays_as_a_build_would(tmp_path, monkeypatch, kind):
    """After an edit of numbers only (prior, bigram, head_out, skip; a neuron's threshold, `next` and `present`), the
    last entry's arrays are patched, not rebuilt: equal, array for array, to a fresh compile. Any other edit is built
    as before."""
    d = _folder(tmp_path)
    handmodel.load_rules(d, VOCAB)
    name, old, new = {**NUMBER_EDITS, **LAYOUT_EDITS}[kind]
    f = d / name
    assert f.read_text().count(old) == 1
    f.write_text(f.read_text().replace(old, new))
    built = []
    real = compiled.build_arrays
    monkeypatch.setattr(compiled, "build_arrays", lambda *a: built.append(1) or real(*a))
    got = handmodel.load_rules(d, VOCAB)
    assert built == ([] if kind in NUMBER_EDITS else [1])
    _assert_same(got, _fresh(d, tmp_path / "fresh", monkeypatch))


def test_an_edit_starts_from_the_ruleset_loaded_last(tmp_path, monkeypatch):
    """Load A, build B (a token added), load A again (a cache hit), edit a number of A: the patch starts from
    A, the entry read last, not from B, the entry built last (which differs in two rules)."""
    d = _folder(tmp_path)
    f = d / "10_base.toml"
    a_text = f.read_text()
    handmodel.load_rules(d, VOCAB)
    f.write_text(a_text.replace('" ice" = { " cream" = 3.0 }', '" ice" = { " cream" = 3.0, "." = 1.0 }'))
    handmodel.load_rules(d, VOCAB)
    f.write_text(a_text)
    handmodel.load_rules(d, VOCAB)
    f.write_text(a_text.replace('" dog" = { " ran" = 0.5 }', '" dog" = { " ran" = 0.25 }'))
    built = []
    real = compiled.build_arrays
    monkeypatch.setattr(compiled, "build_arrays", lambda *a: built.append(1) or real(*a))
    got = handmodel.load_rules(d, VOCAB)
    assert built == []
    _assert_same(got, _fresh(d, tmp_path / "fresh", monkeypatch))


def test_an_edited_class_resolves_everything(tmp_path, monkeypatch):
    d = _folder(tmp_path)
    handmodel.load_rules(d, VOCAB)
    f = d / "00_classes.toml"
    f.write_text(f.read_text().replace('tokens = [" cat", " dog"]', 'tokens = [" cat"]'))
    got = handmodel.load_rules(d, VOCAB)
    assert got.sets.class_members[got.sets.class_ids["animal"]].tolist() == [2]
    _assert_same(got, _fresh(d, tmp_path / "fresh", monkeypatch))


def test_a_doc_or_comment_edit_reuses_the_arrays_with_the_new_text(tmp_path, monkeypatch):
    d = _folder(tmp_path)
    handmodel.load_rules(d, VOCAB)
    f = d / "10_base.toml"
    text = f.read_text().replace("' the' and '.' are common anywhere", "Common tokens anywhere")
    f.write_text("# a comment that moves every line down\n\n" + text)
    c = d / "00_classes.toml"
    c.write_text(c.read_text().replace('doc = "Animals."', 'doc = "Animals (cats and dogs)."'))
    with monkeypatch.context() as m:
        _no_compile(m)
        got = handmodel.load_rules(d, VOCAB)
    i = got.rule_ids.index("prior.common")
    assert got.rule_docs[i].startswith("Common tokens anywhere") and got.rules[i].doc == got.rule_docs[i]
    assert "Animals (cats and dogs)." in got.sets.class_docs
    _assert_same(got, _fresh(d, tmp_path / "fresh", monkeypatch))  # lines moved down by two, too


@pytest.mark.parametrize("what", ["npz", "swapped", "json"])
def test_a_damaged_entry_is_reported_deleted_and_rebuilt(tmp_path, monkeypatch, capsys, what):
    d = _folder(tmp_path)
    first = handmodel.load_rules(d, VOCAB)
    rulecache.flush()
    [npz] = rulecache.cache_root().glob("*.npz")
    if what == "swapped":  # another entry's arrays: a valid zip (its own CRCs pass), not this entry's
        (tmp_path / "other").mkdir()
        other = _folder(tmp_path / "other")
        f = other / "30_extra.toml"
        f.write_text(f.read_text().replace('" dog" = 0.6', '" dog" = 0.65'))
        handmodel.load_rules(other, VOCAB)
        rulecache.flush()
        [b] = [p for p in rulecache.cache_root().glob("*.npz") if p != npz]
        npz.write_bytes(b.read_bytes())
    elif what == "npz":  # one byte of the arrays flipped
        b = bytearray(npz.read_bytes())
        b[len(b) // 2] ^= 0xFF
        npz.write_bytes(bytes(b))
    else:  # a number of a rule changed in the metadata (still valid JSON)
        js = npz.with_suffix(".json")
        js.write_text(js.read_text().replace('"numbers0": [', '"numbers0": [7', 1))
    capsys.readouterr()
    got = handmodel.load_rules(d, VOCAB)
    err = capsys.readouterr().err
    assert "was damaged" in err and "rebuilding" in err, err
    _assert_same(got, first)
    _no_compile(monkeypatch)  # rebuilt: the next load is a clean hit
    _assert_same(handmodel.load_rules(d, VOCAB), first)
    assert "damaged" not in capsys.readouterr().err


def test_the_entry_written_on_a_thread_is_complete_when_the_process_exits(tmp_path):
    """store writes on a non-daemon thread: a process that loads and exits at once still leaves a whole entry
    (the next process gets a hit, not a damaged entry), and what it holds is the ruleset as loaded."""
    import os
    import subprocess
    import sys

    d = _folder(tmp_path)
    env = {**os.environ, "HANDMODEL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    code = (f"import handmodel; from conftest import DOC_VOCAB; handmodel.load_rules({str(d)!r}, DOC_VOCAB)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).parent)
    root = tmp_path / "cache" / "compiled"
    assert len(list(root.glob("*.npz"))) == 1 and len(list(root.glob("*.json"))) == 2  # the entry + its ctx pointer
    assert not list(root.glob(".*tmp*"))


def test_a_stored_entry_is_the_ruleset_as_loaded_not_as_later_changed(tmp_path, monkeypatch):
    """store snapshots what it writes: an array replaced on the loaded ruleset before the thread runs does not
    reach the entry."""
    import threading

    d = _folder(tmp_path)
    gate = threading.Event()
    real = rulecache._write_entry
    monkeypatch.setattr(rulecache, "_write_entry", lambda *a: (gate.wait(10), real(*a)))
    first = handmodel.load_rules(d, VOCAB)
    want = {k: np.array(v, copy=True) for k, v in vars(first.arrays).items()}
    first.arrays.extra_later = np.zeros(3)  # what a later step might add or swap on the namespace
    k0 = next(iter(want))
    setattr(first.arrays, k0, np.full_like(want[k0], 7) if want[k0].size else want[k0])
    gate.set()
    rulecache.flush()
    monkeypatch.setattr(rulecache, "_write_entry", real)
    _no_compile(monkeypatch)
    again = handmodel.load_rules(d, VOCAB)
    assert vars(again.arrays).keys() == want.keys()
    for k, v in want.items():
        assert np.array_equal(getattr(again.arrays, k), v), k


def test_entry_digest_sees_every_number_and_string_but_not_docs(tmp_path):
    from handmodel.rulefile import read_rule_file

    d = _folder(tmp_path)
    f = d / "30_extra.toml"
    base = [rulecache.entry_digest(e) for e in read_rule_file(f)[1]]
    for old, new, same in [('" dog" = 0.6', '" dog" = 0.61', False), ('threshold = 0.3', 'threshold = 1', False),
                           ('" sat" = 0.5', '" ran" = 0.5', False), ('copy = 2.0', 'copy = 2.0\ngroup = "x"', True),
                           ('doc = "A pet now or looked at."', 'doc = "Pets."', True)]:
        f.write_text(EXTRA.replace(old, new))
        got = [rulecache.entry_digest(e) for e in read_rule_file(f)[1]]
        assert (got == base) == same, (old, new)


def _big(tmp: Path) -> Path:
    """A rules folder whose one file is over the parse cache's 20,000-character floor."""
    d = tmp / "big"
    d.mkdir()
    rows = "\n".join(f'[[bigram]]\nid = "b{i}"\ndoc = "row {i} # not a comment"\nnow = " the"\n'
                     f'next = {{ " cat" = {i / 7:.6f}, " dog" = -{i / 9:.6f} }}  # a comment\n' for i in range(300))
    (d / "a.toml").write_text('vocab = "9:10557a0e"\n\n' + rows)
    return d


def test_a_comment_keeps_the_parse_and_finds_the_new_lines(tmp_path, monkeypatch):
    import tomllib

    from handmodel import rulefile

    d = _big(tmp_path)
    first = handmodel.load_rules(d, VOCAB)
    f = d / "a.toml"
    f.write_text("# a new comment line\n\n" + f.read_text().replace("  # a comment", "  # another comment") + "\n# end\n")
    with monkeypatch.context() as m:
        m.setattr(rulefile.tomllib, "loads", lambda *a: (_ for _ in ()).throw(AssertionError("parsed again")))
        got = handmodel.load_rules(d, VOCAB)
    assert got.rule_lines == [n + 2 for n in first.rule_lines]  # the id lines, found in the new text
    _assert_same(got, _fresh(d, tmp_path / "fresh", monkeypatch))
    # '#' inside a string is content: editing after it is an edit, and it shows
    f.write_text(f.read_text().replace('doc = "row 5 # not a comment"', 'doc = "row 5 # edited"'))
    got = handmodel.load_rules(d, VOCAB)
    assert got.rule_docs[5] == "row 5 # edited"
    assert tomllib  # the real parser was used for that


def test_semantic_text_drops_only_comments_and_blank_lines():
    from handmodel.rulefile import _semantic_text

    text = 'a = "x # y"  # c\n\n  # only a comment\nb = \'#\' # c2\r\nc = [1,\n  2] \n'
    assert _semantic_text(text) == 'a = "x # y"\nb = \'#\'\nc = [1,\n  2]'
    assert _semantic_text('a = """x\n\n# y"""\n') is None  # multi-line strings: the text is the key
    assert _semantic_text("a = 1 # bad \x01 control\n") is None  # TOML rejects it: never served from a cache
