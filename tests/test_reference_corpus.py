"""Corpus loading: the shared layout (files and folders), the hub path parsed from a local mirror, the
token stream, and the errors for missing or empty corpora."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from handmodel.errors import UserError
from reference.corpus import EOT, HUB_FILES, encode_stories, hub_stories, read_stories, resolve_corpus, split_stories, token_stream
from reference.tokenizer import train_tokenizer


def test_split_stories_trims_and_drops_empties():
    text = f"\n  First story.\nSecond line.\n{EOT}\n\n{EOT}\r\nSecond “story” 🙂\r\n{EOT}\n   \n"
    assert split_stories(text) == ["First story.\nSecond line.", "Second “story” 🙂"]
    assert split_stories("no separator at all") == ["no separator at all"]
    assert split_stories(f"{EOT}\n{EOT}") == []


def test_read_a_file_and_a_folder_in_name_order(tmp_path, story_maker):
    a, b = story_maker(3, seed=10), story_maker(2, seed=11)
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("".join(f"{s}\n{EOT}\n" for s in b), encoding="utf-8")
    (d / "a.txt").write_text("".join(f"{s}\n{EOT}\n" for s in a), encoding="utf-8")
    (d / "notes.md").write_text(f"not a story\n{EOT}\n")
    assert read_stories(d / "a.txt") == a
    assert read_stories(d) == a + b
    assert resolve_corpus(d) == a + b


def test_missing_corpus_path(tmp_path):
    with pytest.raises(UserError, match=r"nope\.txt: no such file or folder; check the --corpus path"):
        read_stories(tmp_path / "nope.txt")


def test_folder_without_text_files(tmp_path):
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(UserError, match=r"folder has no \*\.txt files; point --corpus at a \.txt file or a folder of them"):
        read_stories(tmp_path)


@pytest.mark.parametrize("content", ["", "   \n\n", f"{EOT}\n{EOT}\n"])
def test_empty_corpus(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(UserError, match=r"empty\.txt: corpus is empty \(no story text found\); it needs stories separated by <\|endoftext\|> lines"):
        read_stories(p)


def _write_hub_file(path, stories):
    # The hub's TinyStoriesV2 files: plain UTF-8 text, every story followed by a line "<|endoftext|>".
    path.write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")


def test_hub_stories_parses_a_local_mirror_in_the_hub_format(tmp_path, story_maker):
    train, valid = story_maker(5, seed=20), story_maker(3, seed=21)
    assert set(HUB_FILES) == {"train", "valid"}
    assert HUB_FILES["train"] == "TinyStoriesV2-GPT4-train.txt" and HUB_FILES["valid"] == "TinyStoriesV2-GPT4-valid.txt"
    _write_hub_file(tmp_path / HUB_FILES["train"], train)
    _write_hub_file(tmp_path / HUB_FILES["valid"], valid)
    assert hub_stories("train", offline_dir=tmp_path) == train
    assert hub_stories("valid", offline_dir=tmp_path) == valid


def test_hub_stories_errors(tmp_path):
    with pytest.raises(UserError, match=r"unknown split 'test'; use one of \['train', 'valid'\]"):
        hub_stories("test", offline_dir=tmp_path)
    with pytest.raises(UserError, match=r"TinyStoriesV2-GPT4-valid\.txt: missing; a hub mirror folder must hold TinyStoriesV2-GPT4-valid\.txt"):
        hub_stories("valid", offline_dir=tmp_path)
    (tmp_path / HUB_FILES["train"]).write_text(f"{EOT}\n")
    with pytest.raises(UserError, match="corpus is empty"):
        hub_stories("train", offline_dir=tmp_path)


def test_token_stream_is_eot_separated_and_round_trips(story_maker):
    stories = story_maker(6, seed=30)
    tok = train_tokenizer(stories, vocab_size=280)
    eot = tok.token_to_id(EOT)
    seqs = encode_stories(tok, stories)
    assert all(s.dtype == np.int32 and s[0] == eot and s[-1] == eot for s in seqs)
    stream = token_stream(tok, stories)
    assert stream.dtype == np.int32
    assert stream[0] == eot and stream[-1] == eot
    assert int((stream == eot).sum()) == len(stories) + 1
    assert len(stream) == sum(len(s) - 1 for s in seqs) + 1
    pieces = np.split(stream, np.flatnonzero(stream == eot))[1:-1]
    assert [tok.decode(p[1:].tolist()) for p in pieces] == stories


def test_hub_download_path_with_a_stand_in_client(tmp_path, monkeypatch, story_maker):
    """The online path (`--corpus tinystories`) asks huggingface_hub for the dataset file and parses it; here a
    stand-in module plays the hub, serving a file written in the hub's format."""
    import types

    stories = story_maker(4, seed=40)
    served = tmp_path / "served"
    served.mkdir()
    _write_hub_file(served / HUB_FILES["valid"], stories)
    calls = []

    def fake_download(repo_id, filename, *, repo_type, cache_dir):
        calls.append((repo_id, filename, repo_type, cache_dir))
        return str(served / filename)

    monkeypatch.setenv("HANDMODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    assert resolve_corpus("tinystories", "valid") == stories
    assert calls == [("roneneldan/TinyStories", "TinyStoriesV2-GPT4-valid.txt", "dataset", str(tmp_path / "cache" / "hub"))]

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    with pytest.raises(UserError, match=r"^could not download roneneldan/TinyStories/TinyStoriesV2-GPT4-train\.txt from the "
                                        r"Hugging Face hub \(ConnectionError\); check the network, or pass --corpus PATH"):
        hub_stories("train")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(UserError, match=r"^--corpus tinystories needs huggingface_hub: pip install huggingface_hub$"):
        hub_stories("train")
