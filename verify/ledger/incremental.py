"""Incremental ledger rows: after an edit, recompute only the positions the changed rules can touch.

A ledger row is a pure function of the rules it switches on (verify/ledger/core.row_keys). When a row's
key misses, the last row stored under the same label (its *lineage*: "all:+ neurons", "verified:+ copying", per
engine and rules folder when that one was seen before: core.lineage_scope)
usually differs from it by one edited rule: the old version off, the new one on. Switching a rule on or off
changes log-probs only at the positions it acts on (_Positions.at: a bigram row where the current token is
in its rows; a head_out where the current token is in its `now`, at or after the first `src` token of the
sequence; a skip where it is in its `now`, strictly after its first `earlier`; priors, heads and neurons
everywhere). So the new row is the old row with those positions (the union over the changed rules)
recomputed and spliced in. The engine computes them from the sequence prefixes that lead up to them
(HandModel.stream_metrics_rows with `at`: attention sums over the whole prefix, distributions only at those
positions), exactly as a full pass does there: bit for bit what one full pass over the same rows gives when
the old row was computed in the same engine pass grouping (HandModel.row_passes fuses consecutive rows; rows
fused differently differ by float64 rounding, ~1e-15 nats in kl, and so do spliced rows whose other positions
came from such a pass). Each stored row carries what that needs: per rule of its ruleset its digest (core.
rule_digests) and the sets its span depends on, and the context (engine, eval set, token sets) it was
computed in; a changed context, a changed rule spanning everything, too many changed rules or spans
covering over MAX_SHARE of the positions mean a full pass instead.

A neuron acts wherever it fires, which for the shipped neurons is 16–74% of the positions, and its positions' prefixes
cover nearly everything: an edit of a neuron's numbers (find_gate) is a full pass that keeps the old rows where the
neuron is certainly off both before and after the edit (its new activation plus neuron_margin, a bound on how far
the edit moved it, <= 0: kernels.run_seqs, "Gated positions"), bit for bit what a full pass over the same rows gives
under the same condition on the old rows' pass grouping. The replaced rule's numbers come from the rule cache
(CompiledRules.replaced_rules: the ruleset loaded before).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPAN_ALL, SPAN_BIGRAM, SPAN_HEAD_OUT, SPAN_SKIP = 0, 1, 2, 3
_KIND = {"bigram": SPAN_BIGRAM, "head_out": SPAN_HEAD_OUT, "skip": SPAN_SKIP}
MAX_CHANGED = 64  # changed rules per row: beyond this the spans' union is nearly everything anyway
MAX_SHARE = 0.5  # recomputed share of the eval positions above which one full pass is as cheap


@dataclass
class Specs:
    """Per rule of a ruleset: its digest and what its span depends on (sids of the same token sets)."""
    digest: np.ndarray  # [n, 32] uint8
    kind: np.ndarray  # [n] int8, SPAN_*
    src: np.ndarray  # [n] int64: head_out src / skip earlier (-1 otherwise)
    now_ptr: np.ndarray  # [n + 1] int64: now_ptr[i]:now_ptr[i+1] slices `now`
    now: np.ndarray  # int64: a bigram's row sids; a head_out's or skip's `now`

    def to_arrays(self, on: np.ndarray) -> dict[str, np.ndarray]:
        return {"sp_digest": self.digest, "sp_kind": self.kind, "sp_src": self.src, "sp_now_ptr": self.now_ptr,
                "sp_now": self.now, "sp_on": np.asarray(on, np.bool_)}

    @staticmethod
    def from_arrays(z: dict) -> tuple["Specs", np.ndarray]:
        s = Specs(z["sp_digest"], z["sp_kind"], z["sp_src"], z["sp_now_ptr"], z["sp_now"])
        n = len(s.kind)
        if s.digest.shape != (n, 32) or s.src.shape != (n,) or s.now_ptr.shape != (n + 1,) or z["sp_on"].shape != (n,) \
                or s.now_ptr[-1] != len(s.now):
            raise ValueError("span records of inconsistent shapes")
        return s, z["sp_on"]

    def keys(self, on: np.ndarray) -> dict[bytes, int]:
        return {self.digest[i].tobytes(): int(i) for i in np.flatnonzero(on)}


def specs_of(rules, digests: list[bytes]) -> Specs:
    kind, src, ptr, now = [], [], [0], []
    for r in rules.rules:
        k = _KIND.get(r.kind, SPAN_ALL)
        kind.append(k)
        src.append(r.src if k in (SPAN_HEAD_OUT, SPAN_SKIP) else -1)
        now.extend([s for s, _ in r.rows] if k == SPAN_BIGRAM else [r.now] if k != SPAN_ALL else [])
        ptr.append(len(now))
    dig = np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), 32) if digests else np.zeros((0, 32), np.uint8)
    return Specs(dig, np.array(kind, np.int8), np.array(src, np.int64), np.array(ptr, np.int64), np.array(now, np.int64))


def context_digest(head: str) -> np.ndarray:
    """The row key's context (engine, eval set, vocabulary, heads, token sets) as stored with a row."""
    return np.frombuffer(hashlib.sha256(head.encode()).digest(), np.uint8).copy()


# -- lineage pointers: label -> the key of the last row stored or read under it ---------------------
# A label may end in a scope ("\0" and what core.lineage_scope says: engine and rules folders). The pointer is kept
# under the scoped label and under the bare one: a scope seen before splices onto its own last row, a new one (a
# copied rules folder) onto the last row of any scope.
def _lineage_file(ref, label: str) -> Path:
    return ref.dir / "ledger" / f"lineage-{hashlib.sha256(label.encode()).hexdigest()[:16]}.txt"


def _read_one(ref, label: str) -> str | None:
    try:
        key = _lineage_file(ref, label).read_text().strip()
        return key if key.isalnum() else None
    except OSError:
        return None


def read_lineage(ref, label: str) -> str | None:
    key = _read_one(ref, label)
    return key if key is not None or "\0" not in label else _read_one(ref, label.split("\0", 1)[0])


def write_lineage(ref, label: str, key: str) -> None:
    for lab in dict.fromkeys([label, label.split("\0", 1)[0]]):
        if _read_one(ref, lab) == key:
            continue
        f = _lineage_file(ref, lab)
        try:
            f.parent.mkdir(exist_ok=True)
            tmp = f.with_name(f".{f.stem}.tmp{os.getpid()}")
            tmp.write_text(key)
            tmp.replace(f)
        except OSError:
            pass


# -- spans -------------------------------------------------------------------------------------------
class _Positions:
    """Where each token set first and last occurs in each eval sequence."""

    def __init__(self, sets, tokens: np.ndarray, offsets: np.ndarray):
        self.sets = sets
        self.tok = np.asarray(tokens, np.int64)
        self.lens = np.diff(offsets).astype(np.int64)
        self.seq = np.repeat(np.arange(len(self.lens)), self.lens)
        self.pos = np.arange(len(self.tok)) - np.repeat(np.asarray(offsets[:-1], np.int64), self.lens)

    def _hits(self, sids) -> np.ndarray:
        inset = np.zeros(self.sets.V, np.bool_)
        for s in sids:
            inset[self.sets.members(int(s))] = True
        return inset[self.tok]

    def last(self, sids) -> np.ndarray:
        if any(int(s) == self.sets.ALL for s in sids):
            return self.lens - 1
        out = np.full(len(self.lens), -1, np.int64)
        hit = self._hits(sids)
        np.maximum.at(out, self.seq[hit], self.pos[hit])
        return out

    def first(self, sid: int) -> np.ndarray:
        if int(sid) == self.sets.ALL:
            return np.zeros(len(self.lens), np.int64)
        out = np.full(len(self.lens), np.iinfo(np.int64).max, np.int64)
        hit = self._hits([sid])
        np.minimum.at(out, self.seq[hit], self.pos[hit])
        return out

    def _inset(self, sids) -> np.ndarray:
        """[N] bool: the eval token at each position is in one of the sets `sids`."""
        if any(int(s) == self.sets.ALL for s in sids):
            return np.ones(len(self.tok), np.bool_)
        return self._hits(sids)

    def at(self, s: Specs, i: int) -> np.ndarray:
        """[N] bool: the positions where rule i of `s` can change a log-prob (its span: up to the last of them).
        A head_out or skip also writes there (writes(s, i)), and a position's write count decides how the next
        position stores its outputs (kernels.run_seqs, dense_pos), which changes that position's float64
        rounding: splice checks those next positions (a bigram row writes nothing: its base rows change)."""
        hit = self._inset(s.now[s.now_ptr[i]:s.now_ptr[i + 1]])
        if s.kind[i] != SPAN_BIGRAM:
            f = self.first(s.src[i])[self.seq]
            hit &= (self.pos > f) if s.kind[i] == SPAN_SKIP else (self.pos >= f)
        return hit

    @staticmethod
    def writes(s: Specs, i: int) -> bool:
        """Rule i of `s` writes outputs at its positions (so their write counts can change)."""
        return bool(s.kind[i] != SPAN_BIGRAM)

    def span(self, s: Specs, i: int) -> np.ndarray:
        """[n_seqs] prefix length outside which rule i of `s` cannot change a log-prob (0: nowhere)."""
        nows = s.now[s.now_ptr[i]:s.now_ptr[i + 1]]
        end = self.last(nows)
        if s.kind[i] == SPAN_BIGRAM:
            ok = end >= 0
        else:
            f = self.first(s.src[i])
            ok = (end > f) if s.kind[i] == SPAN_SKIP else (end >= f)
            ok &= end >= 0
        return np.where(ok, end + 1, 0)


@dataclass
class Base:
    """An old row to splice into: its per-position arrays and the positions to recompute."""
    row: int  # index into the masks being computed
    old: dict
    at: np.ndarray  # [N] bool
    wrote: np.ndarray  # [N] bool: positions of `at` where a changed rule writes (a head_out or skip)
    dense: np.ndarray  # [N] int8: how the old row's positions stored their outputs (kernels.run_seqs, out_dense)


def find_base(ref, sets, row: int, label: str, key: str, head: np.ndarray, cur: Specs, on: np.ndarray,
              pos: _Positions, load) -> Base | None:
    """The last row under `label`, if it was computed in this context and differs from `on` only in rules
    with limited spans: with the union of their positions (old versions' and new versions')."""
    old_key = read_lineage(ref, label)
    if old_key is None or old_key == key:
        return None
    got = load(old_key)
    if got is None:
        return None
    m, ex = got
    if "sp_head" not in ex or not np.array_equal(ex["sp_head"], head):
        return None
    if ex.get("sp_dense", np.zeros(0)).shape != (len(pos.tok),):  # a row stored before rows carried it
        return None
    try:
        old, old_on = Specs.from_arrays(ex)
    except (KeyError, ValueError):
        return None
    ok, nk = old.keys(old_on), cur.keys(on)
    changed = [(old, i) for d, i in ok.items() if d not in nk] + [(cur, i) for d, i in nk.items() if d not in ok]
    if len(changed) > MAX_CHANGED or any(s.kind[i] == SPAN_ALL for s, i in changed):
        return None
    at = np.zeros(len(pos.tok), np.bool_)
    wrote = np.zeros(len(pos.tok), np.bool_)
    for s, i in changed:
        hit = pos.at(s, i)
        at |= hit
        if pos.writes(s, i):
            wrote |= hit
    return Base(row, m, at, wrote, ex["sp_dense"])


def splice(hm, ref, masks: list[np.ndarray], bases: list[Base], fields: tuple[str, ...]) -> list[dict] | None:
    """The rows of `bases` (masks[b.row]) with the union of their positions recomputed in one engine pass
    (stream_metrics_rows at those positions of the prefixes leading to them: the same row fusion as a full pass
    over these masks) and spliced into the old rows, `fields` and "dense" (how each position stored its outputs).
    Then the position after each one where a changed rule writes: if its storage (dense or not, decided by the
    write count before it) is not the old row's any more, it is recomputed too, in a second pass (a number edit
    keeps every count). None when the union covers more than MAX_SHARE of the positions."""
    at = np.logical_or.reduce([b.at for b in bases])
    n_at = int(at.sum())
    if n_at > MAX_SHARE * len(at):
        return None
    out = [{k: np.array(b.old[k]) for k in fields} | {"dense": np.array(b.dense)} for b in bases]
    _recompute(hm, ref, masks, bases, at, fields, out)
    # the positions after those where a changed rule writes, in the same sequence, not recomputed yet
    wrote = np.logical_or.reduce([b.wrote for b in bases])
    after = np.zeros_like(at)
    after[1:] = wrote[:-1]
    after[np.asarray(ref.offsets[:-1], np.int64)] = False
    after &= ~at
    if after.any():
        before = np.flatnonzero(after) - 1
        flip = np.zeros_like(at)
        for b, o in zip(bases, out):  # old storage against the new count before them (its row's own pass)
            flip[after] |= (b.dense[after] & 1) != (o["dense"][before] >> 1 & 1)
        if flip.any():
            _recompute(hm, ref, masks, bases, flip, fields, out)
    return out


def _recompute(hm, ref, masks: list[np.ndarray], bases: list[Base], at: np.ndarray, fields: tuple[str, ...],
               out: list[dict]) -> None:
    """`out`'s rows (one per base) at the positions `at`, from one stream_metrics_rows pass."""
    starts = np.asarray(ref.offsets[:-1], np.int64)
    lens = np.diff(ref.offsets).astype(np.int64)
    seq = np.repeat(np.arange(len(lens)), lens)
    ends = np.zeros(len(lens), np.int64)  # per sequence: one past its last position to recompute
    where = np.flatnonzero(at)
    if not len(where):
        return
    np.maximum.at(ends, seq[where], where - starts[seq[where]] + 1)
    idx = np.flatnonzero(ends)
    # each prefix runs one token past its last such position (when there is one) so that position sees its
    # true next token (ce); that extra position is read, not finished
    run = np.minimum(ends[idx] + 1, lens[idx])
    sub = np.concatenate([at[a:a + n] for a, n in zip(starts[idx], run)])
    seqs = [ref.seqs[q][:n] for q, n in zip(idx, run)]
    # the reference rows are read in place (ref_rows), not gathered: a copy of them is fresh memory, ~1 s here
    new = hm.stream_metrics_rows(seqs, ref.logp, [masks[b.row] for b in bases], at=sub, ref_rows=where,
                                 ref_key=ref.content_key)
    for o, m in zip(out, new):
        for k in fields + ("dense",):
            o[k][where] = m[k]


# -- neuron edits: a full pass that keeps the old rows where the edited neurons stay off ----------------------
GATE_SLOP = 1e-9  # relative: the float rounding of a pre-activation sum, many times over


def _scale(sets, sid: int) -> float:
    """The largest |weight| a token can have in set sid: what one input number of a neuron is multiplied by."""
    if sid < sets.V or not sets.is_weighted(sid):
        return 1.0
    w = np.abs(np.asarray(sets.weights_of(sid), np.float64))
    return float(w.max()) if len(w) else 0.0


def _neuron_numbers(sets, r) -> tuple[tuple, np.ndarray, np.ndarray]:
    """(its inputs' layout, its input numbers, their scales): threshold, `now`, `present`, `attend`."""
    layout = (tuple(s for s, _ in r.n_now), tuple(s for s, _ in r.n_present), tuple((h, s) for h, s, _ in r.n_attend))
    nums = [r.threshold] + [w for _, w in r.n_now] + [w for _, w in r.n_present] + [w for _, _, w in r.n_attend]
    scale = [1.0] + [_scale(sets, s) for s, _ in r.n_now] + [1.0] * len(r.n_present) + \
        [_scale(sets, s) for _, s, _ in r.n_attend]
    return layout, np.array(nums, np.float64), np.array(scale, np.float64)


def neuron_margin(sets, old, new) -> float | None:
    """A bound on |activation after − before| of a neuron edited from `old` to `new` (numbers only: the same
    inputs), at any position: |Δthreshold| + Σ |Δw|·(the largest weight its set gives a token), since a `now` input
    is one token's weight, a `present` one is 0 or 1, and an `attend` one is attention (summing to 1) times weights;
    plus a relative slop for the rounding of either sum. None when the inputs differ in more than numbers."""
    if old.kind != "neuron" or new.kind != "neuron" or old.id != new.id:
        return None
    lo, xo, so = _neuron_numbers(sets, old)
    ln, xn, sn = _neuron_numbers(sets, new)
    if lo != ln:
        return None
    size = float(np.abs(xo) @ so + np.abs(xn) @ sn)
    return float(np.abs(xn - xo) @ sn) + GATE_SLOP * (1.0 + size)


@dataclass
class Gate:
    """Old rows to keep where the edited neurons stay off (HandModel.stream_metrics_rows' gate)."""
    rows: list[int]  # indices into the masks being computed
    olds: list[dict]  # their old rows (ROW fields), in the same order
    gate: object  # handmodel.engine.NeuronGate


def find_gate(ref, rules, rows: list[int], labels: list[str], keys: list[str], head: np.ndarray, cur: Specs,
              on: list[np.ndarray], load) -> Gate | None:
    """When every row of `rows` has a last row under its label, computed in this context, that differs from it only
    in neurons whose numbers an edit changed (the replaced versions known: rules.replaced_rules()): the gate that
    keeps those old rows where the edited neurons stay off. Else None."""
    from handmodel.engine import NeuronGate

    olds, dense, pairs = [], [], None
    for i in rows:
        old_key = read_lineage(ref, labels[i])
        got = load(old_key) if old_key is not None and old_key != keys[i] else None
        if got is None:
            return None
        m, ex = got
        if "sp_head" not in ex or not np.array_equal(ex["sp_head"], head):
            return None
        d = ex.get("sp_dense")
        if d is None or d.shape != (len(ref.tokens),):
            return None
        dense.append(d)
        try:
            old, old_on = Specs.from_arrays(ex)
        except (KeyError, ValueError):
            return None
        ok, nk = old.keys(old_on), cur.keys(on[i])
        gone = sorted(dg for dg in ok if dg not in nk)
        came = sorted(nk[dg] for dg in nk if dg not in ok)
        if not came or len(gone) != len(came) or pairs is not None and (gone, came) != pairs:
            return None
        pairs = (gone, came)
        olds.append(m)
    gone, came = pairs
    if any(rules.rules[j].kind != "neuron" for j in came):
        return None  # before reading the replaced rules from the rule cache
    by_id = {rules.rules[j].id: j for j in came}
    replaced = rules.replaced_rules()
    margins, idx = [], []
    for dg in gone:
        r_old = replaced.get(dg)
        j = by_id.get(r_old.id) if r_old is not None else None
        mg = neuron_margin(rules.sets, r_old, rules.rules[j]) if j is not None else None
        if mg is None:
            return None
        idx.append(j)
        margins.append(mg)
    if sorted(idx) != sorted(came):
        return None
    return Gate(list(rows), olds, NeuronGate(idx, np.array(margins), dense))


def merge_kept(m: dict, old: dict, fields: tuple[str, ...]) -> dict:
    """A gated pass's row with the old row's values where it kept them (m["kept"])."""
    kept = np.asarray(m["kept"])
    out = dict(m)
    for k in fields:
        a = np.array(m[k])
        a[kept] = np.asarray(old[k])[kept]
        out[k] = a
    return out
