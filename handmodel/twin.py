"""The numpy twin: a slow, direct interpreter of docs/rules.md, rule by rule, position by position.

It reads the resolved `Rule` objects (not the kernels' arrays), so it checks the compiler's flattening
as well as the kernels. Tests assert engine == twin; `explain` uses it to say which rules fired.
"""
from __future__ import annotations

import numpy as np

from .compiled import CompiledRules
from .resolve import Rule


def _in(rules: CompiledRules, sid: int, tokens: np.ndarray) -> np.ndarray:
    """Bool per token: is it in set `sid`?"""
    return np.isin(tokens, rules.sets.members(sid))


def _weight(rules: CompiledRules, sid: int, tokens: np.ndarray) -> np.ndarray:
    """Per token: its weight in set `sid` (1 for a member of a plain set, the set's weight for a member of a
    weighted set, 0 for a non-member)."""
    full = np.zeros(rules.vocab_size)
    full[rules.sets.members(sid)] = rules.sets.weights_of(sid)
    return full[tokens]


def _write(rules: CompiledRules, logit: np.ndarray, targets: list[tuple[int, float]], scale: float) -> None:
    for sid, w in targets:
        logit[rules.sets.members(sid)] += scale * w * rules.sets.weights_of(sid)


def attention(rules: CompiledRules, r: Rule, seq: np.ndarray, t: int) -> np.ndarray:
    """Head r's attention weights from position t over positions 0..t (itself included)."""
    c = seq[t]
    ctx = seq[: t + 1]
    dist = t - np.arange(t + 1)
    score = np.array([r.position.get(int(d), r.pos_default) for d in dist], dtype=np.float64)
    for now, src, w in r.scores:
        if _in(rules, now, np.array([c]))[0]:
            score += w * _in(rules, src, ctx)
    e = np.exp(score - score.max())
    return e / e.sum()


def contributions(rules: CompiledRules, seq: np.ndarray, t: int, mask: np.ndarray | None = None):
    """Per rule that changes the logits at position t: (rule index, logit delta [V], description)."""
    V = rules.vocab_size
    mask = rules.mask_of(mask)
    seq = np.asarray(seq)
    c = int(seq[t])
    cur = np.array([c])
    earlier = seq[:t]
    heads = [r for r in rules.rules if r.kind == "head"]
    att = {h: attention(rules, r, seq, t) for h, r in enumerate(heads) if mask[rules.rule_ids.index(r.id)]}
    name = rules.sets.name
    out = []
    for i, r in enumerate(rules.rules):
        if not mask[i]:
            continue
        d = np.zeros(V)
        desc = ""
        if r.kind == "prior":
            _write(rules, d, r.next, 1.0)
            desc = "prior"
        elif r.kind == "bigram":
            hit = [(now, row) for now, row in r.rows if _in(rules, now, cur)[0]]
            for now, row in hit:
                _write(rules, d, row, 1.0)
            desc = "row " + ", ".join(name(now) for now, _ in hit)
        elif r.kind == "head":
            if r.head in att:
                a = att[r.head]
                top = np.argsort(-a, kind="stable")[:3]
                desc = "attends " + ", ".join(f"{a[s]:.2f} on {rules.vocab[seq[s]]!r}@{s}" for s in top)
                out.append((i, d, desc))  # no logits of its own; listed so the reader sees the pattern
            continue
        elif r.kind == "head_out":
            if r.head in att and _in(rules, r.now, cur)[0]:
                on_src = _in(rules, r.src, seq[: t + 1])
                a = float(att[r.head][on_src].sum())
                _write(rules, d, r.next, a)
                desc = f"attention on {name(r.src)} = {a:.3f}"
                if r.copy is not None:  # copy: w x attention on each source position, to that position's own token
                    for s in np.flatnonzero(on_src):
                        d[seq[s]] += r.copy * att[r.head][s]
                    desc += f"; copies ×{r.copy:g}"
        elif r.kind == "skip":
            hits = np.flatnonzero(_in(rules, r.src, earlier))
            if len(hits) and _in(rules, r.now, cur)[0]:
                _write(rules, d, r.next, 1.0)
                desc = f"{name(r.src)} earlier at {int(hits[0])}"
        elif r.kind == "neuron":
            pre = -r.threshold
            for sid, w in r.n_now:
                pre += w * _weight(rules, sid, cur)[0]
            for sid, w in r.n_present:
                pre += w * bool(_in(rules, sid, earlier).any())
            for h, sid, w in r.n_attend:
                if h in att:
                    pre += w * float((att[h] * _weight(rules, sid, seq[: t + 1])).sum())
            act = max(0.0, pre)
            _write(rules, d, r.next, act)
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
