"""The hand model's side of the component checks: each rule's own quantity on a whole window at once.

handmodel/twin.py is the executable spec, but it walks position by position and rule by rule (about a
second per position on the shipped rules); the component checks need every rule's attention, activation
and logit contribution at tens of thousands of positions. This module evaluates the same semantics
(docs/rules.md) vectorised over a window; tests/test_claims_power.py checks it against the twin.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from handmodel.compiled import CompiledRules
from handmodel.resolve import Rule


class RuleVectors:
    """Dense [V] vectors of set memberships and value tables, built once per ruleset and reused."""

    def __init__(self, rules: CompiledRules):
        self.rules = rules
        self.V = rules.vocab_size
        self._in: dict[int, np.ndarray] = {}
        self._w: dict[int, np.ndarray] = {}
        self.heads = [r for r in rules.rules if r.kind == "head"]  # head number h = index here (as the twin)
        self._scores: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._neuron: dict[str, tuple[np.ndarray, list[tuple[int, np.ndarray]]]] = {}

    def member(self, sid: int) -> np.ndarray:
        """Bool [V]: token v is in set sid."""
        if sid not in self._in:
            m = np.zeros(self.V, dtype=np.bool_)
            m[self.rules.sets.members(sid)] = True
            self._in[sid] = m
        return self._in[sid]

    def weight(self, sid: int) -> np.ndarray:
        """Float [V]: the token's weight in sid (1 for a plain set's members, 0 outside)."""
        if sid not in self._w:
            w = np.zeros(self.V)
            w[self.rules.sets.members(sid)] = self.rules.sets.weights_of(sid)
            self._w[sid] = w
        return self._w[sid]

    def table(self, items: list[tuple[int, float]]) -> np.ndarray:
        """A `{reference = value}` table as the [V] logit vector it adds (overlaps add)."""
        out = np.zeros(self.V)
        for sid, w in items:
            out += w * self.weight(sid)
        return out

    def scores(self, h: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Head h's score entries grouped by their `now` set: (now members [V] bool, Σ w·[v ∈ src] [V])."""
        if h not in self._scores:
            by: dict[int, np.ndarray] = {}
            for now, src, w in self.heads[h].scores:
                by[now] = by.get(now, np.zeros(self.V)) + w * self.member(src)
            self._scores[h] = [(self.member(now), u) for now, u in by.items()]
        return self._scores[h]

    def neuron_inputs(self, r: Rule) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """A neuron's `now` table as one [V] vector, and its `attend` tables as one [V] vector per head."""
        if r.id not in self._neuron:
            att: dict[int, np.ndarray] = {}
            for h, sid, w in r.n_attend:
                att[h] = att.get(h, np.zeros(self.V)) + w * self.weight(sid)
            self._neuron[r.id] = (self.table(r.n_now), list(att.items()))
        return self._neuron[r.id]

    def written(self, items: list[tuple[int, float]]) -> np.ndarray:
        """Bool [V]: the tokens a table writes to (members of its entries)."""
        out = np.zeros(self.V, dtype=np.bool_)
        for sid, _ in items:
            out |= self.member(sid)
        return out


def attention(vec: RuleVectors, h: int, seq: np.ndarray) -> np.ndarray:
    """[T, T] attention of hand head number h at every position t over s ≤ t (row t; zeros above the diagonal)."""
    r = vec.heads[h]
    T = len(seq)
    d = np.arange(T)[:, None] - np.arange(T)[None, :]
    pv = np.array([r.position.get(k, r.pos_default) for k in range(T)], dtype=np.float64)
    score = pv[np.maximum(d, 0)]
    for now, u in vec.scores(h):
        score = score + np.outer(now[seq], u[seq])
    score = np.where(d >= 0, score, -np.inf)
    e = np.exp(score - score.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@dataclass
class WindowState:
    """One window's hand-side quantities shared by every rule: each hand head's attention."""
    seq: np.ndarray  # [T] int64
    att: list[np.ndarray]  # per hand head number: [T, T]


def window_state(vec: RuleVectors, seq: np.ndarray) -> WindowState:
    seq = np.asarray(seq, dtype=np.int64)
    return WindowState(seq, [attention(vec, h, seq) for h in range(len(vec.heads))])


def neuron_activation(vec: RuleVectors, r: Rule, ws: WindowState) -> np.ndarray:
    """[T] the hand neuron's activation max(0, pre) at every position (docs/rules.md, [[neuron]])."""
    seq = ws.seq
    now, attend = vec.neuron_inputs(r)
    pre = now[seq] - r.threshold
    for sid, w in r.n_present:
        seen = np.cumsum(vec.member(sid)[seq])
        pre[1:] += w * (seen[:-1] > 0)  # strictly earlier positions
    for h, u in attend:
        pre += ws.att[h] @ u[seq]
    return np.maximum(pre, 0.0)


def source_mass(vec: RuleVectors, r: Rule, ws: WindowState) -> np.ndarray:
    """[T] a head_out's attention mass on its source set, A_t(src)."""
    return ws.att[r.head] @ vec.member(r.src)[ws.seq].astype(np.float64)


def acts(vec: RuleVectors, r: Rule, ws: WindowState) -> np.ndarray:
    """Bool [T]: where the rule changes the logits (its contribution is not zero by construction)."""
    seq = ws.seq
    T = len(seq)
    if r.kind == "prior":
        return np.ones(T, dtype=np.bool_)
    if r.kind == "bigram":
        return np.logical_or.reduce([vec.member(now)[seq] for now, _ in r.rows]) if r.rows else np.zeros(T, np.bool_)
    if r.kind == "head_out":
        present = np.cumsum(vec.member(r.src)[seq]) > 0
        return vec.member(r.now)[seq] & present
    if r.kind == "skip":
        seen = np.cumsum(vec.member(r.src)[seq])
        earlier = np.concatenate([[False], seen[:-1] > 0])
        return vec.member(r.now)[seq] & earlier
    if r.kind == "neuron":
        return neuron_activation(vec, r, ws) > 0
    return np.zeros(T, dtype=np.bool_)  # a [[head]] writes no logits of its own


def contribution(vec: RuleVectors, r: Rule, ws: WindowState, ts: np.ndarray) -> np.ndarray:
    """[len(ts), V] the rule's logit contribution at positions ts (what switching it off removes)."""
    seq = ws.seq
    ts = np.asarray(ts, dtype=np.int64)
    out = np.zeros((len(ts), vec.V))
    if r.kind == "prior":
        out += vec.table(r.next)
    elif r.kind == "bigram":
        for now, row in r.rows:
            hit = vec.member(now)[seq[ts]]
            if hit.any():
                out[hit] += vec.table(row)
    elif r.kind == "head_out":
        on = vec.member(r.now)[seq[ts]]
        if r.next:
            out += (on * source_mass(vec, r, ws)[ts])[:, None] * vec.table(r.next)
        if r.copy is not None:
            src = vec.member(r.src)[seq]
            for i, t in enumerate(ts):
                if on[i]:
                    s = np.flatnonzero(src[: t + 1])
                    np.add.at(out[i], seq[s], r.copy * ws.att[r.head][t, s])
    elif r.kind == "skip":
        out += acts(vec, r, ws)[ts, None] * vec.table(r.next)
    elif r.kind == "neuron":
        out += neuron_activation(vec, r, ws)[ts, None] * vec.table(r.next)
    return out
