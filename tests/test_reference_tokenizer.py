"""Byte-level BPE tokenizer: round trips (typographic quotes, emoji, unseen scripts), the special token,
the torch-free vocabulary reader, and the errors for bad tokenizer files."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handmodel.errors import UserError
from handmodel.vocab import load_vocab
from reference.corpus import EOT, read_stories
from reference.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(story_maker):
    return train_tokenizer(story_maker(200, seed=3), vocab_size=300)


def roundtrip(tok, text: str) -> str:
    return tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)


def test_vocab_size_and_the_special_token(tok):
    assert tok.get_vocab_size() == 300
    eot = tok.token_to_id(EOT)
    assert eot is not None
    assert tok.encode(f"Hi.{EOT}Bye.", add_special_tokens=False).ids.count(eot) == 1  # one id, never split


@pytest.mark.parametrize("text", [
    "Once upon a time, Tom said, “Can I play too?” Lily’s cat was happy 🙂.",
    "“Quotes” ‘single’ — dash … ellipsis",
    "emoji 🐶🌞🎈 and a family 👨‍👩‍👧 and a flag 🇫🇷",
    "unseen scripts: 日本語, Ελληνικά, العربية",
    "  leading spaces\n\nblank lines\ttabs\r\nCRLF  ",
    f"two stories{EOT}glued together",
    "",
])
def test_round_trip_is_exact(tok, text):
    assert roundtrip(tok, text) == text


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(max_size=60))
def test_round_trip_any_text(tok, text):
    assert roundtrip(tok, text) == text


def test_training_is_deterministic(story_maker):
    a = train_tokenizer(story_maker(100, seed=4), vocab_size=290)
    b = train_tokenizer(story_maker(100, seed=4), vocab_size=290)
    assert a.to_str() == b.to_str()


def test_saved_json_reloads_identically(tok, tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(tok.to_str())
    again = load_tokenizer(p)
    text = "Mia said, “Let’s go!” 🎈"
    assert again.encode(text).ids == tok.encode(text).ids


def test_vocab_reader_names_every_id(tok, tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(tok.to_str())
    vocab = load_vocab(p)
    assert len(vocab) == tok.get_vocab_size() == len(set(vocab))
    assert vocab[tok.token_to_id(EOT)] == EOT
    ids = tok.encode("Tom went to the park.", add_special_tokens=False).ids
    assert "".join(vocab[i] for i in ids) == "Tom went to the park."
    # a token holding only part of a multi-byte character gets an escaped name like "<0xE2>"
    partial = [v for v in vocab if v.startswith("<0x")]
    assert partial and all(re.fullmatch(r"(<0x[0-9A-F]{2}>)+", v) for v in partial)
    quote = "".join(vocab[i] for i in tok.encode("“", add_special_tokens=False).ids)
    assert quote in ("“", "<0xE2><0x80><0x9C>") or re.fullmatch(r"(<0x[0-9A-F]{2}>)+", quote)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer\.json: tokenizer file not found; a checkpoint folder must contain tokenizer\.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="tokenizer file not found"):
        load_vocab(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("content", ["{", "[]", '{"model": {}}', "not json at all"])
def test_corrupt_tokenizer_file(tmp_path, content):
    p = tmp_path / "tokenizer.json"
    p.write_text(content)
    with pytest.raises(UserError, match=r"not a readable tokenizers JSON \(.*\); retrain or re-save it") as e:
        load_tokenizer(p)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a tokenizers JSON file") as e:
        load_vocab(p)
    assert "\n" not in str(e.value)


def test_shipped_tokenizer_round_trips_valid_txt(shared_corpus):
    """The shipped tokenizer (trained on train.txt) reproduces every held-out story exactly."""
    from reference.checkpoint import DEFAULT_DIR

    tok = load_tokenizer(DEFAULT_DIR / "tokenizer.json")
    assert tok.token_to_id(EOT) is not None
    stories = read_stories(shared_corpus / "valid.txt")
    encs = tok.encode_batch(stories, add_special_tokens=False)
    bad = [i for i, (s, e) in enumerate(zip(stories, encs)) if tok.decode(e.ids, skip_special_tokens=False) != s]
    assert not bad, f"{len(bad)} stories of valid.txt do not round-trip, first: {stories[bad[0]][:80]!r}"
    assert sum(len(e.ids) for e in encs) < sum(len(s) for s in stories) / 3  # BPE actually compresses
    vocab = load_vocab(DEFAULT_DIR / "tokenizer.json")
    assert len(vocab) == tok.get_vocab_size()
    assert json.loads((DEFAULT_DIR / "tokenizer.json").read_text())["model"]["type"] == "BPE"
