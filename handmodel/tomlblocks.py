"""A rule file parsed block by block: after an edit, tomllib reads only the `[[kind]]` tables that changed.

tomllib is pure Python: ~0.3 s for the shipped bigram file, a sixth of the inner loop's 2 s, spent mostly on
the tables the edit did not touch. A rule file is a preamble (`vocab = ...`, `group = ...`) and then one
`[[kind]]` table after another, and TOML gives each such table its own keys: parsing the file whole equals
parsing the preamble and each table alone and appending each table to its kind's list, in file order. So
`split` cuts the text before every line that is exactly a `[[kind]]` header (a bare name, no dots), and
`merge` puts the parsed blocks together again; each block is parsed once and found again by the sha256 of
its text (rulefile._parse_cached keeps them beside the file's parse).

Whenever the equality might not hold, these return None and the caller parses the whole file with tomllib
(which also gives every syntax error its line in the whole file):
- the text has a multi-line string (a header-like line may be inside one);
- a block parses to anything but one table of its header's kind (a `[table]` or `[[kind.sub]]` header
  that reaches outside its block: an `[[a.b]]` after another kind's table appends to the last `a`);
- the preamble defines a key that is also a block's kind (the whole file would be rejected).
"""
from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

_HEADER = re.compile(r"^\[\[[ \t]*([A-Za-z_][A-Za-z0-9_-]*)[ \t]*\]\][ \t]*(?:#[^\n]*)?\r?$", re.M)


class Block(NamedTuple):
    kind: str | None  # the header's kind; None for the preamble (block 0)
    text: str
    sha: str  # sha256 of text: what a parsed block is found again by
    line: int  # the block's first line in the file (1-based)


def split(text: str) -> list[Block] | None:
    """The preamble and each `[[kind]]` table's text, or None when the file must be parsed whole."""
    if '"""' in text or "'''" in text:
        return None
    cuts = [(m.start(), m.group(1)) for m in _HEADER.finditer(text)]
    starts = [(0, None)] + cuts
    out = []
    line = 1
    for k, (s, kind) in enumerate(starts):
        e = starts[k + 1][0] if k + 1 < len(starts) else len(text)
        t = text[s:e]
        out.append(Block(kind, t, hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest(), line))
        line += t.count("\n")
    return out


def check(block: Block, data: dict) -> bool:
    """True when `data` (the block parsed alone) is what the block adds to the whole file's parse."""
    if block.kind is None:
        return True
    return (len(data) == 1 and isinstance(data.get(block.kind), list) and len(data[block.kind]) == 1
            and isinstance(data[block.kind][0], dict))


def merge(blocks: list[Block], parsed: list[dict]) -> dict | None:
    """The whole file's parse from its blocks' (each passed `check`), or None when the preamble clashes."""
    out = dict(parsed[0])
    kinds = {b.kind for b in blocks[1:]}
    if kinds & out.keys():
        return None
    for b, d in zip(blocks[1:], parsed[1:]):
        out.setdefault(b.kind, []).append(d[b.kind][0])
    return out


def unmerge(blocks: list[Block], data: dict) -> list[dict]:
    """Each block's own parse, taken from the whole file's (the inverse of merge: what is stored)."""
    kinds = {b.kind for b in blocks[1:]}
    parsed = [{k: v for k, v in data.items() if k not in kinds}]
    seen: dict[str, int] = {}
    for b in blocks[1:]:
        j = seen.get(b.kind, 0)
        seen[b.kind] = j + 1
        parsed.append({b.kind: [data[b.kind][j]]})
    return parsed
