"""Which rules acted at every position, and by how much, at engine speed (the report's "rules that fired").

twin.contributions says it for one position by interpreting every rule in Python (~0.5 s a token on
the shipped rules). Here every rule's act is a scalar a_t times a fixed sparse vector u (its `next`):
- neurons, skips: a_t from one engine pass over a *probe* ruleset (the heads, and each probed rule with a
  one-hot `next` on its own token, so the probe's logit of that token is exactly a_t: see verify/ledger/probe.py);
- heads, head_outs (copies included): one attention matrix per head and sequence (attention_matrix: the
  twin's score and softmax functions, all rows at once), times the `src` membership of each position;
- prior, bigram rows: fixed per current token (cached).
Explainer.acts gives these as arrays; a record's description (the twin's wording) is made only when asked
for (Explained.fired). tests/test_handmodel_explain.py holds records and twin equal.
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


def score_factors(r) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head r's score entries as (distinct now sids [Kn], distinct src sids [Ks], weights [Kn, Ks]): entries
    with the same (now, src) add up. ~60 x ~200 for a fitted head's ~1,300 entries."""
    now, src, w = twin._score_arrays(r)
    un, i = np.unique(now, return_inverse=True)
    us, j = np.unique(src, return_inverse=True)
    m = np.zeros((len(un), len(us)))
    np.add.at(m, (i.reshape(-1), j.reshape(-1)), w)
    return un, us, m


def attention_matrix(rules: CompiledRules, r, seq: np.ndarray, factors=None) -> np.ndarray:
    """[T, T] head r's attention row at every t of seq (row t over s <= t, 0 beyond): twin.attention for
    all t at once. The score entries are summed over the sequence's distinct tokens (factors: r's
    score_factors, when the caller keeps them), then expanded."""
    T = len(seq)
    d = np.arange(T)[:, None] - np.arange(T)[None, :]
    score = twin.position_score(r.position, r.pos_default, np.arange(T))[np.maximum(d, 0)]
    if r.scores:
        un, us, m = score_factors(r) if factors is None else factors
        uniq, inv = np.unique(seq, return_inverse=True)
        pair = twin._in_sets(rules, un, uniq).T @ (m @ twin._in_sets(rules, us, uniq))  # [U, U]
        score = score + pair[inv][:, inv]
    return twin.softmax_attention(np.where(d >= 0, score, -np.inf))


def _distinct_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows of m, in first-seen order; for each row of m, the index of its distinct row)."""
    first: dict[bytes, int] = {}
    rows: list[int] = []
    which = np.empty(len(m), np.int64)
    for k, row in enumerate(m):
        j = first.setdefault(row.tobytes(), len(rows))
        if j == len(rows):
            rows.append(k)
        which[k] = j
    return m[rows], which


class Explained:
    """Which rules acted at each position of a batch (Explainer.acts), as arrays [N, n_rules] (N positions of
    the concatenated sequences): acted, amount, size as in Fired. A record's description is made on demand:
    the report describes ~13 of the ~650 acts at a position, and formatting them all was most of its time."""

    def __init__(self, ex: "Explainer", seqs: list[np.ndarray], acted: np.ndarray, amount: np.ndarray,
                 size: np.ndarray, att: list[dict[int, np.ndarray]]):
        self._ex, self.seqs, self._att = ex, seqs, att
        self.acted, self.amount, self.size = acted, amount, size
        lens = [len(s) for s in seqs]
        self._q = np.repeat(np.arange(len(seqs)), lens)
        self._t = np.concatenate([np.arange(n) for n in lens]) if seqs else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.acted)

    def rules_at(self, n: int) -> np.ndarray:
        """Rule indices that acted at position n, in rule order."""
        return np.flatnonzero(self.acted[n])

    def fired(self, n: int, i: int) -> Fired:
        """Rule i's record at position n (i among rules_at(n))."""
        q, t = int(self._q[n]), int(self._t[n])
        a = float(self.amount[n, i])
        return Fired(int(i), a, float(self.size[n, i]), self._ex.describe(int(i), self.seqs[q], t, a, self._att[q]))

    def all_fired(self, n: int) -> list[Fired]:
        return [self.fired(n, i) for i in self.rules_at(n)]


class Explainer:
    """Fired records for every position of a batch of sequences (HandModel.explain_batch; the report: acts)."""

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
        # entry are found once here, not per position
        self.next_top = [np.argsort(-np.abs(w), kind="stable")[:3] for w in self.next_w]
        self.next_max = np.array([float(np.abs(w).max()) if len(w) else 0.0 for w in self.next_w])
        self._bigram: dict[tuple[int, int], tuple[np.ndarray, str]] = {}
        self._row_now: dict[int, np.ndarray] = {}
        self._rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._bigram_descs: dict[tuple[int, int], str] = {}
        self._ho: dict[int, tuple] = {}
        self._fac: dict[int, tuple] = {}
        self._in_cache: dict[int, np.ndarray] = {}

    def _in(self, sid: int) -> np.ndarray:
        m = self._in_cache.get(sid)
        if m is None:
            m = np.zeros(self.rules.vocab_size, np.bool_)
            m[self.sets.members(sid)] = True
            self._in_cache[sid] = m
        return m

    def _factors(self, i: int) -> tuple:
        got = self._fac.get(i)
        if got is None:
            got = self._fac[i] = score_factors(self.rules.rules[i])
        return got

    def _in_many(self, sids) -> np.ndarray:
        """[len(sids), V] bool: _in of each."""
        return np.stack([self._in(s) for s in sids]) if len(sids) else np.zeros((0, self.rules.vocab_size), np.bool_)

    def _top(self, d: np.ndarray) -> str:
        """The twin's '; tok +x, ...' suffix: the three largest |delta| (ties: lower token id first)."""
        vocab = self.rules.vocab
        top = np.argsort(-np.abs(d), kind="stable")[:3]
        return "; " + ", ".join(f"{vocab[v]!r} {d[v]:+.3f}" for v in top if d[v] != 0)

    def _suffix(self, i: int, amount: float) -> str:
        """_top of amount x rule i's `next` (its entries are sorted by token: ties keep token order)."""
        tok, w, vocab = self.next_tok[i], self.next_w[i], self.rules.vocab
        return "; " + ", ".join(f"{vocab[tok[j]]!r} {amount * w[j]:+.3f}" for j in self.next_top[i] if w[j] != 0)

    def _bigram_row(self, i: int, c: int) -> tuple[np.ndarray, str]:
        """Bigram rule i at current token c: (its dense logit delta, 'row <now sets>'), cached."""
        key = (i, c)
        hit = self._bigram.get(key)
        if hit is None:
            r = self.rules.rules[i]
            if i not in self._row_now:
                self._row_now[i] = self._in_many([now for now, _ in r.rows])  # [rows, V]: row k holds v
            ks = np.flatnonzero(self._row_now[i][:, c])
            d = np.zeros(self.rules.vocab_size)
            if len(ks):
                tok, w = zip(*(self._row_vec(i, k) for k in ks))
                np.add.at(d, np.concatenate(tok), np.concatenate(w))  # in row then entry order, as the twin adds
            hit = (d, "row " + ", ".join(self.sets.name(r.rows[k][0]) for k in ks))
            self._bigram[key] = hit
        return hit

    def _row_vec(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row k of bigram rule i expanded: (tokens, weights) in entry order (a token may repeat)."""
        got = self._rows.get((i, k))
        if got is None:
            row = self.rules.rules[i].rows[k][1]
            got = (np.concatenate([self.sets.members(sid) for sid, _ in row]) if row else np.zeros(0, np.int64),
                   np.concatenate([w * self.sets.weights_of(sid) for sid, w in row]) if row else np.zeros(0))
            self._rows[(i, k)] = got
        return got

    def _bigram_desc(self, i: int, c: int) -> str:
        got = self._bigram_descs.get((i, c))
        if got is None:
            d, desc = self._bigram_row(i, c)
            got = self._bigram_descs[(i, c)] = desc + self._top(d)
        return got

    def _copy_delta(self, i: int, seq: np.ndarray, t: int, a_row: np.ndarray, mass: float) -> np.ndarray:
        """[V] copying head_out i at t: copy x attention on each src position, added to its token, + mass x next."""
        r = self.rules.rules[i]
        src_on = self._in(r.src)[seq[: t + 1]]
        d = np.zeros(self.rules.vocab_size)
        np.add.at(d, seq[: t + 1][src_on], r.copy * a_row[src_on])
        d[self.next_tok[i]] += mass * self.next_w[i]
        return d

    def describe(self, i: int, seq: np.ndarray, t: int, amount: float, att: dict[int, np.ndarray]) -> str:
        """The twin's wording of rule i's act at position t of seq (amount: Fired.amount; att: {head: [T, T]})."""
        r, k = self.rules.rules[i], self.rules.rule_kinds[i]
        vocab = self.rules.vocab
        if k == "prior":
            return "prior" + self._suffix(i, 1.0)
        if k == "bigram":
            return self._bigram_desc(i, int(seq[t]))
        if k == "head":
            a = att[r.head][t, : t + 1]
            top = np.argsort(-a, kind="stable")[:3]
            return "attends " + ", ".join(f"{a[s]:.2f} on {vocab[seq[s]]!r}@{s}" for s in top)
        if k == "head_out":
            desc = f"attention on {self.sets.name(r.src)} = {amount:.3f}"
            if r.copy is None:
                return desc + self._suffix(i, amount)
            return desc + f"; copies ×{r.copy:g}" + self._top(self._copy_delta(i, seq, t, att[r.head][t, : t + 1], amount))
        if k == "skip":
            first = int(np.flatnonzero(self._in(r.src)[seq[:t]])[0])
            return f"{self.sets.name(r.src)} earlier at {first}" + self._suffix(i, 1.0)
        assert k == "neuron", k
        return f"activation {amount:.3f}" + self._suffix(i, amount)

    def explain(self, seqs: list[np.ndarray], mask: np.ndarray) -> list[list[Fired]]:
        """Per position of the concatenated sequences: the rules that acted, in rule order (the twin's list)."""
        ex = self.acts(seqs, mask)
        return [ex.all_fired(n) for n in range(len(ex))]

    def acts(self, seqs: list[np.ndarray], mask: np.ndarray) -> Explained:
        """Which rules acted where and by how much, as arrays (no descriptions yet). Per kind: priors and heads
        everywhere; bigram rules per current token (cached); head_outs whose `now` holds the current token,
        from attention matrices (one per head and sequence); neurons and skips from the probe's amounts."""
        rules = self.rules
        kinds = rules.rule_kinds
        seqs = [np.asarray(s, np.int64) for s in seqs]
        N, R = sum(len(s) for s in seqs), len(kinds)
        tok = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
        # column-major: filled a rule (column) at a time
        acted, amount, size = (np.zeros((N, R), dt, order="F") for dt in (np.bool_, np.float64, np.float64))
        on = [i for i in range(R) if mask[i]]
        by = {k: [i for i in on if kinds[i] == k] for k in ("prior", "head", "bigram", "head_out", "skip", "neuron")}
        nmax = self.next_max
        for i in by["prior"]:  # 1 x next at every position
            if nmax[i] != 0:
                acted[:, i], amount[:, i], size[:, i] = True, 1.0, nmax[i]
        acted[:, by["head"]] = True  # listed with what they attend to; they write nothing themselves
        self._bigram_acts(tok, by["bigram"], acted, amount, size)
        probed = [i for i in on if kinds[i] in PROBED]  # rule order: the probe pass of the old per-rule path
        if probed and N:
            amt = probe_amounts(rules, seqs, probed, mask)
            is_skip = np.array([kinds[i] == "skip" for i in probed])
            # skip: 0 or 1; neuron: > 0 (below ACT_EPS: float32 rounding of an inactive neuron)
            act = (amt > np.where(is_skip, 0.5, ACT_EPS)) & (nmax[probed] != 0)
            acted[:, probed] = act
            amount[:, probed] = np.where(act, np.where(is_skip, 1.0, amt), 0.0)
            size[:, probed] = np.where(act, np.where(is_skip, 1.0, np.abs(amt)) * nmax[probed], 0.0)
        heads = {rules.rules[i].head: i for i in by["head"]}
        att: list[dict[int, np.ndarray]] = []
        n0 = 0
        for seq in seqs:
            a = {h: attention_matrix(rules, rules.rules[i], seq, self._factors(i)) for h, i in heads.items()}
            att.append(a)
            self._head_out_acts(seq, a, by["head_out"], slice(n0, n0 + len(seq)), acted, amount, size)
            n0 += len(seq)
        return Explained(self, seqs, acted, amount, size, att)

    def _bigram_acts(self, tok: np.ndarray, big: list[int], acted, amount, size) -> None:
        """Bigram rules: the sum of their rows whose `now` holds the current token (fixed per token)."""
        if not big or not len(tok):
            return
        uniq, inv = np.unique(tok, return_inverse=True)
        holds = np.zeros((len(big), self.rules.vocab_size), np.bool_)  # bigram rule j has a row holding v
        for j, i in enumerate(big):
            holds[j] = self._in_many([now for now, _ in self.rules.rules[i].rows]).any(0)
        s = np.full((len(uniq), len(big)), -1.0)  # per distinct token: each rule's size; -1: it does not act
        for u, c in enumerate(uniq.tolist()):
            for j in np.flatnonzero(holds[:, c]):
                d = self._bigram_row(big[j], c)[0]
                if np.any(d != 0):
                    s[u, j] = float(np.abs(d).max())
        s = s[inv]
        acted[:, big] = s >= 0
        amount[:, big] = np.where(s >= 0, 1.0, 0.0)
        size[:, big] = np.maximum(s, 0.0)

    def _head_outs(self, h: int, hos: list[int]) -> tuple:
        """head h's head_outs among hos: (indices, src [J, V] bool, now [J, V] bool, copy [J] (nan: none))."""
        got = self._ho.get(h)
        if got is None or got[0] != hos:
            rs = self.rules.rules
            mine = np.array([i for i in hos if rs[i].head == h], np.int64)
            got = (hos, mine, self._in_many([rs[i].src for i in mine]), self._in_many([rs[i].now for i in mine]),
                   np.array([np.nan if rs[i].copy is None else rs[i].copy for i in mine]))
            self._ho[h] = got
        return got[1:]

    def _head_out_acts(self, seq: np.ndarray, att: dict[int, np.ndarray], hos: list[int], rows: slice,
                       acted, amount, size) -> None:
        """head_outs (of heads switched on) whose `now` holds the current token: amount = attention mass on
        `src`; a copying one also adds copy x attention to each src position's token. Computed per distinct
        `src` pattern over the sequence's tokens (a few dozen of the ~200 head_outs of a head)."""
        T = len(seq)
        uniq, inv = np.unique(seq, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        starts = np.searchsorted(inv[order], np.arange(len(uniq)))
        for h, A in att.items():
            mine, src_m, now_m, copy = self._head_outs(h, hos)
            if not len(mine):
                continue
            agg = np.add.reduceat(A[:, order], starts, axis=1)  # [T, U]: attention on each distinct token
            pat, which = _distinct_rows(src_m[:, uniq])  # [P, U] src patterns over this sequence; rule -> pattern
            mass = (agg @ pat.T.astype(np.float64))[:, which]  # [T, J]
            top = np.stack([agg[:, p].max(1) if p.any() else np.zeros(T) for p in pat], 1)[:, which]  # [T, J]
            elig = now_m[:, seq].T  # [T, J]: the current token is in `now`
            plain = np.isnan(copy)
            nmax = self.next_max[mine]
            # plain: amount x next; copying with no `next`: |copy| x the largest attention on one src token
            sz = np.where(plain, np.abs(mass) * nmax, np.abs(np.nan_to_num(copy)) * top)
            ok = elig & np.where(plain, (mass != 0) & (nmax != 0), sz != 0)
            ok &= plain | np.array([len(self.next_tok[i]) == 0 for i in mine])
            acted[rows, mine] = ok
            amount[rows, mine] = np.where(ok, mass, 0.0)
            size[rows, mine] = np.where(ok, sz, 0.0)
            for j in np.flatnonzero(~plain & np.array([len(self.next_tok[i]) > 0 for i in mine])):
                i, on_src = mine[j], pat[which[j]]
                tk = self.next_tok[i]
                keys = np.union1d(uniq[on_src], tk)  # the tokens it writes: copied ones and its `next`
                d = np.zeros((T, len(keys)))
                d[:, np.searchsorted(keys, uniq[on_src])] += copy[j] * agg[:, on_src]
                d[:, np.searchsorted(keys, tk)] += mass[:, [j]] * self.next_w[i]
                a = elig[:, j] & (d != 0).any(1)
                acted[rows, i] = a
                amount[rows, i] = np.where(a, mass[:, j], 0.0)
                size[rows, i] = np.where(a, np.abs(d).max(1), 0.0)
