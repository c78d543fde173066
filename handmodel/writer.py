"""Writing rule files: token strings as TOML keys/strings, number tables, and readable id fragments.

Used by every tool that drafts rules (`handmodel suggest`, the benchmark's generated rulesets), so a
token is spelled the same way everywhere and always reads back as the same token.
"""
from __future__ import annotations

import re

_ESC = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_NAMES = {".": "period", ",": "comma", "!": "bang", "?": "question", ":": "colon", ";": "semicolon",
          "'": "apostrophe", '"': "quote", "\n": "newline", "-": "dash", "(": "paren", ")": "paren_close",
          "<|endoftext|>": "eot", " ": "space", "’": "apostrophe", "“": "open_quote", "”": "close_quote"}


def q(tok: str) -> str:
    """A token as a TOML basic string ('@'-leading tokens are written '@@...', the class escape)."""
    if tok.startswith("@"):
        tok = "@" + tok
    return '"' + "".join(_ESC.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                         for ch in tok) + '"'


def num(v: float) -> str:
    """A number as people read it in a rule file: 3 decimals, no '-0.000'."""
    s = f"{v:.3f}"
    return "0.000" if s == "-0.000" else s


def inline_table(items) -> str:
    """[(key already quoted, number)] -> '{ k = v, ... }'."""
    return "{ " + ", ".join(f"{k} = {num(v)}" for k, v in items) + " }"


def name_part(tok: str) -> str:
    """A token as a fragment of a rule/class id: ' the' -> 'the', '.' -> 'period', ' Lily' -> 'Lily'."""
    s = tok.strip()
    if tok in _NAMES:
        return _NAMES[tok]
    if s in _NAMES:
        return _NAMES[s]
    w = re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")
    if not w:
        w = "u" + "_".join(f"{ord(c):x}" for c in tok[:3])
    if w[0].isdigit():
        w = "n" + w
    return w
