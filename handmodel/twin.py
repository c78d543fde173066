"""The numpy twin: a slow, direct interpreter of docs/rules.md, rule by rule, position by position.

It reads the resolved `Rule` objects (not the kernels' arrays), so it checks the compiler's flattening
as well as the kernels. Tests assert engine == twin; `explain` uses it to say which rules fired.

Its public functions are THE numpy semantics of each rule kind: the claims (verify/claims/) and the
drafting code (verify/discover/) call them instead of re-deriving a rule's meaning. The same semantics
are written in two other places only: the numba kernels (handmodel/kernels.py, via the compiler
handmodel/compiled.py; tested equal to this file) and the torch module verify/discover/torchsem.py
(gradients for `fit` and the joint fit; tested equal to this file). docs/architecture.md lists them.

Shapes: `seq` is a [T] int array of token ids, `t` a position in it (0..T−1), a logit vector is [V]
float64, an attention row at t is [t+1] float64 over positions 0..t (itself included).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .compiled import CompiledRules
from .resolve import Rule


# -- token sets -------------------------------------------------------------------------------------

def in_set(rules: CompiledRules, sid: int, tokens) -> np.ndarray:
    """Bool shaped like `tokens`: is each token in set `sid` (a token id < V, else a class or weighted set)?"""
    tokens = np.asarray(tokens)
    if sid < rules.vocab_size:
        return tokens == sid
    return rules.sets.member_matrix[sid - rules.vocab_size][tokens]


def set_weight(rules: CompiledRules, sid: int, tokens) -> np.ndarray:
    """Float shaped like `tokens`: each token's weight in set `sid` (1 for a member of a plain set, its own
    weight w_v for a member of a weighted set, 0 for a non-member)."""
    if not rules.sets.is_weighted(sid):
        return in_set(rules, sid, tokens).astype(np.float64)
    full = np.zeros(rules.vocab_size)
    full[rules.sets.members(sid)] = rules.sets.weights_of(sid)
    return full[np.asarray(tokens)]


def add_targets(rules: CompiledRules, logit: np.ndarray, targets: list[tuple[int, float]], scale: float) -> None:
    """A `next` table written at `scale`: logit[v] += scale · w · weight of v in the set, for each (set, w)."""
    for sid, w in targets:
        logit[rules.sets.members(sid)] += scale * w * rules.sets.weights_of(sid)


# -- [[head]]: attention --------------------------------------------------------------------------

def position_score(position: Mapping[int, float] | np.ndarray, pos_default: float, dist: np.ndarray) -> np.ndarray:
    """A head's position score at each distance d = t − s ≥ 0 of `dist`: position[d] where the table has
    d (a {d: score} table or an array over d = 0..D−1), else pos_default."""
    dist = np.asarray(dist)
    if isinstance(position, Mapping):
        return np.array([position.get(int(d), pos_default) for d in dist.ravel()], np.float64).reshape(dist.shape)
    table = np.asarray(position, np.float64)
    out = np.full(dist.shape, float(pos_default))
    near = dist < len(table)
    out[near] = table[dist[near]]
    return out


def softmax_attention(score: np.ndarray) -> np.ndarray:
    """Attention weights from scores along the last axis (−inf: a position that cannot be attended)."""
    e = np.exp(score - score.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_scores(rules: CompiledRules, r: Rule, seq: np.ndarray, t: int) -> np.ndarray:
    """[t+1] head r's scores from position t: position score of t − s, plus w for each score entry
    {now, src, w} whose `now` holds seq[t] and whose `src` holds seq[s]."""
    ctx = np.asarray(seq[: t + 1])
    score = position_score(r.position, r.pos_default, t - np.arange(t + 1))
    if not r.scores:
        return score
    # every entry at once (a fitted head has ~1,000): which entries' `now` holds c, their `src` on each s
    now, src, w = _score_arrays(r)
    hit = _in_sets(rules, now, np.array([int(seq[t])]))[:, 0] > 0
    return score + w[hit] @ _in_sets(rules, src[hit], ctx)


_SCORES: dict[int, tuple] = {}


def _score_arrays(r: Rule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """r.scores as arrays (now sids, src sids, w), memoised per rule: converting ~1,000 tuples was most of
    the cost of an attention row. The memo holds the list it was made from and is rebuilt if that list is
    another object or has grown."""
    got = _SCORES.get(id(r))
    if got is None or got[0] is not r.scores or got[1] != len(r.scores):
        sc = np.asarray(r.scores, dtype=np.float64).reshape(-1, 3)
        got = (r.scores, len(r.scores), sc[:, 0].astype(np.int64), sc[:, 1].astype(np.int64), sc[:, 2].copy())
        _SCORES[id(r)] = got
    return got[2], got[3], got[4]


def _in_sets(rules: CompiledRules, sids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[len(sids), len(tokens)] float 0/1: in_set for many sets at once."""
    V = rules.vocab_size
    cls = rules.sets.member_matrix[np.maximum(sids - V, 0)[:, None], tokens[None, :]]
    return np.where((sids < V)[:, None], sids[:, None] == tokens[None, :], cls).astype(np.float64)


def attention(rules: CompiledRules, r: Rule, seq: np.ndarray, t: int) -> np.ndarray:
    """[t+1] head r's attention weights from position t over positions 0..t (itself included)."""
    return softmax_attention(attention_scores(rules, r, seq, t))


def attention_pattern(position, pos_default: float, pair_score: np.ndarray) -> np.ndarray:
    """[T, T] a head's whole causal pattern, row t over s (0 for s > t), from its position table and the
    summed score entries of each (t, s) pair, pair_score [T, T] (or [T]: a score per source position, the
    same for every t — score entries with now = @all)."""
    T = pair_score.shape[-1]
    d = np.arange(T)[:, None] - np.arange(T)[None, :]
    s = position_score(position, pos_default, np.maximum(d, 0)) + pair_score
    return softmax_attention(np.where(d >= 0, s, -np.inf))


def head_rules(rules: CompiledRules) -> list[Rule]:
    """The [[head]] rules, indexed by head number (a head_out's / neuron attend entry's `head`)."""
    return [r for r in rules.rules if r.kind == "head"]


def head_attentions(rules: CompiledRules, seq: np.ndarray, t: int, mask: np.ndarray | None = None,
                    heads: list[Rule] | None = None) -> dict[int, np.ndarray]:
    """{head number: attention row at t} for every head the mask keeps (a masked head is absent: what
    reads it gets 0). `heads`: head_rules(rules), when the caller has them already."""
    mask = rules.mask_of(mask)
    heads = head_rules(rules) if heads is None else heads
    index = {rid: i for i, rid in enumerate(rules.rule_ids)} if len(heads) else {}
    return {h: attention(rules, r, seq, t) for h, r in enumerate(heads) if mask[index[r.id]]}


# -- per-kind contributions at one position -------------------------------------------------------

def bigram_rows(rules: CompiledRules, r: Rule, c: int) -> list[tuple[int, list[tuple[int, float]]]]:
    """The rows (now, next) of bigram r whose `now` holds the current token c (each adds its `next`)."""
    return [(now, row) for now, row in r.rows if in_set(rules, now, c)]


def skip_source(rules: CompiledRules, r: Rule, seq: np.ndarray, t: int) -> int | None:
    """Skip r fires at t (adds its `next`) when seq[t] ∈ now and a token of `src` occurs before t: the
    first such position, or None."""
    hits = np.flatnonzero(in_set(rules, r.src, seq[:t]))
    return int(hits[0]) if len(hits) and in_set(rules, r.now, int(seq[t])) else None


def source_attention(rules: CompiledRules, r: Rule, seq: np.ndarray, t: int, a: np.ndarray) -> tuple[float, np.ndarray]:
    """head_out r at t given its head's attention row a [t+1]: (attention on positions holding `src`, 0 when
    seq[t] ∉ now; bool [t+1] of those positions)."""
    on_src = in_set(rules, r.src, seq[: t + 1])
    if not in_set(rules, r.now, int(seq[t])):
        return 0.0, np.zeros(t + 1, np.bool_)
    return float(a[on_src].sum()), on_src


def head_out_logits(rules: CompiledRules, r: Rule, seq: np.ndarray, t: int, a: np.ndarray) -> np.ndarray:
    """[V] head_out r's logits at t: its `next` × attention on `src`, plus (copy = w) w × attention on each
    src position, added to that position's own token."""
    d = np.zeros(rules.vocab_size)
    mass, on_src = source_attention(rules, r, seq, t, a)
    if not on_src.any():
        return d
    add_targets(rules, d, r.next, mass)
    if r.copy is not None:
        for s in np.flatnonzero(on_src):
            d[seq[s]] += r.copy * a[s]
    return d


def neuron_preactivation(rules: CompiledRules, r: Rule, seq: np.ndarray, t: int, att: Mapping[int, np.ndarray]) -> float:
    """Neuron r's pre-activation at t: −threshold + Σ now w·(weight of seq[t]) + Σ present w·[a token of the
    set occurs before t] + Σ attend w·(head h's attention row at t · set weights of seq[:t+1]).
    att: {head number: attention row at t} (head_attentions); a head missing from it reads 0."""
    c = np.asarray(seq[t: t + 1])
    pre = -r.threshold
    for sid, w in r.n_now:
        pre += w * float(set_weight(rules, sid, c)[0])
    for sid, w in r.n_present:
        pre += w * bool(in_set(rules, sid, seq[:t]).any())
    for h, sid, w in r.n_attend:
        if h in att:
            pre += w * float((att[h] * set_weight(rules, sid, seq[: t + 1])).sum())
    return pre


def neuron_activation(pre):
    """A neuron's activation from its pre-activation (ReLU; a number, or an array elementwise); the neuron
    adds activation × `next` to the logits."""
    return np.maximum(pre, 0.0) if isinstance(pre, np.ndarray) else max(0.0, pre)


def contributions(rules: CompiledRules, seq: np.ndarray, t: int, mask: np.ndarray | None = None):
    """Per rule that changes the logits at position t: (rule index, logit delta [V], description). [[head]]
    rules are listed with a zero delta (their attention is what the reader wants to see)."""
    mask = rules.mask_of(mask)
    seq = np.asarray(seq)
    c = int(seq[t])
    att = head_attentions(rules, seq, t, mask)
    name = rules.sets.name
    out = []
    for i, r in enumerate(rules.rules):
        if not mask[i]:
            continue
        d = np.zeros(rules.vocab_size)
        desc = ""
        if r.kind == "prior":
            add_targets(rules, d, r.next, 1.0)
            desc = "prior"
        elif r.kind == "bigram":
            hit = bigram_rows(rules, r, c)
            for now, row in hit:
                add_targets(rules, d, row, 1.0)
            desc = "row " + ", ".join(name(now) for now, _ in hit)
        elif r.kind == "head":
            if r.head in att:
                a = att[r.head]
                top = np.argsort(-a, kind="stable")[:3]
                desc = "attends " + ", ".join(f"{a[s]:.2f} on {rules.vocab[seq[s]]!r}@{s}" for s in top)
                out.append((i, d, desc))  # no logits of its own; listed so the reader sees the pattern
            continue
        elif r.kind == "head_out":
            if r.head in att:
                d = head_out_logits(rules, r, seq, t, att[r.head])
                desc = f"attention on {name(r.src)} = {source_attention(rules, r, seq, t, att[r.head])[0]:.3f}"
                desc += f"; copies ×{r.copy:g}" if r.copy is not None else ""
        elif r.kind == "skip":
            s = skip_source(rules, r, seq, t)
            if s is not None:
                add_targets(rules, d, r.next, 1.0)
                desc = f"{name(r.src)} earlier at {s}"
        elif r.kind == "neuron":
            act = neuron_activation(neuron_preactivation(rules, r, seq, t, att))
            add_targets(rules, d, r.next, act)
            desc = f"activation {act:.3f}"
        if np.any(d != 0):
            top = np.argsort(-np.abs(d), kind="stable")[:3]
            desc += "; " + ", ".join(f"{rules.vocab[v]!r} {d[v]:+.3f}" for v in top if d[v] != 0)
            out.append((i, d, desc))
    return out


def logits(rules: CompiledRules, seq: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[T, V] float64 logits: the sum of every active rule's contribution."""
    seq = np.asarray(seq)
    out = np.zeros((len(seq), rules.vocab_size))
    for t in range(len(seq)):
        for _, d, _ in contributions(rules, seq, t, mask):
            out[t] += d
    return out


def log_probs(rules: CompiledRules, seq: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    z = logits(rules, seq, mask)
    m = z.max(axis=1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))


def metrics(rules: CompiledRules, seqs: list[np.ndarray], ref_logp: np.ndarray, mask=None) -> dict[str, np.ndarray]:
    """Same outputs as HandModel.stream_metrics, computed densely."""
    hand = np.concatenate([log_probs(rules, s, mask) for s in seqs]) if seqs else np.zeros((0, rules.vocab_size))
    ref = np.asarray(ref_logp, dtype=np.float64)
    p = np.exp(ref)
    S = p.sum(axis=1)
    pl = np.where(p > 0, p * np.nan_to_num(ref, neginf=0.0), 0.0)
    kl = np.maximum(0.0, (pl.sum(1) - (np.where(p > 0, p * hand, 0.0)).sum(1)) / S - np.log(S))
    nxt = np.concatenate([np.append(np.asarray(s[1:], np.int64), -1) for s in seqs]) if seqs else np.zeros(0, np.int64)
    ce = np.where(nxt >= 0, -hand[np.arange(len(nxt)), np.maximum(nxt, 0)], np.nan)
    return {"kl": kl, "ce": ce, "agree": hand.argmax(1) == ref.argmax(1), "hand_argmax": hand.argmax(1)}
