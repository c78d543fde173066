"""Shared pieces of the discovery tools: token lookup with "did you mean", a corpus sample, and one
batched pass of the reference over it that keeps only the arrays a command asks for."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handmodel.errors import UserError

DEFAULT_CORPUS = "../shared/corpus/tinystories/train.txt"
EOT = "<|endoftext|>"


def resolve_token(vocab: list[str], spec: str) -> int:
    """A token given as its readable string (" dog"), a backslash-escaped string ("\\n"), or "#id"."""
    index = {s: i for i, s in enumerate(vocab)}
    if spec in index:
        return index[spec]
    if spec.startswith("#") and spec[1:].isdigit():
        i = int(spec[1:])
        if 0 <= i < len(vocab):
            return i
        raise UserError(f"token id {i} is out of range: this vocabulary has ids 0..{len(vocab) - 1}")
    try:
        unescaped = spec.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        unescaped = spec
    if unescaped in index:
        return index[unescaped]
    near = difflib.get_close_matches(spec, vocab, n=5, cutoff=0.6)
    if not spec.startswith(" ") and " " + spec in index and " " + spec not in near:
        near.insert(0, " " + spec)
    hint = ("; did you mean " + ", ".join(repr(n) for n in near) + "?") if near else ""
    raise UserError(f"token {spec!r} is not in the vocabulary{hint} (quote leading spaces, e.g. \" dog\"; "
                    "or give an id as #123)")


def show(tok: str) -> str:
    """A token as printed in tables: repr-like, so leading spaces and newlines are visible."""
    return repr(tok)[1:-1] if tok.strip() != tok or "\n" in tok else tok


def read_sample(path: str | Path, max_chars: int) -> list[str]:
    """Stories from the first `max_chars` characters of a corpus file (a sample: commands stay fast)."""
    from reference.corpus import read_stories, split_stories

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: corpus not found; pass --train-corpus PATH (a .txt file of stories separated by {EOT} lines)")
    if p.is_dir():
        return read_stories(p)
    with open(p, encoding="utf-8", errors="replace") as f:
        text = f.read(max_chars)
    stories = split_stories(text)
    if len(text) == max_chars and len(stories) > 1:
        stories = stories[:-1]  # the last story was cut off mid-way
    if not stories:
        raise UserError(f"{p}: no stories found in the first {max_chars} characters")
    return stories


def sample_windows(oracle, corpus: str | Path, max_tokens: int, window: int = 256,
                   max_chars: int | None = None) -> np.ndarray:
    """[n, T] int64 windows of the corpus stream ([EOT] s1 [EOT] s2 ...), T = min(window, n_ctx)."""
    from reference.corpus import token_stream

    stories = read_sample(corpus, max_chars or max(20_000, max_tokens * 6))
    stream = token_stream(oracle.tokenizer, stories)
    T = min(window, oracle.cfg.n_ctx, len(stream))
    n = max(1, min(len(stream) // T, max(1, max_tokens // T)))
    return stream[: n * T].reshape(n, T).astype(np.int64)


@dataclass
class Pass:
    """Arrays from one pass of the reference over windows [B, T]; each key holds a concatenation over batches."""
    tokens: np.ndarray
    data: dict = field(default_factory=dict)


def run_pass(oracle, windows: np.ndarray, keep, batch: int = 8) -> Pass:
    """Run the model over `windows` in batches; `keep(cache, tokens) -> dict of arrays` picks what to store."""
    import torch

    out: dict[str, list] = {}
    with torch.inference_mode():
        for s in range(0, len(windows), batch):
            b = torch.from_numpy(windows[s : s + batch])
            cache: dict = {}
            oracle.model(b, cache=cache)
            for k, v in keep(cache, b).items():
                out.setdefault(k, []).append(v.numpy() if hasattr(v, "numpy") else np.asarray(v))
    return Pass(windows, {k: np.concatenate(v) for k, v in out.items()})


def typical_ln_scale(oracle, windows: np.ndarray) -> float:
    p = run_pass(oracle, windows[: 4], lambda c, b: {"s": c["ln_final.scale"][..., 0]})
    return float(np.median(p.data["s"]))


def context_text(oracle, toks: np.ndarray, i: int, before: int = 8, after: int = 1) -> str:
    """Text around position i with the current token in [brackets] and the next `after` tokens after '|'."""
    v = oracle.vocab
    left = "".join(v[t] for t in toks[max(0, i - before) : i])
    nxt = "".join(v[t] for t in toks[i + 1 : i + 1 + after])
    return (left + "[" + v[toks[i]] + "]" + "|" + nxt).replace("\n", "⏎")
