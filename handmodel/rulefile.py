"""Reading rule files: TOML text -> checked entries that still remember where they were written.

tomllib parses (fast, strict); it forgets line numbers, so we recover them by scanning the text for
each rule's `id = "..."` line. That scan also gives the order of rules inside a file (tomllib groups
`[[bigram]]` and `[[head]]` tables by kind, losing their interleaving). Finer locations (the line of
a bad token) are searched for only when an error is raised, so the happy path stays fast.

Over 400 lines: the parse cache (JSON, keyed by the text without comments) sits beside the parser it stands in for.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import tomlblocks
from .errors import UserError

# Rule kinds, the keys each may have, and the keys it must have. `class` and `weights` (a weighted token
# set) are not rules (no effect of their own, not in the ledger) but share the id namespace.
KEYS: dict[str, set[str]] = {
    "class": {"id", "doc", "tokens", "pattern", "except"},
    "weights": {"id", "doc", "tokens"},
    "prior": {"id", "doc", "group", "next", "check"},
    "bigram": {"id", "doc", "group", "now", "next", "rows", "check"},
    "head": {"id", "doc", "group", "position", "score", "check"},
    "head_out": {"id", "doc", "group", "head", "src", "now", "next", "copy", "check"},
    "skip": {"id", "doc", "group", "earlier", "now", "next", "check"},
    "neuron": {"id", "doc", "group", "threshold", "now", "present", "attend", "next", "check"},
}
# `check = { margin = 0.5, fraction = 0.8, ... }` on a rule: the claim `handmodel check-rules` tests
# against the reference (verify/claims/, docs/claims.md). A flat table of numbers/strings; the engine ignores it.
REQUIRED: dict[str, tuple[str, ...]] = {
    "class": ("id", "doc"),
    "weights": ("id", "doc", "tokens"),
    "prior": ("id", "doc", "next"),
    "bigram": ("id", "doc"),
    "head": ("id", "doc"),
    "head_out": ("id", "doc", "head", "src"),  # and `next` and/or `copy` (check_entry)
    "skip": ("id", "doc", "earlier", "next"),
    "neuron": ("id", "doc", "next"),
}
NOT_RULES = ("class", "weights")  # kinds that define token sets: no ledger row, no mask entry, no claim
TOP_KEYS = {"group", "vocab"} | set(KEYS)
ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
# One left-to-right scan: an `id = "..."` key, or a string or comment stepped over whole (so `id =` written
# inside a comment or a doc string is never taken for a rule's id). At each position the alternatives are
# tried in order: the id key first, then the things it must not be confused with.
_ID_SCAN = re.compile(r'''
    (?<![^\s{,])(?:id|"id"|'id')[ \t]*=[ \t]*(?:"((?:[^"\\\n]|\\.)*)"|'([^'\n]*)')
    |"""(?:[^"\\]|\\[\s\S]|"(?!""))*"""+
    |\'\'\'[\s\S]*?\'\'\'+
    |"(?:[^"\\\n]|\\.)*"
    |'[^'\n]*'
    |\#[^\n]*
''', re.X)
MAX_NUMBER = 1e6  # |number| bound: beyond any useful logit, far below float32 overflow when summed
MAX_DEPTH = 64  # nesting deeper than this is never a rule file: such parses are not cached
_HEADER = re.compile(r"^\s*\[\[?\s*([^\]\s]+)")


@dataclass
class RuleFile:
    path: Path
    text: str
    data: dict
    group: str
    vocab: str | None
    id_lines: dict[str, list[int]] = field(default_factory=dict)
    _lines: list[str] | None = None

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = self.text.splitlines()
        return self._lines


@dataclass
class Entry:
    """One `[[kind]]` table as written, with enough context to point at it."""
    kind: str
    body: dict
    file: RuleFile
    line: int  # line of its `id = ...` (1-based)
    nth_same_id: int = 0  # 0 for the first table with this id in the file, 1 for a duplicate, ...

    @property
    def id(self) -> str:
        return self.body["id"]

    def where(self, *needles: str) -> str:
        """`file:line` of the first needle found inside this entry's table (else of its id)."""
        return f"{self.file.path}:{self.find_line(*needles)}"

    def find_line(self, *needles: str) -> int:
        lines = self.file.lines
        start = self.line - 1
        while start > 0 and not _HEADER.match(lines[start]) and "{" not in lines[start]:
            start -= 1  # back to this table's header (keys may precede `id`)
        end = self.line
        while end < len(lines):
            m = _HEADER.match(lines[end])
            if m and not m.group(1).startswith(self.kind + "."):
                break
            end += 1
        for needle in needles:
            for i in range(start, end):
                if needle in lines[i] and not lines[i].lstrip().startswith("#"):
                    return i + 1
        return self.line

    def fail(self, what: str, fix: str, *needles: str) -> UserError:
        return UserError(f"{self.where(*needles)}: {self.kind} '{self.id}': {what}; {fix}")


def quoted(s: str) -> tuple[str, ...]:
    """How a string is likely spelled in TOML, for locating it."""
    return (json.dumps(s, ensure_ascii=False), f"'{s}'", s) if s else ('""',)


def _decode_line(e: tomllib.TOMLDecodeError) -> int:
    m = re.search(r"at line (\d+)", str(e))
    return int(m.group(1)) if m else 1


def _parse(path: Path, text: str) -> tuple[dict, dict[str, list[int]]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise UserError(f"{path}:{_decode_line(e)}: malformed TOML ({msg}); fix the syntax there "
                        "(strings in double quotes, one key per line, [[kind]] headers)") from None
    except RecursionError:
        raise UserError(f"{path}:1: arrays/tables nested too deep; a rule file never needs that") from None
    return data, _id_lines(text)


def _id_lines(text: str) -> dict[str, list[int]]:
    id_lines: dict[str, list[int]] = {}
    line, last = 1, 0
    for m in _id_keys(text):
        line += text.count("\n", last, m.start())
        last = m.start()
        val = m.group(1)
        if val is not None:
            try:
                val = json.loads(f'"{val}"')
            except json.JSONDecodeError:
                pass
        else:
            val = m.group(2)
        id_lines.setdefault(val, []).append(line)
    return id_lines


def _id_keys(text: str):
    """The `id = ...` key matches of _ID_SCAN, in order. Without multi-line strings every string and
    comment ends on its line, so only the lines holding a candidate `id =` need the full scan (twice as
    fast on big files as scanning every string)."""
    if '"""' in text or "\'\'\'" in text:
        yield from (m for m in _ID_SCAN.finditer(text) if m.lastindex is not None)
        return
    done = -1
    for c in _ID_CANDIDATE.finditer(text):
        start = text.rfind("\n", 0, c.start()) + 1
        if start <= done:
            continue  # this line was scanned already
        end = text.find("\n", c.end())
        done = end = len(text) if end < 0 else end
        yield from (m for m in _ID_SCAN.finditer(text, start, end) if m.lastindex is not None)


_ID_CANDIDATE = re.compile(r"""\bid["']?[ \t]*=""")
PARSE_CACHE_VERSION = 3  # 1 was a pickle: never read again (unpickling runs code a cache writer chose); 3: keyed
# by the text without comments and blank lines (_semantic_text), id lines recomputed when the text differs
_LINE_SCAN = re.compile(r'''"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|(\#.*)''')
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _semantic_text(text: str) -> str | None:
    """The text without comments, trailing blanks and blank lines: what tomllib reads from it, so a comment
    added anywhere still finds the parse. None when a line-by-line view is not safe: multi-line strings (a
    blank line or '#' inside one is content), or a comment TOML would reject (control characters)."""
    if '"""' in text or "'''" in text:
        return None
    out = []
    for line in text.split("\n"):
        if "#" in line:
            for m in _LINE_SCAN.finditer(line):
                if m.group(1) is not None:
                    if _CONTROL.search(m.group(1).rstrip("\r")):
                        return None
                    line = line[:m.start()]
                    break
        line = line.rstrip(" \t\r")  # TOML whitespace (and CRLF), nothing else
        if line.strip(" \t"):
            out.append(line)
    return "\n".join(out)


def _plain(x, depth: int = 0) -> bool:
    """True when x holds only what JSON keeps exactly (TOML dates/times are not: such files are not cached)."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(x, dict):
        return all(_plain(v, depth + 1) for v in x.values())
    if isinstance(x, list):
        return all(_plain(v, depth + 1) for v in x)
    return isinstance(x, (str, int, float, bool))


def _read_parse_blob(f: Path, key: str) -> dict | None:
    """A JSON parse-cache entry, or None when absent or not exactly what we wrote."""
    try:
        blob = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(blob, dict) and blob.get("version") == PARSE_CACHE_VERSION and blob.get("key") == key
            and isinstance(blob.get("data"), dict) and isinstance(blob.get("id_lines"), dict)
            and isinstance(blob.get("text"), str)):
        return None
    if not all(isinstance(v, list) and all(type(n) is int for n in v) for v in blob["id_lines"].values()):
        return None
    return blob


def _read_parse_cache(f: Path, key: str):
    """(data, id_lines, text sha256) from a JSON cache entry, or None (_read_parse_blob)."""
    blob = _read_parse_blob(f, key)
    return None if blob is None else (blob["data"], blob["id_lines"], blob["text"])


_PARSED: dict[str, tuple[dict, dict[str, list[int]], str]] = {}  # key -> parsed; nothing mutates a parse


def _remember(key: str, parsed) -> None:
    if len(_PARSED) >= 32:
        _PARSED.pop(next(iter(_PARSED)))
    _PARSED[key] = parsed


def parse_cache_key(text: str) -> str:
    """The parse cache's key for a file's text: "s" + sha256 of _semantic_text, else sha256 of the text."""
    sem = _semantic_text(text)
    if sem is None:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return "s" + hashlib.sha256(sem.encode("utf-8", "surrogatepass")).hexdigest()


def _parse_cached(path: Path, text: str) -> tuple[dict, dict[str, list[int]]]:
    """tomllib is pure Python (~0.5 s for 100k numbers); big tables rarely change, so parsed files are
    kept on disk ($HANDMODEL_CACHE, default ~/.cache/handmodel) as plain JSON (data only: reading it can
    never run code), keyed by the text without its comments and blank lines (a comment added to a big
    file finds the parse; the `id` lines are found again in the new text). Any cache trouble just means
    parsing again."""
    if len(text) <= 20_000:  # small files parse faster than a cache round trip
        return _parse(path, text)
    root = Path(os.environ.get("HANDMODEL_CACHE", Path.home() / ".cache" / "handmodel")) / "parsed"
    text_sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    same = _PARSED.get(text_sha)  # read twice in one process (load_rules, then the claims' check tables): parsed once
    if same is not None:
        return same[0], same[1]
    key = parse_cache_key(text)
    got = _PARSED.get(key)
    f = root / f"{key}.json"
    if got is None:
        got = _read_parse_cache(f, key)
        if got is not None:
            _remember(key, got)
    if got is not None:
        data, ids, sha = got
        out = (data, ids if sha == text_sha else _id_lines(text))
        _remember(text_sha, out + (text_sha,))
        return out
    blocks = tomlblocks.split(text)
    data = _parse_blocks(root, path, blocks) if blocks is not None else None
    if data is None:
        out, blocks = _parse(path, text), None
    else:
        out = (data, _id_lines(text))
    _remember(key, out + (text_sha,))
    _remember(text_sha, out + (text_sha,))
    if _plain(out[0]):
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": PARSE_CACHE_VERSION, "key": key, "text": text_sha, "data": out[0],
                                       "id_lines": out[1],
                                       "blocks": [[b.sha, b.kind] for b in blocks] if blocks else None}),
                           encoding="utf-8")
            os.replace(tmp, f)
            if blocks:
                at = root / f"at-{_path_key(path)}.json"  # this file's last parse: its blocks serve the next edit
                tmp = at.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": key}), encoding="utf-8")
                os.replace(tmp, at)
        except (OSError, ValueError):
            pass
    return out


def _path_key(path: Path) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _parse_blocks(root: Path, path: Path, blocks: list) -> dict | None:
    """The file's parse from its blocks (handmodel/tomlblocks.py): those unchanged since this path's last parse
    are taken from it, the others parsed alone. None when the file must be parsed whole."""
    old = _old_blocks(root, path)
    parsed = []
    for b in blocks:
        d = old.get(b.sha)
        if d is None:
            try:
                d = tomllib.loads(b.text)
            except (tomllib.TOMLDecodeError, RecursionError):
                return None  # the whole file's parse reports it, with its line in the file
            if not tomlblocks.check(b, d):
                return None
        parsed.append(d)
    return tomlblocks.merge(blocks, parsed)


def _old_blocks(root: Path, path: Path) -> dict[str, dict]:
    """sha256 of a block's text -> its parse, from the last parse cached for this path ({} when none)."""
    try:
        key = json.loads((root / f"at-{_path_key(path)}.json").read_text(encoding="utf-8"))["key"]
        blob = _read_parse_blob(root / f"{key}.json", str(key))
        if blob is None or not isinstance(blob.get("blocks"), list):
            return {}
        data, stored = blob["data"], blob["blocks"]
        blocks = [tomlblocks.Block(kind, "", sha, 0) for sha, kind in stored]
        if not all(isinstance(b.sha, str) and (b.kind is None) == (k == 0) for k, b in enumerate(blocks)):
            return {}
        counts: dict[str, int] = {}
        for b in blocks[1:]:
            counts[b.kind] = counts.get(b.kind, 0) + 1
        if any(not isinstance(data.get(k), list) or len(data[k]) != n for k, n in counts.items()):
            return {}
        return {b.sha: d for b, d in zip(blocks, tomlblocks.unmerge(blocks, data))}
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return {}


def read_rule_file(path: Path) -> tuple[RuleFile, list[Entry]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark (some editors write one) is dropped
    except UnicodeDecodeError:
        raise UserError(f"{path}:1: not UTF-8 text; save the rule file as UTF-8") from None
    data, id_lines = _parse_cached(path, text)
    rf = RuleFile(path=path, text=text, data=data, group=path.stem, vocab=None, id_lines=id_lines)

    def top_line(key: str) -> int:
        for i, line in enumerate(rf.lines):
            if re.match(rf"^\s*{re.escape(key)}\s*=", line) or re.match(rf"^\s*\[\[?\s*{re.escape(key)}\b", line):
                return i + 1
        return 1

    for key, val in data.items():
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key, sorted(TOP_KEYS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(sorted(TOP_KEYS))}"
            raise UserError(f"{path}:{top_line(key)}: unknown top-level key '{key}'; {hint}")
    if "group" in data:
        if not isinstance(data["group"], str) or not data["group"].strip():
            raise UserError(f"{path}:{top_line('group')}: 'group' must be a non-empty string naming this file's rule group")
        rf.group = data["group"]
    if "vocab" in data:
        if not isinstance(data["vocab"], str):
            raise UserError(f"{path}:{top_line('vocab')}: 'vocab' must be a string like \"4096:1a2b3c4d\" (see handmodel.vocab_fingerprint)")
        rf.vocab = data["vocab"]

    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for kind in KEYS:
        if kind not in data:
            continue
        tables = data[kind]
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise UserError(f"{path}:{top_line(kind)}: '{kind}' must be written as [[{kind}]] tables")
        for body in tables:
            rid = body.get("id")
            if not isinstance(rid, str):
                raise UserError(f"{path}:{top_line(kind)}: a [[{kind}]] table has no string 'id'; "
                                f"give every rule a stable id, e.g. id = \"{kind}_1\"")
            k = seen.get(rid, 0)
            seen[rid] = k + 1
            lines = rf.id_lines.get(rid, [])
            line = lines[k] if k < len(lines) else (lines[-1] if lines else top_line(kind))
            entries.append(Entry(kind=kind, body=body, file=rf, line=line, nth_same_id=k))
    entries.sort(key=lambda e: e.line)
    for e in entries:
        check_entry(e)
    return rf, entries


def check_entry(e: Entry) -> None:
    """Shape checks that need no vocabulary: keys, ids, docs."""
    body, kind = e.body, e.kind
    for key in body:
        if key not in KEYS[kind]:
            close = difflib.get_close_matches(key, sorted(KEYS[kind]), n=1) if len(key) <= 100 else []
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(sorted(KEYS[kind]))}"
            raise e.fail(f"unknown key {short(key)}", hint, f"{key} =", key)
    for key in REQUIRED[kind]:
        if key not in body:
            raise e.fail(f"missing '{key}'", f"add {key} = ... (see docs/rules.md, [[{kind}]])")
    if not ID_RE.match(e.id):
        raise e.fail("id must be letters, digits, '_', '.', '-' and start with a letter or '_'",
                     "rename it, e.g. id = \"after_the\"", "id")
    doc = body["doc"]
    if not isinstance(doc, str) or not doc.strip() or "\n" in doc.strip():
        raise e.fail("'doc' must be one non-empty line of English", "say what behaviour the rule captures", "doc")
    if "group" in body and (not isinstance(body["group"], str) or not body["group"].strip()):
        raise e.fail("'group' must be a non-empty string", "name the ledger group, e.g. group = \"bigrams\"", "group")
    if "check" in body:
        chk = body["check"]
        if not isinstance(chk, dict):
            raise e.fail("'check' must be a table of numbers/strings", "write check = { margin = 0.5, fraction = 0.8 }", "check")
        for k, v in chk.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, float) and not math.isfinite(v)):
                raise e.fail(f"check.{k} must be a finite number or a string, got {v!r}",
                             "write check = { margin = 0.5, fraction = 0.8 } (see handmodel check-rules --help)", "check")
    if kind == "bigram":
        has_row = "now" in body or "next" in body
        if "rows" in body and has_row:
            raise e.fail("has both 'rows' and 'now'/'next'", "write one row with now+next, or many with rows", "rows")
        if "rows" not in body and not ("now" in body and "next" in body):
            raise e.fail("needs 'now' and 'next' (one row) or 'rows' (a table)", "see docs/rules.md, [[bigram]]")
    for key in ("next", "rows"):
        if isinstance(body.get(key), dict) and not body[key]:
            raise e.fail(f"'{key}' is an empty table (the rule would do nothing)",
                         f"give it at least one entry, e.g. {key} = {{ \" the\" = 1.0 }}, or delete the rule", f"{key} =", key)
    if kind == "bigram" and isinstance(body.get("rows"), dict):
        for now, row in body["rows"].items():
            if isinstance(row, dict) and not row:
                raise e.fail(f"rows[{short(now)}] is an empty table (the row would do nothing)",
                             "give it at least one next token, or delete the row", *quoted(now))
    if kind == "head_out" and "next" not in body and "copy" not in body:
        raise e.fail("needs 'next' (a table of tokens to boost) or 'copy' (a number: boost the attended token itself) or both",
                     "add next = { \" the\" = 1.0 } or copy = 1.0 (see docs/rules.md, [[head_out]])")
    if kind == "class" and "tokens" not in body and "pattern" not in body:
        raise e.fail("needs 'tokens' or 'pattern'", "list tokens, e.g. tokens = [\" dog\", \" cat\"], or give a regex")
    if kind == "weights" and not table(e, body["tokens"], "tokens"):
        raise e.fail("'tokens' is empty", "give every token (or @class) its weight, e.g. tokens = { \".\" = 1.0, \"!\" = 0.7 }", "tokens")


def number(e: Entry, value, ctx: str, key: str | None = None, needles: tuple[str, ...] | None = None) -> float:
    """A finite float; `ctx[key]` names it in the error (formatted only when failing: hot path)."""
    if (type(value) is float or type(value) is int) and -MAX_NUMBER <= value <= MAX_NUMBER:
        return float(value)
    what = ctx if key is None else f"{ctx}[{short(key)}]"
    if needles is None:
        needles = quoted(key) if key is not None else (ctx,)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise e.fail(f"{what} must be a number, got {short(value)}", "write a plain number like 1.5", *needles)
    if isinstance(value, float) and not math.isfinite(value):
        raise e.fail(f"{what} is {value} (not finite)", "use a finite number; a large negative like -30 stands in for -inf", *needles)
    raise e.fail(f"{what} is {value:g}, beyond ±{MAX_NUMBER:g}", "use a smaller number; a large negative like -30 "
                 "stands in for -inf (log-probabilities are summed in float32)", *needles)


def short(s, n: int = 40) -> str:
    """repr of a (possibly huge) string for an error message: its first n characters and its length."""
    if isinstance(s, str) and len(s) > n:
        return f"{s[:n]!r}… ({len(s):,} characters)"
    return repr(s)


def table(e: Entry, value, key: str) -> dict:
    if not isinstance(value, dict):
        raise e.fail(f"'{key}' must be a table {{\"token or @class\" = number, ...}}", f"write {key} = {{ \" the\" = 1.0 }}", f"{key}")
    return value
