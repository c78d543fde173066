"""Every bad input gives a UserError naming file:line and a fix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handmodel import HandModel, UserError, load_rules, vocab_fingerprint

VOCAB = ["<|endoftext|>", " the", " dog", " dogs", " cat", ".", "@"]


def fails(tmp_path: Path, files: dict[str, str], vocab=VOCAB) -> str:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_rules(tmp_path, vocab)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_token_suggests_closest(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = "d"\n[prior.next]\n" cat" = 1.0\n" dgo" = 2.0\n'})
    assert msg.startswith(f"{tmp_path / 'a.toml'}:6: ")
    assert "unknown token ' dgo'" in msg and "did you mean ' dog', ' dogs'?" in msg


def test_missing_leading_space_is_suggested(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[bigram]]\nid = "b"\ndoc = "d"\nnow = "the"\nnext = { " dog" = 1.0 }\n'})
    assert ":4: " in msg and "unknown token 'the'" in msg and "did you mean ' the'" in msg


def test_at_token_needs_escape(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "@" = 1.0 }\n'})
    assert "unknown class '@'" in msg and "written '@@...'" in msg
    (tmp_path / "a.toml").write_text('[[prior]]\nid = "p"\ndoc = "d"\nnext = { "@@" = 1.0 }\n')
    assert load_rules(tmp_path, VOCAB).rules[0].next == [(6, 1.0)]


def test_unknown_class(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[class]]\nid = "animal"\ndoc = "d"\ntokens = [" dog", " cat"]\n\n'
                                     '[[bigram]]\nid = "b"\ndoc = "d"\nnow = "@anmal"\nnext = { "." = 1.0 }\n'})
    assert ":9: " in msg and "unknown class '@anmal'" in msg and "did you mean @animal?" in msg


def test_unknown_head(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[head]]\nid = "prev"\ndoc = "d"\nposition = { 1 = 3.0 }\n\n'
                                     '[[head_out]]\nid = "o"\ndoc = "d"\nhead = "prv"\nsrc = " dog"\nnext = { "." = 1.0 }\n'})
    assert ":9: " in msg and "unknown head 'prv'" in msg and "did you mean 'prev'?" in msg


def test_unknown_head_in_neuron(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[neuron]]\nid = "n"\ndoc = "d"\nattend = { nope = { " dog" = 1.0 } }\nnext = { "." = 1.0 }\n'})
    assert "unknown head 'nope'" in msg and "define it with [[head]]" in msg


def test_duplicate_id_across_files(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "." = 1.0 }\n',
                           "b.toml": '\n[[skip]]\nid = "p"\ndoc = "d"\nearlier = " dog"\nnext = { "." = 1.0 }\n'})
    assert msg.startswith(f"{tmp_path / 'b.toml'}:3: duplicate id 'p' (first used at {tmp_path / 'a.toml'}:2)")


def test_non_finite_number(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnext = { " dog" = inf }\n'})
    assert ":4: " in msg and "not finite" in msg and "-30" in msg


def test_number_written_as_string(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnext = { " dog" = "1.0" }\n'})
    assert "must be a number, got '1.0'" in msg


def test_malformed_toml(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = "d\nnext = { " dog" = 1.0 }\n'})
    assert msg.startswith(f"{tmp_path / 'a.toml'}:3: malformed TOML")


def test_rules_for_a_different_vocabulary(tmp_path):
    msg = fails(tmp_path, {"a.toml": 'vocab = "4096:00000000"\n[[prior]]\nid = "p"\ndoc = "d"\nnext = { " dog" = 1.0 }\n'})
    assert ":1: rules were written for vocabulary 4096:00000000" in msg and vocab_fingerprint(VOCAB) in msg
    (tmp_path / "a.toml").write_text(f'vocab = "{vocab_fingerprint(VOCAB)}"\n[[prior]]\nid = "p"\ndoc = "d"\nnext = {{ " dog" = 1.0 }}\n')
    assert load_rules(tmp_path, VOCAB).rule_ids == ["p"]


def test_unknown_keys(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnxt = { " dog" = 1.0 }\n'})
    assert ":4: " in msg and "unknown key 'nxt'; did you mean 'next'?" in msg
    msg = fails(tmp_path, {"a.toml": '[[priors]]\nid = "p"\ndoc = "d"\n'})
    assert "unknown top-level key 'priors'; did you mean 'prior'?" in msg


def test_missing_doc_and_multiline_doc(tmp_path):
    assert "missing 'doc'" in fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\nnext = { " dog" = 1.0 }\n'})
    assert "one non-empty line" in fails(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = """a\nb"""\nnext = { " dog" = 1.0 }\n'})


def test_bad_regex_and_empty_class(tmp_path):
    assert "bad regex" in fails(tmp_path, {"a.toml": '[[class]]\nid = "c"\ndoc = "d"\npattern = "(["\n'})
    assert "class has no tokens" in fails(tmp_path, {"a.toml": '[[class]]\nid = "c"\ndoc = "d"\npattern = "^zzz"\n'})


def test_class_cycle(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[class]]\nid = "a"\ndoc = "d"\ntokens = ["@b"]\n[[class]]\nid = "b"\ndoc = "d"\ntokens = ["@a"]\n'})
    assert "defined in terms of itself" in msg


def test_bad_position_key(tmp_path):
    msg = fails(tmp_path, {"a.toml": '[[head]]\nid = "h"\ndoc = "d"\nposition = { prev = 3.0 }\n'})
    assert "position key 'prev' is not a distance" in msg


def test_missing_and_empty_rules_folder(tmp_path):
    with pytest.raises(UserError, match="no such rules file or folder"):
        load_rules(tmp_path / "nope", VOCAB)
    with pytest.raises(UserError, match="no .toml rule files"):
        load_rules(tmp_path, VOCAB)


def test_bad_engine_inputs(tmp_path):
    (tmp_path / "a.toml").write_text('[[prior]]\nid = "p"\ndoc = "d"\nnext = { " dog" = 1.0 }\n')
    hm = HandModel(load_rules(tmp_path, VOCAB))
    with pytest.raises(UserError, match="token id 99 is outside this vocabulary"):
        hm.log_probs(np.array([1, 99], dtype=np.int32))
    with pytest.raises(UserError, match=r"ref_logp has shape \(3, 7\), expected \(2, 7\)"):
        hm.stream_metrics([np.array([1, 2], dtype=np.int32)], np.zeros((3, 7), np.float32))
    with pytest.raises(UserError, match="NaN"):
        hm.stream_metrics([np.array([1, 2], dtype=np.int32)], np.full((2, 7), np.nan, np.float32))
    with pytest.raises(UserError, match="mask must be a bool array of shape"):
        hm.log_probs(np.array([1], dtype=np.int32), mask=np.ones(3, bool))


# -- head_out `copy` ---------------------------------------------------------------------------------
COPY_HEAD = '[[head]]\nid = "prev"\ndoc = "d"\nposition = { 1 = 3.0 }\n\n'


@pytest.mark.parametrize("value, what", [('"1.5"', "'copy' must be a number, got '1.5'"),
                                         ("true", "'copy' must be a number, got True"),
                                         ("{ x = 1 }", "'copy' must be a number"),
                                         ("nan", "'copy' is nan (not finite)"),
                                         ("-inf", "'copy' is -inf (not finite)")])
def test_copy_must_be_a_finite_number(tmp_path, value, what):
    msg = fails(tmp_path, {"a.toml": COPY_HEAD + '[[head_out]]\nid = "o"\ndoc = "copies the attended token"\n'
                                     f'head = "prev"\nsrc = "@all"\ncopy = {value}\n'})
    assert msg.startswith(f"{tmp_path / 'a.toml'}:11: head_out 'o': "), msg  # the line of `copy = ...`
    assert what in msg, msg


def test_head_out_needs_next_or_copy(tmp_path):
    msg = fails(tmp_path, {"a.toml": COPY_HEAD + '[[head_out]]\nid = "o"\ndoc = "d"\nhead = "prev"\nsrc = " dog"\n'})
    assert msg.startswith(f"{tmp_path / 'a.toml'}:7: head_out 'o': needs 'next'"), msg
    assert "'copy'" in msg and "docs/rules.md" in msg
    # either one alone is enough; copy counts as one number
    (tmp_path / "a.toml").write_text(COPY_HEAD + '[[head_out]]\nid = "o"\ndoc = "d"\nhead = "prev"\nsrc = " dog"\ncopy = 2\n'
                                     '[[head_out]]\nid = "o2"\ndoc = "d"\nhead = "prev"\nsrc = " dog"\ncopy = -1.0\n'
                                     'next = { "." = 1.0, " cat" = 0.5 }\n')
    r = load_rules(tmp_path, VOCAB)
    assert [x.copy for x in r.rules[1:]] == [2.0, -1.0] and list(r.rule_numbers) == [1, 1, 3]
    assert r.rules[1].next == []


# -- [[weights]]: weighted token sets ----------------------------------------------------------------
WSET = '[[weights]]\nid = "name"\ndoc = "d"\ntokens = { " dog" = 1.0, " cat" = 0.5 }\n'  # lines 1-4


@pytest.mark.parametrize("text, line, kind, key", [
    ('[[class]]\nid = "c"\ndoc = "d"\ntokens = [" the", "@name"]\n', 8, "class 'c'", "'tokens'"),
    ('[[class]]\nid = "c"\ndoc = "d"\ntokens = [" the", " dog"]\nexcept = ["@name"]\n', 9, "class 'c'", "'except'"),
    ('[[head]]\nid = "h"\ndoc = "d"\n[[head_out]]\nid = "o"\ndoc = "d"\nhead = "h"\nsrc = "@name"\nnext = { "." = 1.0 }\n',
     12, "head_out 'o'", "'src'"),
    ('[[bigram]]\nid = "b"\ndoc = "d"\nnow = "@name"\nnext = { "." = 1.0 }\n', 8, "bigram 'b'", "'now'"),
    ('[[bigram]]\nid = "b"\ndoc = "d"\nrows = { "@name" = { "." = 1.0 } }\n', 8, "bigram 'b'", "'rows'"),
    ('[[skip]]\nid = "s"\ndoc = "d"\nearlier = "@name"\nnext = { "." = 1.0 }\n', 8, "skip 's'", "'earlier'"),
    ('[[neuron]]\nid = "n"\ndoc = "d"\npresent = { "@name" = 1.0 }\nnext = { "." = 1.0 }\n', 8, "neuron 'n'", "'present'"),
    ('[[head]]\nid = "h"\ndoc = "d"\nposition = { 1 = 1.0 }\nscore = [{ src = "@name", w = 1.0 }]\n', 9, "head 'h'", "score 'src'"),
    ('[[weights]]\nid = "w2"\ndoc = "d"\ntokens = { " the" = 1.0, "@name" = 1.0 }\n', 8, "weights 'w2'", "'tokens'"),
])
def test_weighted_set_where_a_plain_set_is_needed(tmp_path, text, line, kind, key):
    msg = fails(tmp_path, {"a.toml": WSET + text})
    assert msg == (f"{tmp_path / 'a.toml'}:{line}: {kind}: '@name' is a weighted set ([[weights]]); {key} needs a plain "
                   "set of tokens; use a [[class]] there (weighted sets go in next/now/attend tables)"), msg


@pytest.mark.parametrize("tokens, what", [("{}", "'tokens' is empty"),
                                          ('{ " dog" = "1.0" }', "must be a number, got '1.0'"),
                                          ('{ " dog" = nan }', "is nan (not finite)"),
                                          ('[" dog", " cat"]', "'tokens' must be a table")])
def test_weighted_set_tokens_must_be_a_table_of_numbers(tmp_path, tokens, what):
    msg = fails(tmp_path, {"a.toml": f'[[prior]]\nid = "p"\ndoc = "d"\nnext = {{ "." = 1.0 }}\n\n'
                                     f'[[weights]]\nid = "w"\ndoc = "d"\ntokens = {tokens}\n'})
    assert msg.startswith(f"{tmp_path / 'a.toml'}:9: weights 'w': "), msg
    assert what in msg and "; " in msg, msg


def test_unknown_reference_suggests_a_weighted_set(tmp_path):
    msg = fails(tmp_path, {"a.toml": WSET + '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "@nmae" = 1.0 }\n'})
    assert msg.startswith(f"{tmp_path / 'a.toml'}:8: prior 'p': unknown class '@nmae'"), msg
    assert "did you mean @name?" in msg


def test_weighted_set_is_not_a_rule(tmp_path):
    """No group, check or next of its own; it shares the id namespace with rules and classes."""
    msg = fails(tmp_path, {"a.toml": WSET + '[[prior]]\nid = "name"\ndoc = "d"\nnext = { "." = 1.0 }\n'})
    assert ":6: duplicate id 'name'" in msg
    msg = fails(tmp_path, {"a.toml": '[[weights]]\nid = "w"\ndoc = "d"\ngroup = "g"\ntokens = { " dog" = 1.0 }\n'})
    assert ":4: weights 'w': unknown key 'group'" in msg
