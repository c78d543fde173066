"""A disk cache of compiled rulesets ($HANDMODEL_CACHE/compiled, default ~/.cache/handmodel/compiled).

Resolving and compiling ~1,400 rules costs seconds; the rules rarely change between two runs, and an edit
usually touches one rule. So load_rules keys what it compiles on what the compiled form depends on: the
parsed content of every entry without its doc, group and check (so a comment, a doc, a group name or a
rule moved down a line changes nothing), the vocabulary and the compiler's own source. Docs, files,
lines and groups always come fresh from the parsed files.

- `context` key: vocabulary + compiler source + every [[class]]/[[weights]] entry + the head ids: what
  resolving one rule depends on besides its own entry (its token sets and head numbers).
- `full` key: context + each rule's entry digest, in ledger order: the whole CompiledRules.

An entry is `<full>.npz` (the arrays, the token sets' members and weights) plus `<full>.json` (the resolved
rules, the set names, the npz's size and CRC-32, and a sha256 of its own payload), written through temp
files and os.replace, the .json last. A read checks everything; anything off is reported on stderr,
deleted and rebuilt. `ctx-<context>.json` names the last entry built or read in that context: after an
edit to one rule, the other rules' resolved forms are taken from it (only the edited rule is resolved
again; an edit of numbers only patches its arrays, compiled._patched_arrays, else they are rebuilt). Nothing is unpickled (np.load(allow_pickle=False), JSON): a bad writer can only
cause a rebuild or, at worst, wrong numbers, never run code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .resolve import Rule, TokenSets

CACHE_VERSION = 1
MAX_ENTRIES = 6  # entries kept (~20 MB each for the shipped rules); the oldest go first
MAX_DIGEST_FILES = 256  # per-file entry digests kept (small)
SKIP_KEYS = ("doc", "group", "check")  # entry keys the compiled form does not read
_SOURCES = ("compiled.py", "resolve.py", "rulefile.py", "rulecache.py")
# Rule fields restored from the cache; doc/file/line/group are always taken fresh from the entries
_FRESH = ("doc", "file", "line", "group")
_FIELDS = tuple(f.name for f in dataclasses.fields(Rule) if f.name not in _FRESH)
_SOURCE_SHA: str | None = None


def cache_root() -> Path:
    return Path(os.environ.get("HANDMODEL_CACHE", Path.home() / ".cache" / "handmodel")) / "compiled"


def compiler_sha() -> str:
    global _SOURCE_SHA
    if _SOURCE_SHA is None:
        h = hashlib.sha256()
        for name in _SOURCES:
            h.update((Path(__file__).parent / name).read_bytes())
        _SOURCE_SHA = h.hexdigest()
    return _SOURCE_SHA


def entry_digest(e) -> str:
    """What resolving this entry reads: its kind and body without doc/group/check, in a canonical form
    (every string with its length, every number as its 8 float64 bytes or its int digits: a JSON dump
    costs 3x more, float repr being the slow part)."""
    parts: list[str] = [e.kind]
    nums: list[float] = []
    _canon({k: v for k, v in e.body.items() if k not in SKIP_KEYS}, parts, nums)
    h = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass"))
    h.update(np.array(nums, dtype=np.float64).tobytes())
    return h.hexdigest()[:32]


def _canon(x, parts: list[str], nums: list[float]) -> None:
    t = type(x)
    if t is float:
        parts.append("f")
        nums.append(x)
    elif t is str:
        parts.append(f"s{len(x)}:{x}")
    elif t is dict:
        parts.append(f"d{len(x)}")
        for k, v in x.items():
            parts.append(f"k{len(k)}:{k}")
            if type(v) is float:  # the bulk: {"token" = w} tables
                parts.append("f")
                nums.append(v)
            else:
                _canon(v, parts, nums)
    elif t is list:
        parts.append(f"l{len(x)}")
        for v in x:
            _canon(v, parts, nums)
    else:  # int, bool, TOML dates: repr tells them apart
        parts.append(f"{t.__name__}:{x!r}")


@dataclasses.dataclass
class Keys:
    context: str
    full: str
    rule_keys: list[str]


def keys_of(vocab: list[str], entries: list, set_entries: list, head_ids: list[str], rule_entries: list) -> Keys:
    dig = _digests(entries)
    h = hashlib.sha256(f"{CACHE_VERSION}:{compiler_sha()}".encode())
    h.update("\x00".join(vocab).encode("utf-8"))
    for e in set_entries:
        h.update(dig[id(e)].encode())
    h.update(json.dumps(head_ids).encode())
    context = h.hexdigest()[:32]
    rule_keys = [dig[id(e)] for e in rule_entries]
    full = hashlib.sha256((context + "".join(rule_keys)).encode()).hexdigest()[:32]
    return Keys(context, full, rule_keys)


_FILE_DIGESTS: dict[str, list[str]] = {}  # file text sha256 -> entry_digest of its entries, in order


def _digests(entries: list) -> dict[int, str]:
    """entry_digest per entry (by id()), remembered per file text on disk (digests/<sha256>.json): the
    files that did not change cost a hash of their text."""
    by_file: dict[int, list] = {}
    for e in entries:
        by_file.setdefault(id(e.file), []).append(e)
    root = cache_root() / "digests"
    out: dict[int, str] = {}
    for es in by_file.values():
        h = hashlib.sha256(compiler_sha().encode())  # entry_digest's definition lives in the compiler's source
        h.update(es[0].file.text.encode("utf-8", "surrogatepass"))
        sha = h.hexdigest()
        got = _FILE_DIGESTS.get(sha)
        f = root / f"{sha}.json"
        if got is None:
            try:
                blob = json.loads(f.read_text())
                got = blob["digests"]
                if blob["key"] != sha or blob["check"] != hashlib.sha256("".join(got).encode()).hexdigest():
                    got = None  # damaged: recomputed and rewritten below
            except (OSError, ValueError, KeyError, TypeError):
                got = None
        if got is None or len(got) != len(es):
            got = [entry_digest(e) for e in es]
            try:
                root.mkdir(parents=True, exist_ok=True)
                tmp = root / f".{sha}.tmp{os.getpid()}"
                tmp.write_text(json.dumps({"key": sha, "check": hashlib.sha256("".join(got).encode()).hexdigest(),
                                           "digests": got}))
                os.replace(tmp, f)
            except OSError:
                pass
        if len(_FILE_DIGESTS) >= 64:
            _FILE_DIGESTS.pop(next(iter(_FILE_DIGESTS)))
        _FILE_DIGESTS[sha] = got
        out.update((id(e), d) for e, d in zip(es, got))
    return out


# ---------------------------------------------------------------------------------------------
# (de)serialising: the rules' tables as flat arrays (JSON of 150k numbers reads 5x slower)

_TABLES = {"next": (np.int64, np.float64), "n_now": (np.int64, np.float64), "n_present": (np.int64, np.float64),
           "scores": (np.int64, np.int64, np.float64), "n_attend": (np.int64, np.int64, np.float64)}
_SCALARS = ("id", "kind", "numbers", "head", "now", "src", "copy", "pos_default", "threshold")
assert set(_FIELDS) == set(_TABLES) | set(_SCALARS) | {"rows", "position"}, "a new Rule field must be cached"


def _pack(name: str, lists: list[list[tuple]], dtypes) -> dict[str, np.ndarray]:
    ptr = np.zeros(len(lists) + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=ptr[1:])
    flat = [t for x in lists for t in x]
    out = {f"r_{name}_ptr": ptr}
    for j, dt in enumerate(dtypes):
        out[f"r_{name}_{j}"] = np.array([t[j] for t in flat], dtype=dt)
    return out


def _unpack(z: dict, name: str, n: int) -> list[list[tuple]]:
    ptr = z[f"r_{name}_ptr"].tolist()
    if len(ptr) != n + 1:
        raise ValueError(f"{name}: {len(ptr) - 1} rules, expected {n}")
    cols = []
    j = 0
    while f"r_{name}_{j}" in z:
        cols.append(z[f"r_{name}_{j}"].tolist())
        j += 1
    if any(len(c) != ptr[-1] for c in cols):
        raise ValueError(f"{name}: columns of different lengths")
    flat = list(zip(*cols))
    return [flat[ptr[i]:ptr[i + 1]] for i in range(n)]


def _rules_arrays(rules: list[Rule]) -> dict[str, np.ndarray]:
    out = {}
    for name, dts in _TABLES.items():
        out.update(_pack(name, [getattr(r, name) for r in rules], dts))
    out.update(_pack("pos", [list(r.position.items()) for r in rules], (np.int64, np.float64)))
    out.update(_pack("rownow", [[(now,) for now, _ in r.rows] for r in rules], (np.int64,)))
    out.update(_pack("row", [row for r in rules for _, row in r.rows], (np.int64, np.float64)))
    return out


def _rules_from(z: dict, scalars: list[list], fresh: list[dict] | None) -> list[Rule]:
    """Rules equal to the ones compiled (same types: tuples stay tuples, ints ints, floats floats)."""
    n = len(scalars)
    tables = {name: _unpack(z, name, n) for name in _TABLES}
    pos = _unpack(z, "pos", n)
    rownow = _unpack(z, "rownow", n)
    rows = _unpack(z, "row", sum(len(x) for x in rownow))
    empty = {"doc": "", "file": "", "line": 0, "group": ""}
    out, k = [], 0
    for i, sc in enumerate(scalars):
        d = dict(zip(_SCALARS, sc))
        for name in _TABLES:
            d[name] = tables[name][i]
        d["position"] = dict(pos[i])
        d["rows"] = [(now, rows[k + j]) for j, (now,) in enumerate(rownow[i])]
        k += len(rownow[i])
        out.append(Rule(**d, **(fresh[i] if fresh is not None else empty)))
    return out


def _crc(b: bytes) -> str:
    return f"{zlib.crc32(b):08x}"


@dataclasses.dataclass
class Cached:
    """One cache entry, read back: the resolved rules, the token sets, the arrays, and per rule its entry
    key, its numbers before count_weighted_sets and its semantic digest (compiled.rule_digest)."""
    rules: list[Rule]
    numbers0: list[int]
    rule_keys: list[str]
    digests: list[bytes]
    context: str
    sets: TokenSets
    arrays: SimpleNamespace


_PENDING: list[threading.Thread] = []  # this process's entry writes still running (store)


def flush() -> None:
    """Wait for this process's entry writes. Every read of the cache calls it first, so a process always finds
    what it stored itself."""
    while _PENDING:
        _PENDING.pop().join()


def store(keys: Keys, rules: list[Rule], numbers0: list[int], digests: list[bytes], sets: TokenSets,
          arrays: SimpleNamespace) -> None:
    """Write one entry (best effort: a read-only or full disk just means compiling next time), on a thread: the
    ~20 MB write (~0.3 s) then overlaps the caller's ledger instead of adding to the inner loop. The thread is
    not a daemon (the interpreter waits for it at exit); what it writes is taken here, so later changes to
    `arrays` or `sets` in this process cannot reach the entry."""
    mem = list(sets.class_members)
    snap = dict(arrays=dict(vars(arrays)), rule_arrays=_rules_arrays(rules), members=mem,
                weights=list(sets.class_weights), meta={
                    "version": CACHE_VERSION, "key": keys.full, "context": keys.context,
                    "rule_keys": list(keys.rule_keys), "digests": [d.hex() for d in digests],
                    "numbers0": list(numbers0), "scalars": [[getattr(r, f) for f in _SCALARS] for r in rules],
                    "class_names": list(sets.class_names), "class_entries": list(sets.class_entries),
                    "weighted": [cw is not None for cw in sets.class_weights]})
    t = threading.Thread(target=_write_entry, args=(keys, snap), name="handmodel-rulecache-store")
    _PENDING.append(t)
    t.start()


def _write_entry(keys: Keys, snap: dict) -> None:
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{keys.full}.tmp{os.getpid()}"
        mem = snap["members"]
        ptr = np.zeros(len(mem) + 1, np.int64)
        np.cumsum([len(m) for m in mem], out=ptr[1:])
        w = np.concatenate([np.ones(len(m)) if cw is None else np.asarray(cw, np.float64)
                            for m, cw in zip(mem, snap["weights"])])
        buf = io.BytesIO()
        np.savez(buf, s_ptr=ptr, s_tok=np.concatenate(mem).astype(np.int32), s_w=w, **snap["rule_arrays"],
                 **{"a_" + k: v for k, v in snap["arrays"].items()})
        blob = buf.getvalue()
        meta = {**snap["meta"], "npz": {"bytes": len(blob), "crc32": _crc(blob)}}
        text = json.dumps(meta)
        npz, js = tmp.with_suffix(".npz"), tmp.with_suffix(".json")
        npz.write_bytes(blob)
        js.write_text(hashlib.sha256(text.encode()).hexdigest() + "\n" + text, encoding="utf-8")
        os.replace(npz, root / f"{keys.full}.npz")
        os.replace(js, root / f"{keys.full}.json")  # the commit point: a reader needs both
        ctx = root / f".ctx-{keys.context}.tmp{os.getpid()}"
        ctx.write_text(json.dumps({"key": keys.full}))
        os.replace(ctx, root / f"ctx-{keys.context}.json")
        _prune(root)
    except (OSError, ValueError):
        pass


def _prune(root: Path) -> None:
    entries = sorted(root.glob("*.json"), key=lambda p: p.stat().st_mtime)
    entries = [p for p in entries if not p.name.startswith("ctx-")]
    for p in entries[:-MAX_ENTRIES]:
        for f in (p, p.with_suffix(".npz")):
            f.unlink(missing_ok=True)
    memos = sorted((root / "digests").glob("*.json"), key=lambda p: p.stat().st_mtime)
    for p in memos[:-MAX_DIGEST_FILES]:
        p.unlink(missing_ok=True)
    for p in root.glob("ctx-*.json"):  # pointers to pruned entries
        try:
            if not (root / f"{json.loads(p.read_text())['key']}.json").exists():
                p.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            p.unlink(missing_ok=True)


def _damaged(root: Path, key: str, why: str) -> None:
    """The one line a user sees about a bad entry (the same words as verify's caches), then it goes."""
    print(f"cache entry {root / key}.json was damaged ({why}): rebuilding", file=sys.stderr)
    for f in (root / f"{key}.json", root / f"{key}.npz"):
        try:
            f.unlink()
        except OSError:
            pass


def load(key: str, vocab: list[str], fresh: list[dict] | None, class_docs: list[str] | None) -> Cached | None:
    """The entry `key`, checked, or None (absent, or damaged: reported and deleted). `fresh`: doc, file, line
    and group per rule (None: left empty, for a caller that only reuses some rules)."""
    flush()
    root = cache_root()
    js = root / f"{key}.json"
    if not js.exists():
        return None
    try:
        sha, _, text = js.read_text(encoding="utf-8").partition("\n")
        blob = (root / f"{key}.npz").read_bytes()
        meta = json.loads(text) if sha == hashlib.sha256(text.encode()).hexdigest() else None
        why = None
        if meta is None:
            why = "its metadata fails its checksum"
        elif not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
            why = "not an entry of this cache version"
        elif meta.get("key") != key:
            why = f"it holds the entry of key {str(meta.get('key'))[:32]!r}"
        elif len(blob) != meta["npz"]["bytes"] or _crc(blob) != meta["npz"]["crc32"]:
            why = "its arrays fail their checksum"
        if why is None:
            return _build(meta, blob, vocab, fresh, class_docs)
    except Exception as e:  # noqa: BLE001 -- any unreadable entry is rebuilt, never used
        why = f"unreadable: {type(e).__name__}: {str(e)[:80]}"
    _damaged(root, key, why)
    return None


def _build(meta: dict, blob: bytes, vocab: list[str], fresh: list[dict] | None, class_docs) -> Cached:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrs = {k: z[k] for k in z.files}
    n_sets = len(meta["class_names"])
    ptr, tok, w = arrs.pop("s_ptr"), arrs.pop("s_tok"), arrs.pop("s_w")
    if len(ptr) != n_sets + 1 or ptr[-1] != len(tok) or len(w) != len(tok):
        raise ValueError("token sets do not match their names")
    if fresh is not None and len(fresh) != len(meta["scalars"]):
        raise ValueError(f"{len(meta['scalars'])} rules, the files have {len(fresh)}")
    sets = TokenSets(vocab)
    sets.class_names = list(meta["class_names"])
    sets.class_ids = {name: k for k, name in enumerate(sets.class_names)}
    sets.class_members = [tok[ptr[k]:ptr[k + 1]] for k in range(n_sets)]
    sets.class_weights = [w[ptr[k]:ptr[k + 1]] if meta["weighted"][k] else None for k in range(n_sets)]
    sets.class_entries = list(meta["class_entries"])
    sets.class_docs = list(class_docs) if class_docs is not None else [""] * n_sets
    arrays = SimpleNamespace(**{k[2:]: v for k, v in arrs.items() if k.startswith("a_")})
    sets._member_matrix = arrays.class_member
    rules = _rules_from(arrs, meta["scalars"], fresh)
    return Cached(rules=rules, numbers0=list(meta["numbers0"]), rule_keys=list(meta["rule_keys"]),
                  digests=[bytes.fromhex(d) for d in meta["digests"]], context=meta["context"], sets=sets, arrays=arrays)


def note_context(context: str, key: str) -> None:
    """Point the context at `key` (an entry just read): the next edit then starts from the ruleset that was
    loaded last, not from the one built last (best effort, like store)."""
    if context_entry(context) == key:
        return
    root = cache_root()
    try:
        ctx = root / f".ctx-{context}.tmp{os.getpid()}"
        ctx.write_text(json.dumps({"key": key}))
        os.replace(ctx, root / f"ctx-{context}.json")
    except OSError:
        pass


def context_entry(context: str) -> str | None:
    """The key of the last entry built in this context (a hint: the entry itself is checked on load)."""
    flush()
    try:
        key = json.loads((cache_root() / f"ctx-{context}.json").read_text())["key"]
        return key if isinstance(key, str) and key.isalnum() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
