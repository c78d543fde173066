"""Resolving rule entries against a vocabulary: token strings and classes -> token-set ids, numbers -> floats.

A *set id* (sid) names a set of token ids: sid < V is the single token sid; sid = V + k is class k.
Class 0 is the built-in `@all` (every token). Weighted sets ([[weights]]) are numbered after the classes
and also carry one weight per member (`weights_of`; 1 for every member of a token or a plain class).
The result is a list of `Rule` objects that both the compiler (flat arrays for the kernels) and the
numpy twin (a direct interpreter) read.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import numpy as np

from .rulefile import Entry, number, quoted, short, table

ALL_NAME = "all"
MAX_DISTANCE = 1 << 16  # a head's position keys: far beyond any context; keeps its dense table small
MAX_CLASS_DEPTH = 200  # classes defined through classes: a chain deeper than this is a mistake (and recursion)


@dataclass
class Rule:
    id: str
    doc: str
    kind: str
    file: str
    line: int
    group: str
    numbers: int = 0
    next: list[tuple[int, float]] = field(default_factory=list)  # (sid, logit added to its tokens)
    rows: list[tuple[int, list[tuple[int, float]]]] = field(default_factory=list)  # bigram: (now sid, next)
    head: int = -1  # head number: own (head) or read (head_out)
    now: int = -1  # sid the current token must be in (head_out, skip)
    src: int = -1  # sid of the attended source (head_out) / the earlier token (skip)
    copy: float | None = None  # head_out: w added to each attended source token's own logit, times its attention
    position: dict[int, float] = field(default_factory=dict)  # head: distance -> score
    pos_default: float = 0.0
    scores: list[tuple[int, int, float]] = field(default_factory=list)  # head: (now sid, src sid, score)
    threshold: float = 0.0
    n_now: list[tuple[int, float]] = field(default_factory=list)  # neuron inputs
    n_present: list[tuple[int, float]] = field(default_factory=list)
    n_attend: list[tuple[int, int, float]] = field(default_factory=list)  # (head number, src sid, w)

    def value_sids(self) -> list[int]:
        """The sids of its value tables (next, bigram rows, neuron now/attend): where weighted sets may go."""
        return ([s for s, _ in self.next] + [s for _, row in self.rows for s, _ in row]
                + [s for s, _ in self.n_now] + [s for _, s, _ in self.n_attend])


class TokenSets:
    """Vocabulary lookups, class definitions and the membership of every set id."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.V = len(vocab)
        self.tok_id = {s: i for i, s in enumerate(vocab)}
        self.class_names: list[str] = [ALL_NAME]
        self.class_ids: dict[str, int] = {ALL_NAME: 0}
        self.class_members: list[np.ndarray] = [np.arange(self.V, dtype=np.int32)]
        self.class_docs: list[str] = ["every token"]
        self.class_weights: list[np.ndarray | None] = [None]  # weighted set: per member; None: a plain class
        self.class_entries: list[int] = [0]  # weighted set: entries written (its explicit numbers)
        self._member_matrix: np.ndarray | None = None

    @property
    def ALL(self) -> int:
        return self.V

    def members(self, sid: int) -> np.ndarray:
        if sid < self.V:
            return np.array([sid], dtype=np.int32)
        return self.class_members[sid - self.V]

    def weights_of(self, sid: int) -> np.ndarray:
        """Weight of each member (aligned with members(sid)): 1 unless sid is a weighted set."""
        w = self.class_weights[sid - self.V] if sid >= self.V else None
        return np.ones(self.size(sid)) if w is None else w

    def is_weighted(self, sid: int) -> bool:
        return sid >= self.V and self.class_weights[sid - self.V] is not None

    def size(self, sid: int) -> int:
        return 1 if sid < self.V else len(self.class_members[sid - self.V])

    def name(self, sid: int) -> str:
        return repr(self.vocab[sid]) if sid < self.V else "@" + self.class_names[sid - self.V]

    @property
    def member_matrix(self) -> np.ndarray:
        """[n_classes, V] bool: class k contains token v."""
        if self._member_matrix is None:
            m = np.zeros((len(self.class_members), self.V), dtype=np.bool_)
            for k, mem in enumerate(self.class_members):
                m[k, mem] = True
            self._member_matrix = m
        return self._member_matrix

    # -- resolving strings written in rule files ------------------------------------------------
    def token(self, e: Entry, s: str, what: str) -> int:
        tid = self.tok_id.get(s)
        if tid is not None:
            return tid
        spelled = "@" + s if s.startswith("@") else s
        sugg: list[str] = []
        for variant in (" " + s, s.strip(), s.lower(), " " + s.strip().lower()):
            if variant != s and variant in self.tok_id and variant not in sugg:
                sugg.append(variant)
        for c in (difflib.get_close_matches(s, self.vocab, n=4, cutoff=0.6) if len(s) <= 100 else ()):
            if c not in sugg:
                sugg.append(c)
        fix = ("did you mean " + ", ".join(repr("@" + c if c.startswith("@") else c) for c in sugg[:4]) + "?") if sugg \
            else "no close token in the vocabulary; tokens are case- and space-sensitive (' the' has a leading space)"
        raise e.fail(f"unknown token {short(spelled)} in {what}", fix, *quoted(spelled))

    def ref(self, e: Entry, s, what: str, weighted_ok: bool = False) -> int:
        """sid for a written reference: "token", "@class", or "@@..." for a token that starts with '@'.
        A weighted set only where each entry has a number (`weighted_ok`: next/now/attend tables)."""
        tid = self.tok_id.get(s) if type(s) is str else None  # fast path; anything odd gets the checks below
        if tid is not None and s[:1] != "@":
            return tid
        if not isinstance(s, str):
            raise e.fail(f"{what} must be a token string or \"@class\", got {short(s)}", "quote it, e.g. \" the\"")
        if s.startswith("@@"):
            return self.token(e, s[1:], what)
        if s.startswith("@"):
            name = s[1:]
            k = self.class_ids.get(name)
            if k is None:
                close = difflib.get_close_matches(name, self.class_names, n=3) if len(name) <= 100 else []
                hint = ("did you mean " + ", ".join("@" + c for c in close) + "?") if close else \
                    f"define it with [[class]] id = \"{name}\"; a token that starts with '@' is written '@@...'"
                raise e.fail(f"unknown class {short(s)} in {what}", hint, *quoted(s))
            if not weighted_ok and self.class_weights[k] is not None:
                raise e.fail(f"{short(s)} is a weighted set ([[weights]]); {what} needs a plain set of tokens",
                             "use a [[class]] there (weighted sets go in next/now/attend tables)", *quoted(s))
            return self.V + k
        return self.token(e, s, what)

    def weights(self, e: Entry, key: str, weighted_ok: bool = True) -> list[tuple[int, float]]:
        """A {"token or @class" = number} table -> [(sid, w)]."""
        out = []
        what = f"'{key}'"
        for s, w in table(e, e.body[key], key).items():
            out.append((self.ref(e, s, what, weighted_ok), number(e, w, key, s)))
        return out

    # -- classes ---------------------------------------------------------------------------------
    def define_classes(self, entries: list[Entry], weighted: list[Entry] = ()) -> None:
        """Resolve [[class]] entries in any order (a class may use a class defined in a later file), then
        the [[weights]] entries (which may use any class, but no weighted set)."""
        for e in list(entries) + list(weighted):
            if e.id == ALL_NAME:
                raise e.fail("'all' is the built-in class of every token", "choose another id", "id")
            self.class_ids[e.id] = len(self.class_names)
            self.class_names.append(e.id)
            self.class_members.append(np.zeros(0, dtype=np.int32))
            self.class_docs.append(e.body["doc"])
            self.class_weights.append(np.zeros(0) if e.kind == "weights" else None)
            self.class_entries.append(len(e.body["tokens"]) if e.kind == "weights" else 0)
        by_name: dict[str, Entry] = {e.id: e for e in entries}
        state: dict[str, int] = {}  # 1 = resolving, 2 = done

        def resolve(name: str, user: Entry, depth: int = 0) -> np.ndarray:
            k = self.class_ids[name]
            if name == ALL_NAME or state.get(name) == 2:
                return self.class_members[k]
            e = by_name[name]
            if state.get(name) == 1:
                raise user.fail(f"class '@{name}' is defined in terms of itself", "break the cycle of class references", "@" + name)
            if depth > MAX_CLASS_DEPTH:
                raise user.fail(f"classes are defined through more than {MAX_CLASS_DEPTH} other classes",
                                "define the set directly (list its tokens, or a pattern)", "@" + name)
            state[name] = 1
            mem = np.zeros(self.V, dtype=np.bool_)
            for key, add in (("tokens", True), ("except", False)):
                if key == "except" and "pattern" in e.body:
                    self._pattern(e, mem)  # pattern joins the union before `except` removes
                if key not in e.body:
                    continue
                items = e.body[key]
                if not isinstance(items, list):
                    raise e.fail(f"'{key}' must be a list of tokens/@classes", f"write {key} = [\" dog\", \"@animals\"]", key)
                for s in items:
                    if isinstance(s, str) and s.startswith("@") and not s.startswith("@@") and s[1:] in by_name:
                        mem[resolve(s[1:], e, depth + 1)] = add
                    else:
                        mem[self.members(self.ref(e, s, f"'{key}'"))] = add
            members = np.flatnonzero(mem).astype(np.int32)
            if len(members) == 0:
                raise e.fail("class has no tokens", "check the pattern/list (an empty class is almost always a mistake)", "pattern", "tokens")
            self.class_members[k] = members
            state[name] = 2
            return members

        for e in entries:
            resolve(e.id, e)
        for e in weighted:
            w = np.zeros(self.V)
            covered = np.zeros(self.V, dtype=np.bool_)
            for sid, x in self.weights(e, "tokens", weighted_ok=False):
                w[self.members(sid)] += x  # overlaps add
                covered[self.members(sid)] = True
            k = self.class_ids[e.id]
            self.class_members[k] = np.flatnonzero(covered).astype(np.int32)
            self.class_weights[k] = w[covered]

    def _pattern(self, e: Entry, mem: np.ndarray) -> None:
        pat = e.body["pattern"]
        if not isinstance(pat, str):
            raise e.fail("'pattern' must be a regex string", "e.g. pattern = '^ [A-Z]' (single quotes keep backslashes)", "pattern")
        try:
            rx = re.compile(pat)
        except re.error as err:
            raise e.fail(f"bad regex in 'pattern' ({err})", "fix the regular expression (Python re syntax)", "pattern") from None
        hits = [i for i, s in enumerate(self.vocab) if rx.search(s)]
        mem[hits] = True


def resolve_entry(e: Entry, sets: TokenSets, heads: dict[str, int], group: str) -> Rule:
    b, kind = e.body, e.kind
    r = Rule(id=e.id, doc=b["doc"].strip(), kind=kind, file=str(e.file.path), line=e.line, group=b.get("group", group))
    if kind in ("prior", "head_out", "skip", "neuron") and "next" in b:  # head_out may have copy instead
        r.next = sets.weights(e, "next")
        r.numbers += len(r.next)
    if kind == "bigram":
        if "rows" in b:
            for now, nxt in table(e, b["rows"], "rows").items():
                now_sid = sets.ref(e, now, "'rows'")
                what = f"rows[{short(now)}]"
                row = [(sets.ref(e, s, what, weighted_ok=True), number(e, w, what, s)) for s, w in table(e, nxt, what).items()]
                r.rows.append((now_sid, row))
        else:
            r.rows.append((sets.ref(e, b["now"], "'now'"), sets.weights(e, "next")))
        r.numbers += sum(len(row) for _, row in r.rows)
    elif kind == "head":
        r.head = heads[e.id]
        pos = table(e, b.get("position", {}), "position")
        for k, w in pos.items():
            w = number(e, w, f"position[{k}]")
            r.numbers += 1
            if k == "default":
                r.pos_default = w
            elif k.isascii() and k.isdigit() and int(k) <= MAX_DISTANCE:
                r.position[int(k)] = w
            elif k.isascii() and k.isdigit():
                raise e.fail(f"position key {short(k)} is beyond {MAX_DISTANCE:,}", "no context is that long: use a "
                             "smaller distance, or `default` for every distance not listed", *quoted(k))
            else:
                raise e.fail(f"position key {short(k)} is not a distance", "use 0, 1, 2, ... (0 = the current token itself) or default", "position")
        scores = b.get("score", [])
        if not isinstance(scores, list):
            raise e.fail("'score' must be a list of {now, src, w} tables", "write score = [{ now = \"@all\", src = \" the\", w = 2.0 }]", "score")
        for sc in scores:
            if not isinstance(sc, dict) or not {"src", "w"} <= set(sc) or not set(sc) <= {"now", "src", "w"}:
                raise e.fail(f"score entry {sc!r} must have keys src, w and optionally now", "write { now = \"@all\", src = \" the\", w = 2.0 }", "score")
            now = sets.ref(e, sc.get("now", "@all"), "score 'now'")
            src = sets.ref(e, sc["src"], "score 'src'")
            r.scores.append((now, src, number(e, sc["w"], "score w", sc["src"])))
            r.numbers += 1
    elif kind == "head_out":
        r.head = _head(e, b["head"], heads, "head")
        r.src = sets.ref(e, b["src"], "'src'")
        r.now = sets.ref(e, b.get("now", "@all"), "'now'")
        if "copy" in b:
            r.copy = number(e, b["copy"], "'copy'", needles=("copy =", "copy="))
            r.numbers += 1
    elif kind == "skip":
        r.src = sets.ref(e, b["earlier"], "'earlier'")
        r.now = sets.ref(e, b.get("now", "@all"), "'now'")
    elif kind == "neuron":
        if "threshold" in b:
            r.threshold = number(e, b["threshold"], "threshold")
            r.numbers += 1
        if "now" in b:
            r.n_now = sets.weights(e, "now")
        if "present" in b:
            r.n_present = sets.weights(e, "present", weighted_ok=False)
        for hname, srcs in table(e, b.get("attend", {}), "attend").items():
            h = _head(e, hname, heads, "attend")
            for s, w in table(e, srcs, f"attend.{hname}").items():
                r.n_attend.append((h, sets.ref(e, s, f"attend.{hname}", weighted_ok=True), number(e, w, f"attend.{hname}", s)))
        r.numbers += len(r.n_now) + len(r.n_present) + len(r.n_attend)
    return r


def count_weighted_sets(rules: list[Rule], sets: TokenSets) -> None:
    """A weighted set's entries are explicit numbers once: on the first rule (ledger order) referencing it."""
    seen: set[int] = set()
    for r in rules:
        for sid in r.value_sids():
            if sets.is_weighted(sid) and sid not in seen:
                seen.add(sid)
                r.numbers += sets.class_entries[sid - sets.V]


def _head(e: Entry, name, heads: dict[str, int], what: str) -> int:
    if not isinstance(name, str) or name not in heads:
        close = difflib.get_close_matches(str(name), list(heads), n=3)
        hint = ("did you mean " + ", ".join(repr(c) for c in close) + "?") if close else "define it with [[head]] id = ..."
        raise e.fail(f"unknown head {short(name)} in '{what}'", hint, *quoted(str(name)))
    return heads[name]
