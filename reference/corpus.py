"""Reading stories: local files/folders in the shared TinyStories layout, or TinyStories from the hub.

Layout: plain text, each story followed by a line holding only `<|endoftext|>`. A folder means every
`*.txt` in it, sorted by name. Token streams are [EOT] story [EOT] story ...: every story starts
right after an end-of-text token, in training and in evaluation alike.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from handmodel.errors import UserError

EOT = "<|endoftext|>"
HUB_DATASET = "roneneldan/TinyStories"
HUB_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}


def split_stories(text: str) -> list[str]:
    """Stories in a text, in order: split on EOT lines, whitespace-trimmed, empty ones dropped."""
    parts = text.replace("\r\n", "\n").split(EOT)
    return [p.strip() for p in parts if p.strip()]


def read_stories(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"{path}: folder has no *.txt files; point --corpus at a .txt file or a folder of them")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"{path}: no such file or folder; check the --corpus path")
    stories: list[str] = []
    for f in files:
        stories += split_stories(read_text_warn(f))
    if not stories:
        raise UserError(f"{path}: corpus is empty (no story text found); it needs stories separated by {EOT} lines")
    return stories


def read_text_warn(f: Path, warn=None) -> str:
    """A text file as UTF-8; bytes that are not UTF-8 become U+FFFD, with a one-line warning naming the
    file and how many bytes were replaced (never silently: the tokens of those stories change)."""
    raw = f.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="surrogateescape")  # each bad byte -> one lone surrogate U+DC80..U+DCFF
    bad = len(re.findall("[\udc80-\udcff]", text))
    (warn or (lambda m: print(m, file=sys.stderr)))(
        f"warning: {f}: {bad:,} byte{'s' if bad != 1 else ''} not valid UTF-8, read as U+FFFD; "
        "re-save the file as UTF-8 if this is not expected")
    return raw.decode("utf-8", errors="replace")


def cache_dir() -> Path:
    return Path(os.environ.get("HANDMODEL_CACHE", Path.home() / ".cache" / "handmodel"))


def hub_stories(split: str, *, offline_dir: str | Path | None = None) -> list[str]:
    """TinyStories from the Hugging Face hub (needs network once; cached under cache_dir()/hub).

    The hub's V2 files are plain text in exactly the shared layout, so they parse with split_stories.
    `offline_dir` substitutes a folder holding files named as on the hub (used by the tests).
    """
    if split not in HUB_FILES:
        raise UserError(f"unknown split {split!r}; use one of {sorted(HUB_FILES)}")
    fname = HUB_FILES[split]
    if offline_dir is not None:
        local = Path(offline_dir) / fname
        if not local.exists():
            raise UserError(f"{local}: missing; a hub mirror folder must hold {fname}")
        return read_stories(local)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError("--corpus tinystories needs huggingface_hub: pip install huggingface_hub") from None
    try:
        local = hf_hub_download(HUB_DATASET, fname, repo_type="dataset", cache_dir=str(cache_dir() / "hub"))
    except Exception as e:  # network errors come in many types; the message is what matters
        raise UserError(f"could not download {HUB_DATASET}/{fname} from the Hugging Face hub ({type(e).__name__}); "
                        "check the network, or pass --corpus PATH to a local copy") from None
    return read_stories(local)


def resolve_corpus(spec: str | Path, split: str = "train") -> list[str]:
    """`tinystories` means the hub dataset; anything else is a local path."""
    if str(spec) == "tinystories":
        return hub_stories(split)
    return read_stories(spec)


def encode_stories(tokenizer, stories: list[str]) -> list[np.ndarray]:
    """One int32 array per story: [EOT] + story tokens + [EOT]."""
    eot = tokenizer.token_to_id(EOT)
    encs = tokenizer.encode_batch(stories, add_special_tokens=False)
    return [np.array([eot] + e.ids + [eot], dtype=np.int32) for e in encs]


def token_stream(tokenizer, stories: list[str]) -> np.ndarray:
    """The whole corpus as one stream [EOT] s1 [EOT] s2 ... [EOT] (int32)."""
    seqs = encode_stories(tokenizer, stories)
    return np.concatenate([s[:-1] for s in seqs] + [seqs[-1][-1:]]).astype(np.int32)


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
