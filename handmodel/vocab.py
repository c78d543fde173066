"""Token strings for a BPE tokenizer JSON, read without torch and without the `tokenizers` runtime.

The hand model only ever sees a vocabulary: a list of strings, index = token id. Byte-level BPE stores
each token as a string of stand-in characters (GPT-2's byte-to-unicode map, e.g. 'Ġ' for a space);
we turn it back into the text it stands for (" the", "\\n"). A token that is not valid UTF-8 on its
own (one byte of a multi-byte character such as a typographic quote) is spelled with escapes,
"<0xE2>", so every token has a unique, printable, writable name.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import UserError


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable-unicode table, as used by ByteLevel pre-tokenizers.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(raw: str) -> bytes | None:
    """Bytes a byte-level token stands for, or None if `raw` is not a byte-level token (e.g. a special)."""
    table = _unicode_to_byte()
    try:
        return bytes(table[ch] for ch in raw)
    except KeyError:
        return None


def readable(raw: str) -> str:
    b = token_bytes(raw)
    if b is None:
        return raw
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{x:02X}>" for x in b)


def load_vocab(tokenizer_json: str | Path) -> list[str]:
    """Readable token strings, index = id, from a `tokenizers` JSON file."""
    path = Path(tokenizer_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model_vocab: dict[str, int] = data["model"]["vocab"]
    except FileNotFoundError:
        raise UserError(f"{path}: tokenizer file not found; pass the tokenizer.json saved next to the checkpoint") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a tokenizers JSON file ({e}); re-save it with Tokenizer.save()") from None
    ids = dict(model_vocab)
    for t in data.get("added_tokens", []):
        ids[t["content"]] = t["id"]
    size = max(ids.values()) + 1
    out: list[str | None] = [None] * size
    for raw, i in ids.items():
        out[i] = raw if any(t["content"] == raw for t in data.get("added_tokens", [])) else readable(raw)
    if any(s is None for s in out):
        raise UserError(f"{path}: token ids are not contiguous; this tokenizer cannot be used as a vocabulary")
    if len(set(out)) != len(out):
        raise UserError(f"{path}: two tokens read as the same string; vocabulary names must be unique")
    return out  # type: ignore[return-value]
