"""load_rules: rule files -> CompiledRules (rule metadata for the ledger + flat CSR arrays for the kernels).

Array layout (all CSR: `X_ptr[k]:X_ptr[k+1]` slices the entries of key k). Keys written `h*V + tok`
index per-head, per-token lists. Every entry carries the rule index it came from so a per-rule mask
can switch it off at run time without recompiling.

Over 400 lines: load_rules (with its cache lookups, rulecache.py) and build_arrays share the Rule and array
layout described here; build_arrays is one long function on purpose (one section per kernel table).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import rulecache
from .errors import UserError
from .resolve import Rule, TokenSets, count_weighted_sets, resolve_entry
from .rulefile import NOT_RULES, Entry, read_rule_file


def vocab_fingerprint(vocab: list[str]) -> str:
    """"<size>:<8 hex>" identifying a vocabulary; write it as `vocab = "..."` at the top of a rule file."""
    h = hashlib.sha256("\x00".join(vocab).encode("utf-8")).hexdigest()[:8]
    return f"{len(vocab)}:{h}"


@dataclass
class CompiledRules:
    vocab: list[str]
    vocab_size: int
    rules: list[Rule]
    sets: TokenSets
    n_heads: int
    rule_ids: list[str]
    rule_docs: list[str]
    rule_kinds: list[str]
    rule_files: list[str]
    rule_lines: list[int]
    rule_group: np.ndarray
    groups: list[str]
    rule_numbers: np.ndarray
    arrays: SimpleNamespace
    _digests: list[bytes] | None = dataclasses.field(default=None, repr=False, compare=False)
    # the ruleset loaded before this one in the same context (same token sets and heads): (its cache entry, None)
    # or (None, its cache key) when not read yet (load_rules); replaced_rules() reads it
    _before: tuple = dataclasses.field(default=(None, None), repr=False, compare=False)

    def replaced_rules(self) -> dict:
        """{rule_digest: Rule} of the rules of the ruleset loaded before this one (same token sets and heads) that
        this one no longer has: what an edit replaced, as they were (verify/ledger/incremental.find_gate). Empty
        when there was none, or its cache entry is gone."""
        prev, key = self._before
        if prev is None and key is not None:
            prev = rulecache.load(key, self.vocab, None, None)
            self._before = (prev, None)
        if prev is None:
            return {}
        now = set(self.rule_digests())
        return {d: r for r, d in zip(prev.rules, prev.digests) if d not in now}

    def rule_digests(self) -> list[bytes]:
        """rule_digest of every rule (from the compiled-ruleset cache when it had them)."""
        if self._digests is None or len(self._digests) != len(self.rules):
            self._digests = [rule_digest(r) for r in self.rules]
        return self._digests

    def mask_of(self, mask) -> np.ndarray:
        """Normalise a user mask (None = all rules on) to bool [n_rules]."""
        n = len(self.rules)
        if mask is None:
            return np.ones(n, dtype=np.bool_)
        m = np.asarray(mask)
        if m.dtype != np.bool_ or m.shape != (n,):
            raise UserError(f"mask must be a bool array of shape ({n},) (one entry per rule, True = on), got {m.dtype} {m.shape}")
        return np.ascontiguousarray(m)


def rule_file_paths(path: Path) -> list[Path]:
    """The rule files of a folder (sorted: the ledger order) or the one file given."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".toml" and p.is_file())
        if not files:
            raise UserError(f"{path}: no .toml rule files in this folder; add one (see docs/rules.md)")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"{path}: no such rules file or folder; pass a folder of .toml files or one .toml file")


def load_rules(rules_dir_or_file, vocab: list[str]) -> CompiledRules:
    """Read, check, resolve and compile every rule file (sorted by file name) against `vocab`."""
    files = rule_file_paths(Path(rules_dir_or_file))
    fp = vocab_fingerprint(vocab)
    entries: list[Entry] = []
    for f in files:
        rf, es = read_rule_file(f)
        if rf.vocab is not None and rf.vocab != fp:
            line = next((i + 1 for i, s in enumerate(rf.lines) if s.lstrip().startswith("vocab")), 1)
            raise UserError(f"{f}:{line}: rules were written for vocabulary {rf.vocab} but this one is {fp}; "
                            "use the tokenizer.json the rules were written for, or update the vocab line after checking the tokens")
        entries.extend(es)
    first: dict[str, Entry] = {}
    for e in entries:
        if e.id in first:
            o = first[e.id]
            raise UserError(f"{e.file.path}:{e.line}: duplicate id '{e.id}' (first used at {o.file.path}:{o.line}); "
                            "ids must be unique across all rule files, classes and weighted sets: rename one")
        first[e.id] = e

    set_entries = [e for e in entries if e.kind == "class"] + [e for e in entries if e.kind == "weights"]
    head_entries = [e for e in entries if e.kind == "head"]
    heads = {e.id: i for i, e in enumerate(head_entries)}
    rule_entries = [e for e in entries if e.kind not in NOT_RULES]
    fresh = [{"doc": e.body["doc"].strip(), "file": str(e.file.path), "line": e.line,
              "group": e.body.get("group", e.file.group)} for e in rule_entries]
    class_docs = ["every token"] + [e.body["doc"] for e in set_entries]
    keys = rulecache.keys_of(vocab, entries, set_entries, list(heads), rule_entries)
    before = rulecache.context_entry(keys.context)  # the ruleset loaded last in this context: what an edit replaced
    hit = rulecache.load(keys.full, vocab, fresh, class_docs)
    prev = None
    if hit is not None:
        rules, sets, arrays, digests = hit.rules, hit.sets, hit.arrays, hit.digests
        rulecache.note_context(keys.context, keys.full)
    else:
        rules, numbers0, digests, sets, prev = _resolve(keys, vocab, set_entries, heads, rule_entries, fresh)
        arrays = _patched_arrays(prev, keys, rules, sets)
        if arrays is None:
            arrays = build_arrays(rules, sets, len(heads))
        rulecache.store(keys, rules, numbers0, digests, sets, arrays)
    sets.class_docs = class_docs
    out = _compiled(vocab, rules, sets, len(heads), arrays)
    out._digests = digests
    out._before = (prev, None) if prev is not None else (None, before if before != keys.full else None)
    return out


def rule_digest(r: Rule) -> bytes:
    """sha256 of what a rule computes: its resolved form without doc, file, line and group (so a comment, a
    doc or a rule moved down a line changes nothing). The ledger's row keys and the verdict keys use it."""
    return hashlib.sha256(repr(dataclasses.replace(r, doc="", file="", line=0, group="")).encode()).digest()


def _resolve(keys, vocab, set_entries, heads, rule_entries, fresh):
    """-> (rules, their numbers before count_weighted_sets, their rule_digest, sets, that last entry or None).
    Rules whose entry is unchanged since the last ruleset compiled with the same token sets and heads are
    taken from that cache entry (an edit to one rule resolves that rule alone)."""
    old = rulecache.context_entry(keys.context)
    prev = rulecache.load(old, vocab, None, None) if old is not None else None
    if prev is not None and prev.context != keys.context:
        prev = None
    if prev is not None:
        sets = prev.sets
        by_key = {k: (r, n0, d) for k, r, n0, d in zip(prev.rule_keys, prev.rules, prev.numbers0, prev.digests)}
    else:
        sets = TokenSets(vocab)
        sets.define_classes([e for e in set_entries if e.kind == "class"], [e for e in set_entries if e.kind == "weights"])
        by_key = {}
    rules, numbers0, reused = [], [], []
    for e, k, f in zip(rule_entries, keys.rule_keys, fresh):
        got = by_key.get(k)
        if got is not None and got[0].id == e.id:
            r = dataclasses.replace(got[0], numbers=got[1], **f)
        else:
            r = resolve_entry(e, sets, heads, e.file.group)
        rules.append(r)
        numbers0.append(r.numbers)
        reused.append(got is not None and got[0].id == e.id)
    count_weighted_sets(rules, sets)
    digests = [by_key[k][2] if ok and r.numbers == by_key[k][0].numbers else rule_digest(r)
               for r, k, ok in zip(rules, keys.rule_keys, reused)]
    return rules, numbers0, digests, sets, prev


# Rule kinds whose numbers land in build_arrays' output one for one (their `next`/`rows` tables and `copy`),
# so an edit that changes only such numbers patches the last entry's arrays instead of rebuilding them.
_PATCHABLE = ("prior", "bigram", "head_out", "skip", "neuron")  # neuron: its threshold, `next` and `present` numbers
MAX_PATCHED = 16  # changed rules beyond which one build is as cheap


def _skeleton(r: Rule) -> Rule:
    """The rule with every number of its tables, `copy`, a neuron's threshold and `present` numbers and the fresh
    text fields blanked: equal skeletons and kinds in _PATCHABLE mean build_arrays lays both rules out alike (same
    tokens, same order). A neuron's `now` and `attend` numbers stay: build_arrays spreads them over token-sorted
    tables of every neuron, so an edit of one of those is built."""
    zero = lambda items: [(s, 0.0) for s, _ in items]  # noqa: E731
    return dataclasses.replace(r, next=zero(r.next), rows=[(now, zero(row)) for now, row in r.rows],
                               copy=None if r.copy is None else 0.0, threshold=0.0, n_present=zero(r.n_present),
                               numbers=0, doc="", file="", line=0, group="")


def _patched_arrays(prev, keys, rules: list[Rule], sets: TokenSets) -> SimpleNamespace | None:
    """build_arrays(rules, sets, H) from the last entry's arrays when `rules` differ from its rules only in
    numbers of _PATCHABLE rules (the same rules, token sets and heads otherwise): those rules' weight
    segments recomputed by the code build_arrays uses (_Targets.add), so the result is equal to a build,
    array for array (tests/test_rule_cache.py). None when that does not apply."""
    if prev is None or len(prev.rule_keys) != len(keys.rule_keys):
        return None
    changed = [i for i, (x, y) in enumerate(zip(prev.rule_keys, keys.rule_keys)) if x != y]
    if not changed or len(changed) > MAX_PATCHED:
        return None
    for i in changed:
        old, new = prev.rules[i], rules[i]
        if new.kind not in _PATCHABLE or old.kind != new.kind or old.id != new.id or _skeleton(old) != _skeleton(new):
            return None
    a = SimpleNamespace(**vars(prev.arrays))
    for name in ("blk_w", "ho_w", "cp_w", "sk_w", "nr_thr", "nr_w", "ncl_w", "nws_w", "npe_w"):
        setattr(a, name, getattr(a, name).copy())  # the entry's own arrays stay as read

    def put(ptr, tok, w, k, items) -> bool:
        ts = _Targets(sets)
        ts.add(items)
        _, t, x = ts.arrays()
        lo, hi = ptr[k], ptr[k + 1]
        if hi - lo != len(t) or not np.array_equal(tok[lo:hi], t):
            return False
        w[lo:hi] = x
        return True

    for i in changed:
        r = rules[i]
        if r.kind in ("prior", "bigram"):
            blocks = np.flatnonzero(a.blk_rule == i)
            tables = [r.next] if r.kind == "prior" else [row for _, row in r.rows]
            if len(blocks) != len(tables) or not all(put(a.blk_ptr, a.blk_tok, a.blk_w, b, t) for b, t in zip(blocks, tables)):
                return None
        elif r.kind == "head_out":
            k = np.flatnonzero(a.ho_rule == i)
            c = np.flatnonzero(a.cp_rule == i)
            if len(k) != 1 or len(c) != (r.copy is not None) or not put(a.ho_ptr, a.ho_tok, a.ho_w, k[0], r.next):
                return None
            a.cp_w[c] = r.copy
        elif r.kind == "skip":
            k = np.flatnonzero(a.sk_rule == i)
            if len(k) != 1 or not put(a.sk_ptr, a.sk_tok, a.sk_w, k[0], r.next):
                return None
        elif not _patch_neuron(a, sets, i, r, put):
            return None
    if any(rules[i].kind == "neuron" for i in changed):
        a.nr_always = np.flatnonzero(a.nr_thr < 0).astype(np.int64)
    return a


def _patch_neuron(a: SimpleNamespace, sets: TokenSets, i: int, r: Rule, put) -> bool:
    """Rule i, a neuron whose skeleton is unchanged, written into a's neuron arrays as build_arrays lays them out:
    its threshold, its token outputs (nr_*, through `put`), its class and weighted-set outputs in `next` order
    (ncl_w, nws_w) and its `present` entries in order (npe_w). False when the layout does not match."""
    V = sets.V
    n = np.flatnonzero(a.nr_rule == i)
    if len(n) != 1:
        return False
    n = int(n[0])
    a.nr_thr[n] = r.threshold
    cls = [w for s, w in r.next if s >= V and not sets.is_weighted(s)]
    wsw = [w for s, w in r.next if sets.is_weighted(s)]
    pres = np.flatnonzero(a.npe_neu == n)
    if (a.ncl_ptr[n + 1] - a.ncl_ptr[n] != len(cls) or a.nws_ptr[n + 1] - a.nws_ptr[n] != len(wsw)
            or len(pres) != len(r.n_present)):
        return False
    a.ncl_w[a.ncl_ptr[n]:a.ncl_ptr[n + 1]] = cls
    a.nws_w[a.nws_ptr[n]:a.nws_ptr[n + 1]] = wsw
    a.npe_w[pres] = [w for _, w in r.n_present]
    return put(a.nr_ptr, a.nr_tok, a.nr_w, n, [(s, w) for s, w in r.next if s < V])


def _compiled(vocab: list[str], rules: list[Rule], sets: TokenSets, n_heads: int, arrays: SimpleNamespace) -> CompiledRules:
    groups: list[str] = []
    gidx: dict[str, int] = {}
    for r in rules:
        if r.group not in gidx:
            gidx[r.group] = len(groups)
            groups.append(r.group)
    return CompiledRules(
        vocab=vocab, vocab_size=len(vocab), rules=rules, sets=sets, n_heads=n_heads,
        rule_ids=[r.id for r in rules], rule_docs=[r.doc for r in rules], rule_kinds=[r.kind for r in rules],
        rule_files=[r.file for r in rules], rule_lines=[r.line for r in rules],
        rule_group=np.array([gidx[r.group] for r in rules], dtype=np.int64), groups=groups,
        rule_numbers=np.array([r.numbers for r in rules], dtype=np.int64),
        arrays=arrays,
    )


# ---------------------------------------------------------------------------------------------
# Flat arrays

def _csr(keys: np.ndarray, n_keys: int, *vals: np.ndarray) -> tuple[np.ndarray, ...]:
    """Group values by key: (ptr[n_keys+1], vals sorted by key (stable)...)."""
    keys = np.asarray(keys, dtype=np.int64)
    # a stable sort is one permutation whatever the algorithm: 16-bit keys take numpy's radix sort (O(n))
    order = np.argsort(keys.astype(np.uint16) if n_keys <= 1 << 16 else keys, kind="stable")
    ptr = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n_keys), out=ptr[1:])
    return (ptr,) + tuple(np.ascontiguousarray(np.asarray(v)[order]) for v in vals)


class _Targets:
    """Per-writer expanded (token, weight) lists; overlapping sids add up."""

    def __init__(self, sets: TokenSets):
        self.sets = sets
        self.ptr = [0]
        self.tok: list[np.ndarray] = []
        self.w: list[np.ndarray] = []

    def add(self, items: list[tuple[int, float]]) -> int:
        V = self.sets.V
        if items and all(s < V for s, _ in items):
            d: dict[int, float] = {}
            for s, w in items:
                d[s] = d.get(s, 0.0) + w
            tok = np.fromiter(d.keys(), dtype=np.int32, count=len(d))
            w = np.fromiter(d.values(), dtype=np.float64, count=len(d))
        elif items:
            toks = np.concatenate([self.sets.members(s) for s, _ in items])
            ws = np.concatenate([w * self.sets.weights_of(s) for s, w in items])
            tok, inv = np.unique(toks, return_inverse=True)
            w = np.bincount(inv, weights=ws)
            tok = tok.astype(np.int32)
        else:
            tok, w = np.zeros(0, np.int32), np.zeros(0, np.float64)
        self.tok.append(tok)
        self.w.append(w)
        self.ptr.append(self.ptr[-1] + len(tok))
        return len(self.ptr) - 2

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
        return np.array(self.ptr, dtype=np.int64), cat(self.tok, np.int32), cat(self.w, np.float64)


def _expand(sets: TokenSets, sids: list[int], *vals) -> tuple[np.ndarray, ...]:
    """Repeat each entry once per member token of its sid: (tokens, vals...)."""
    if not sids:
        return (np.zeros(0, np.int64),) + tuple(np.zeros(0, np.asarray(v).dtype) for v in vals)
    toks, n = _members_of(sets, sids)
    return (toks,) + tuple(np.repeat(np.asarray(v), n) for v in vals)


def _members_of(sets: TokenSets, sids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(the member tokens of each sid, concatenated, int64; the count per sid): a token sid is itself."""
    V = sets.V
    s = np.asarray(sids, dtype=np.int64)
    cls = np.flatnonzero(s >= V)
    n = np.ones(len(s), dtype=np.int64)
    n[cls] = [len(sets.class_members[k]) for k in s[cls] - V]
    if len(cls) == 0:
        return s.copy(), n
    start = np.cumsum(n) - n
    toks = np.empty(int(n.sum()), dtype=np.int64)
    tok = np.flatnonzero(s < V)
    toks[start[tok]] = s[tok]
    for i in cls:
        toks[start[i]:start[i] + n[i]] = sets.class_members[s[i] - V]
    return toks, n


def _member_weights(sets: TokenSets, sids: list[int]) -> np.ndarray:
    """The set weight of each token _expand lists for these sids (1 unless a weighted set)."""
    if not sids:
        return np.zeros(0)
    _, n = _members_of(sets, sids)
    out = np.ones(int(n.sum()))
    start = np.cumsum(n) - n
    for i, s in enumerate(sids):
        if s >= sets.V and sets.class_weights[s - sets.V] is not None:
            out[start[i]:start[i] + n[i]] = sets.class_weights[s - sets.V]
    return out


def build_arrays(rules: list[Rule], sets: TokenSets, H: int) -> SimpleNamespace:
    V, ALL = sets.V, sets.ALL
    a = SimpleNamespace()
    a.class_member = sets.member_matrix

    # Base rows: prior and bigram rows as blocks (now sid, expanded targets). now = @all -> global vector.
    bt = _Targets(sets)
    blk_rule, blk_now = [], []
    for ri, r in enumerate(rules):
        if r.kind == "prior":
            blk_rule.append(ri); blk_now.append(ALL); bt.add(r.next)
        elif r.kind == "bigram":
            for now, row in r.rows:
                blk_rule.append(ri); blk_now.append(now); bt.add(row)
    a.blk_rule = np.array(blk_rule, dtype=np.int64)
    a.blk_ptr, a.blk_tok, a.blk_w = bt.arrays()
    glob = [i for i, s in enumerate(blk_now) if s == ALL]
    a.glob_blk = np.array(glob, dtype=np.int64)
    local = [i for i, s in enumerate(blk_now) if s != ALL]
    toks, bids = _expand(sets, [blk_now[i] for i in local], np.array(local, dtype=np.int64))
    a.nb_ptr, a.nb_blk = _csr(toks, V, bids)

    # Heads: positional scores, and token scores grouped by the `now` sid they apply to.
    head_rules = [r for r in rules if r.kind == "head"]
    a.head_rule = np.array([i for i, r in enumerate(rules) if r.kind == "head"], dtype=np.int64)
    pos_ptr, pos_val, pos_def = [0], [], []
    grp_rows: list[np.ndarray] = []
    hg_keys, hg_grp = [], []
    for h, r in enumerate(head_rules):
        D = max(r.position) + 1 if r.position else 0
        seg = np.full(D, r.pos_default)
        for d, w in r.position.items():
            seg[d] = w
        pos_val.append(seg); pos_ptr.append(pos_ptr[-1] + D); pos_def.append(r.pos_default)
        by_now: dict[int, np.ndarray] = {}
        for now, src, w in r.scores:
            row = by_now.setdefault(now, np.zeros(V))
            row[sets.members(src)] += w
        for now, row in by_now.items():
            g = len(grp_rows)
            grp_rows.append(row)
            mem = sets.members(now).astype(np.int64)
            hg_keys.append(h * V + mem); hg_grp.append(np.full(len(mem), g, dtype=np.int64))
    a.pos_ptr = np.array(pos_ptr, dtype=np.int64)
    a.pos_val = np.concatenate(pos_val) if pos_val else np.zeros(0)
    a.pos_default = np.array(pos_def, dtype=np.float64)
    # [V, n_groups]: a token's source scores for every group in one row (the attention scores the token leaving a
    # window for all active score combinations at once: one cache line, not one per group)
    a.src_by_tok = np.ascontiguousarray(np.array(grp_rows, dtype=np.float64).reshape(len(grp_rows), V).T)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    a.hg_ptr, a.hg_grp = _csr(cat(hg_keys), H * V, cat(hg_grp))

    # Head outputs: indexed by (head, source token); the `now` condition is checked per position.
    ot = _Targets(sets)
    ho = [(i, r) for i, r in enumerate(rules) if r.kind == "head_out"]
    a.ho_rule = np.array([i for i, _ in ho], dtype=np.int64)
    a.ho_head = np.array([r.head for _, r in ho], dtype=np.int64)
    a.ho_now = np.array([r.now for _, r in ho], dtype=np.int64)
    for _, r in ho:
        ot.add(r.next)
    a.ho_ptr, a.ho_tok, a.ho_w = ot.arrays()
    nx = [k for k, (_, r) in enumerate(ho) if r.next]  # a copy-only head_out has no `next` to route
    toks, hs, ids = _expand(sets, [ho[k][1].src for k in nx], a.ho_head[nx], np.array(nx, dtype=np.int64))
    a.hos_ptr, a.hos_id = _csr(hs * V + toks, H * V, ids)

    # Copy outputs (head_out `copy = w`): w x attention on a source position goes to that position's own token.
    # Per copy rule: rule index, head, now sid, src sid, w. now = @all ones are indexed by (head, source token)
    # (cps_*: merged into kernels.build_uncond's per-source outputs), the others by (head, current token) (cpn_*).
    cp = [(i, r) for i, r in ho if r.copy is not None]
    a.cp_rule = np.array([i for i, _ in cp], dtype=np.int64)
    a.cp_head = np.array([r.head for _, r in cp], dtype=np.int64)
    a.cp_now = np.array([r.now for _, r in cp], dtype=np.int64)
    a.cp_src = np.array([r.src for _, r in cp], dtype=np.int64)
    a.cp_w = np.array([r.copy for _, r in cp], dtype=np.float64)
    unc = [k for k in range(len(cp)) if a.cp_now[k] == ALL]
    toks, hs, ids = _expand(sets, [int(a.cp_src[k]) for k in unc], a.cp_head[unc], np.array(unc, dtype=np.int64))
    a.cps_ptr, a.cps_id = _csr(hs * V + toks, H * V, ids)
    cnd = [k for k in range(len(cp)) if a.cp_now[k] != ALL]
    toks, hs, ids = _expand(sets, [int(a.cp_now[k]) for k in cnd], a.cp_head[cnd], np.array(cnd, dtype=np.int64))
    a.cpn_ptr, a.cpn_id = _csr(hs * V + toks, H * V, ids)
    a.cp_cond = np.zeros(H, dtype=np.bool_)  # head has copy rules with a `now` condition
    a.cp_cond[a.cp_head[cnd]] = True

    # Skip-trigrams: indexed by current token (candidates) and by earlier token (arming).
    st = _Targets(sets)
    sk = [(i, r) for i, r in enumerate(rules) if r.kind == "skip"]
    a.sk_rule = np.array([i for i, _ in sk], dtype=np.int64)
    for _, r in sk:
        st.add(r.next)
    a.sk_ptr, a.sk_tok, a.sk_w = st.arrays()
    ids = np.arange(len(sk), dtype=np.int64)
    toks, i1 = _expand(sets, [r.now for _, r in sk], ids)
    a.skn_ptr, a.skn_id = _csr(toks, V, i1)
    toks, i2 = _expand(sets, [r.src for _, r in sk], ids)
    a.ske_ptr, a.ske_id = _csr(toks, V, i2)

    # Neurons: threshold, output, and three input indexes (now token, present token, attended token).
    nt = _Targets(sets)
    nr = [(i, r) for i, r in enumerate(rules) if r.kind == "neuron"]
    a.nr_rule = np.array([i for i, _ in nr], dtype=np.int64)
    a.nr_thr = np.array([r.threshold for _, r in nr], dtype=np.float64)
    a.nr_always = np.flatnonzero(a.nr_thr < 0).astype(np.int64)  # fire with no input at all
    # token outputs are expanded; class outputs stay per class (a neuron writing ten classes would otherwise
    # touch ~1,000 tokens per firing): the kernel sums the firing neurons' weights per class, then per
    # *atom* (tokens in the same output classes), and updates log Z per atom with the atom's base mass,
    # so a class output costs one exp per atom, not one per member token. Weighted sets are not uniform
    # over their members (no atoms), but are shared by many neurons: the kernel sums the firing neurons'
    # act x per set, then writes each touched set once from its own (token, weight) list (ws_*).
    ws_sids = sorted({s for _, r in nr for s in [s for s, _ in r.next] + [s for _, s, _ in r.n_attend] if sets.is_weighted(s)})
    ws_of = {s: j for j, s in enumerate(ws_sids)}
    wt = _Targets(sets)
    for s in ws_sids:
        wt.add([(s, 1.0)])
    a.ws_ptr, a.ws_tok, a.ws_w = wt.arrays()
    ncl_ptr, ncl_cls, ncl_w = [0], [], []
    nws_ptr, nws_set, nws_w = [0], [], []
    for _, r in nr:
        nt.add([(s, w) for s, w in r.next if s < V])
        for s, w in r.next:
            if sets.is_weighted(s):
                nws_set.append(ws_of[s]); nws_w.append(w)
            elif s >= V:
                ncl_cls.append(s - V); ncl_w.append(w)
        ncl_ptr.append(len(ncl_cls))
        nws_ptr.append(len(nws_set))
    a.nr_ptr, a.nr_tok, a.nr_w = nt.arrays()
    a.ncl_ptr = np.array(ncl_ptr, dtype=np.int64)
    a.ncl_cls = np.array(ncl_cls, dtype=np.int64)
    a.ncl_w = np.array(ncl_w, dtype=np.float64)
    a.nws_ptr = np.array(nws_ptr, dtype=np.int64)
    a.nws_set = np.array(nws_set, dtype=np.int64)
    a.nws_w = np.array(nws_w, dtype=np.float64)
    a.atom_of, a.ca_ptr, a.ca_atom, a.am_ptr, a.am_tok = _atoms(sets.class_members, np.unique(a.ncl_cls), V)
    s_now, n_now, w_now, s_pr, n_pr, w_pr, s_at, h_at, n_at, w_at = ([] for _ in range(10))
    readers: dict[tuple[int, int], list[tuple[int, float]]] = {}  # (head, weighted set) -> [(neuron, x)]
    for n, (_, r) in enumerate(nr):
        for s, w in r.n_now:
            s_now.append(s); n_now.append(n); w_now.append(w)
        for s, w in r.n_present:
            s_pr.append(s); n_pr.append(n); w_pr.append(w)
        for h, s, w in r.n_attend:
            if sets.is_weighted(s):
                readers.setdefault((h, ws_of[s]), []).append((n, w))
            else:
                s_at.append(s); h_at.append(h); n_at.append(n); w_at.append(w)
    toks, nn, ww = _expand(sets, s_now, np.array(n_now, np.int64), np.array(w_now, np.float64))
    a.nn_ptr, a.nn_neu, a.nn_w = _csr(toks, V, nn, ww * _member_weights(sets, s_now))
    a.npe_neu = np.array(n_pr, dtype=np.int64)
    a.npe_w = np.array(w_pr, dtype=np.float64)
    toks, ee = _expand(sets, s_pr, np.arange(len(s_pr), dtype=np.int64))
    a.np_ptr, a.np_ent = _csr(toks, V, ee)
    toks, hh, nn, ww = _expand(sets, s_at, np.array(h_at, np.int64), np.array(n_at, np.int64), np.array(w_at, np.float64))
    a.na_ptr, a.na_neu, a.na_w = _csr(hh * V + toks, H * V, nn, ww)
    # attended weighted sets: one reader per (head, set), whose weighted mass goes to its neurons (x each)
    keys = sorted(readers)
    a.wr_head = np.array([h for h, _ in keys], dtype=np.int64)
    a.wr_set = np.array([j for _, j in keys], dtype=np.int64)
    a.wrn_ptr = np.concatenate([[0], np.cumsum([len(readers[k]) for k in keys])]).astype(np.int64)
    a.wrn_neu = np.array([n for k in keys for n, _ in readers[k]], dtype=np.int64)
    a.wrn_w = np.array([w for k in keys for _, w in readers[k]], dtype=np.float64)
    return a


def _atoms(members: list[np.ndarray], used: np.ndarray, V: int) -> tuple[np.ndarray, ...]:
    """Atoms of the classes in `used`: tokens grouped by which of those classes hold them (tokens in none
    form one atom too, so every token has one). Returns atom_of[V]; per class (all classes, unused ones
    empty) its atoms as CSR (ca_ptr, ca_atom); per atom its member tokens, ascending (am_ptr, am_tok)."""
    M = np.zeros((V, len(used)), dtype=np.bool_)
    for j, k in enumerate(used):
        M[members[k], j] = True
    sig, atom_of = np.unique(M, axis=0, return_inverse=True)  # sig[a]: which used classes hold atom a
    atom_of = atom_of.reshape(-1).astype(np.int64)
    ca = [np.zeros(0, np.int64) for _ in members]
    for j, k in enumerate(used):
        ca[k] = np.flatnonzero(sig[:, j]).astype(np.int64)
    ca_ptr = np.concatenate([[0], np.cumsum([len(x) for x in ca])]).astype(np.int64)
    ca_atom = np.concatenate(ca).astype(np.int64) if ca else np.zeros(0, np.int64)
    order = np.argsort(atom_of, kind="stable")  # members ascending within each atom
    am_ptr = np.zeros(len(sig) + 1, dtype=np.int64)
    np.cumsum(np.bincount(atom_of, minlength=len(sig)), out=am_ptr[1:])
    return atom_of, ca_ptr, ca_atom, am_ptr, order.astype(np.int64)
