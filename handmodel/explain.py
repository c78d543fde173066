"""Which rules acted at every position, and by how much, at engine speed (the report's "rules that fired").

twin.contributions says it for one position by interpreting every rule in Python (~0.5 s a token on
the shipped rules). Here every rule's act is a scalar a_t times a fixed sparse vector u (its `next`):
- neurons, skips: a_t from one engine pass over a *probe* ruleset (the heads, and each probed rule with a
  one-hot `next` on its own token, so the probe's logit of that token is exactly a_t: see verify/ledger/probe.py);
- heads, head_outs (copies included): the attention rows, from the twin (`twin.head_attentions`: the
  semantics is written once);
- prior, bigram rows: fixed per current token (cached).
Descriptions use the twin's wording; tests/test_handmodel_explain.py holds records and twin equal.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import twin
from .compiled import CompiledRules, _Targets, build_arrays

PROBED = ("neuron", "skip")
ACT_EPS = 1e-5  # probe activations below this are float32 rounding of an inactive neuron (exact zero)


@dataclass(frozen=True)
class Fired:
    """One rule's act at one position: logit delta = amount x its `next` (+ copies for a copying head_out)."""
    rule: int  # index into rules.rules
    amount: float  # activation (neuron), attention mass on src (head_out), 1 (prior, bigram, skip); head: 0
    size: float  # max |logit delta| over tokens (0 for a head: it writes nothing itself)
    desc: str


def probe_rules(rules: CompiledRules, idx: list[int], copy: bool = False) -> CompiledRules:
    """A probe ruleset: every head of `rules`, then the k-th rule of idx with next = {token k: 1} (copy off,
    sets and inputs unchanged), so one engine pass reads each probed rule's amount off token k's logit;
    copy=True: the rules of idx with no `next` and copy = 1 instead. (Also verify/ledger/probe.py's.)"""
    heads = [r for r in rules.rules if r.kind == "head"]
    probes = [dataclasses.replace(rules.rules[i], next=[], copy=1.0) if copy
              else dataclasses.replace(rules.rules[i], next=[(k, 1.0)], copy=None) for k, i in enumerate(idx)]
    rs = heads + probes
    return CompiledRules(
        vocab=rules.vocab, vocab_size=rules.vocab_size, rules=rs, sets=rules.sets, n_heads=rules.n_heads,
        rule_ids=[r.id for r in rs], rule_docs=[r.doc for r in rs], rule_kinds=[r.kind for r in rs],
        rule_files=[r.file for r in rs], rule_lines=[r.line for r in rs],
        rule_group=np.zeros(len(rs), np.int64), groups=["probe"],
        rule_numbers=np.zeros(len(rs), np.int64), arrays=build_arrays(rs, rules.sets, rules.n_heads))


def probe_amounts(rules: CompiledRules, seqs: list[np.ndarray], idx: list[int], mask: np.ndarray) -> np.ndarray:
    """[N, len(idx)] float64: a_t of each probed rule at every position, from the engine (float32 log-probs:
    absolute error ~1e-6). Heads masked off stay off in the probe."""
    from .engine import HandModel

    V = rules.vocab_size
    N = sum(len(s) for s in seqs)
    out = np.zeros((N, len(idx)))
    n_heads = sum(k == "head" for k in rules.rule_kinds)
    head_on = mask[[i for i, k in enumerate(rules.rule_kinds) if k == "head"]]
    for s in range(0, len(idx), V - 1):  # token V - 1 is written by no probe: the zero level
        part = idx[s:s + V - 1]
        pm = np.concatenate([head_on, np.ones(len(part), np.bool_)])
        assert len(pm) == n_heads + len(part)
        lp = np.concatenate(HandModel(probe_rules(rules, part)).log_probs_batch(seqs, pm))
        out[:, s:s + len(part)] = lp[:, :len(part)].astype(np.float64) - lp[:, [V - 1]]
    return out


class Explainer:
    """Fired records for every position of a batch of sequences (HandModel.explain_batch)."""

    def __init__(self, rules: CompiledRules):
        self.rules = rules
        self.sets = rules.sets
        t = _Targets(rules.sets)
        for r in rules.rules:
            t.add(r.next)
        order = [np.argsort(tk, kind="stable") for tk in t.tok]  # tokens sorted: top-3 ties keep token order
        self.next_tok = [tk[o].astype(np.int64) for tk, o in zip(t.tok, order)]  # per rule: its `next` expanded
        self.next_w = [w[o] for w, o in zip(t.w, order)]
        # |amount x w| orders a rule's entries as |w| does, whatever the amount: its top 3 and its largest
        # entry are found once here, not per position (the report's hot path: ~650 acts per position)
        self.next_top = [np.argsort(-np.abs(w), kind="stable")[:3] for w in self.next_w]
        self.next_max = [float(np.abs(w).max()) if len(w) else 0.0 for w in self.next_w]
        self._bigram: dict[tuple[int, int], tuple[np.ndarray, str]] = {}
        self._in_cache: dict[int, np.ndarray] = {}

    def _in(self, sid: int) -> np.ndarray:
        m = self._in_cache.get(sid)
        if m is None:
            m = np.zeros(self.rules.vocab_size, np.bool_)
            m[self.sets.members(sid)] = True
            self._in_cache[sid] = m
        return m

    def _top(self, d: np.ndarray) -> str:
        """The twin's '; tok +x, ...' suffix: the three largest |delta| (ties: lower token id first)."""
        vocab = self.rules.vocab
        top = np.argsort(-np.abs(d), kind="stable")[:3]
        return "; " + ", ".join(f"{vocab[v]!r} {d[v]:+.3f}" for v in top if d[v] != 0)

    def _scaled(self, i: int, amount: float, desc: str, extra: np.ndarray | None = None) -> Fired | None:
        """Rule i writing amount x next (+ extra, a dense delta): None if nothing changes."""
        tok, w = self.next_tok[i], self.next_w[i]
        if extra is None:
            if amount == 0 or self.next_max[i] == 0:
                return None
            vocab = self.rules.vocab
            suffix = "; " + ", ".join(f"{vocab[tok[j]]!r} {amount * w[j]:+.3f}" for j in self.next_top[i] if w[j] != 0)
            return Fired(i, amount, abs(amount) * self.next_max[i], desc + suffix)  # tok sorted: ties keep token order
        d = extra
        if len(tok):
            d = extra.copy()
            d[tok] += amount * w
        if not np.any(d != 0):
            return None
        return Fired(i, amount, float(np.abs(d).max()), desc + self._top(d))

    def _bigram_row(self, i: int, c: int) -> tuple[np.ndarray, str] | None:
        key = (i, c)
        hit = self._bigram.get(key)
        if hit is None:
            r = self.rules.rules[i]
            rows = [(now, row) for now, row in r.rows if self._in(now)[c]]
            d = np.zeros(self.rules.vocab_size)
            for _, row in rows:
                for sid, w in row:
                    d[self.sets.members(sid)] += w * self.sets.weights_of(sid)
            hit = (d, "row " + ", ".join(self.sets.name(now) for now, _ in rows))
            self._bigram[key] = hit
        return hit

    def _bigram_fired(self, i: int, c: int) -> Fired | None:
        key = (-1 - i, c)  # the Fired (or None) of bigram rule i at current token c, cached beside its row
        if key not in self._bigram:
            d, desc = self._bigram_row(i, c)
            self._bigram[key] = Fired(i, 1.0, float(np.abs(d).max()), desc + self._top(d)) if np.any(d != 0) else None
        return self._bigram[key]

    def _now_matrix(self, idx: list[int], sids) -> np.ndarray:
        """[len(idx), V] bool: may rule idx[j] act when the current token is v (one of its sids holds v)."""
        m = np.zeros((len(idx), self.rules.vocab_size), np.bool_)
        for j, i in enumerate(idx):
            for sid in sids(self.rules.rules[i]):
                m[j] |= self._in(sid)
        return m

    def explain(self, seqs: list[np.ndarray], mask: np.ndarray) -> list[list[Fired]]:
        """Per position of the concatenated sequences: the rules that acted, in rule order (the twin's list).
        Per current token only the rules that can act are visited: priors and heads always, bigram rules
        with a row holding it, head_outs whose `now` holds it; neurons and skips from the probe's amounts."""
        rules = self.rules
        kinds = rules.rule_kinds
        on = [i for i in range(len(kinds)) if mask[i]]
        probed = [i for i in on if kinds[i] in PROBED]
        amounts = probe_amounts(rules, seqs, probed, mask) if probed and sum(len(s) for s in seqs) else None
        floor = np.array([0.5 if kinds[i] == "skip" else ACT_EPS for i in probed])  # skip: 0 or 1; neuron: > 0
        col = {i: j for j, i in enumerate(probed)}
        heads = {rules.rules[i].head: i for i in on if kinds[i] == "head"}
        head_list = twin.head_rules(rules)
        vocab = rules.vocab
        always = [i for i in on if kinds[i] in ("prior", "head")]
        big = [i for i in on if kinds[i] == "bigram"]
        hos = [i for i in on if kinds[i] == "head_out" and rules.rules[i].head in heads]
        big_m = self._now_matrix(big, lambda r: [now for now, _ in r.rows])
        ho_m = self._now_matrix(hos, lambda r: [r.now])
        big, hos = np.array(big, np.int64), np.array(hos, np.int64)
        cand: dict[int, list[int]] = {}
        prior = {i: self._scaled(i, 1.0, "prior") for i in always if kinds[i] == "prior"}
        out: list[list[Fired]] = []
        n = 0
        for seq in seqs:
            seq = np.asarray(seq, np.int64)
            for t in range(len(seq)):
                att = twin.head_attentions(rules, seq, t, mask, head_list)  # {head: row over 0..t}
                c = int(seq[t])
                if c not in cand:
                    cand[c] = always + big[big_m[:, c]].tolist() + hos[ho_m[:, c]].tolist()
                idx = cand[c]
                if amounts is not None:
                    hit = np.flatnonzero(amounts[n + t] > floor)
                    idx = idx + [probed[j] for j in hit]
                fired: list[Fired] = []
                for i in sorted(idx):
                    r = rules.rules[i]
                    k = kinds[i]
                    f = None
                    if k == "prior":
                        f = prior[i]
                    elif k == "bigram":
                        f = self._bigram_fired(i, c)
                    elif k == "head":
                        a = att[r.head]
                        top = np.argsort(-a, kind="stable")[:3]
                        f = Fired(i, 0.0, 0.0, "attends " + ", ".join(f"{a[s]:.2f} on {vocab[seq[s]]!r}@{s}" for s in top))
                    elif k == "head_out":
                        a_row = att[r.head]
                        src_on = self._in(r.src)[seq[: t + 1]]
                        mass = float(a_row[src_on].sum())
                        extra = None
                        desc = f"attention on {self.sets.name(r.src)} = {mass:.3f}"
                        if r.copy is not None:
                            extra = np.zeros(rules.vocab_size)
                            np.add.at(extra, seq[: t + 1][src_on], r.copy * a_row[src_on])
                            desc += f"; copies ×{r.copy:g}"
                        f = self._scaled(i, mass, desc, extra)
                    elif k == "skip":
                        first = int(np.flatnonzero(self._in(r.src)[seq[:t]])[0])
                        f = self._scaled(i, 1.0, f"{self.sets.name(r.src)} earlier at {first}")
                    elif k == "neuron":
                        act = float(amounts[n + t, col[i]])
                        f = self._scaled(i, act, f"activation {act:.3f}")
                    if f is not None:
                        fired.append(f)
                out.append(fired)
            n += len(seq)
        return out
