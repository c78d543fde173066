"""Exact ablation without re-running the model for every rule (the catalog's cost on a real ruleset).

Every rule except a prior, a head and a copying head_out adds to the logits at position t a fixed sparse
vector u (its `next`) times a scalar a_t: 1 for a bigram row whose `now` holds the current token or a
skip that fired, the attention mass on `src` for a head_out, the activation for a neuron. Switching the
rule off subtracts δ = a_t·u, and with q = p_hand (all rules on) and p = p_ref (renormalised):

    KL'_t − KL_t = Σ_v p_v δ_v + log Σ_v q_v e^{−δ_v} = Σ_{v∈u} p_v δ_v + log1p(Σ_{v∈u} q_v (e^{−δ_v} − 1))

so only the rule's support is touched. a_t comes from the engine itself: a *probe* ruleset keeps the
heads, drops prior and bigrams, and gives each probed rule a one-hot `next` on its own token (no two
share one), so the probe's logit of that token minus the logit of an untouched token is exactly a_t
(neurons and head_outs never feed each other: one layer). A copying head_out (`copy`, no `next`) adds
copy × its attention on each context token to that token: a probe of such rules with copy = 1 gives that
whole vector, and rules whose `now` sets are disjoint (one per class of the current token, as `suggest`
writes them) share a pass because at most one of them fires at a position. What is left (prior, heads,
copy rules that also have `next`) goes through ledger.run_ablation's recomputation, which is the slow,
obvious twin of all of this; tests hold them equal.
"""
from __future__ import annotations

import numpy as np

from handmodel.explain import probe_rules

PROBED = ("neuron", "head_out", "skip")
CHUNK_ENTRIES = 1 << 20  # (position, support token) entries per gathered block: 8 MiB per float64 array


def scalars(rules, seqs: list[np.ndarray], idx: list[int]) -> np.ndarray:
    """[N, len(idx)] float32: a_t of each probed rule (see the module doc) at every position."""
    from handmodel import HandModel

    V = rules.vocab_size
    N = sum(len(s) for s in seqs)
    out = np.zeros((N, len(idx)), np.float32)
    zero = V - 1  # written by no probe
    for s in range(0, len(idx), V - 1):  # at most V − 1 probes share a pass
        part = idx[s:s + V - 1]
        lp = np.concatenate(HandModel(probe_rules(rules, part)).log_probs_batch(seqs))
        out[:, s:s + len(part)] = lp[:, :len(part)] - lp[:, [zero]]
        del lp
    return out


def _disjoint_groups(rules, idx: list[int]) -> list[list[int]]:
    """Split rules into groups whose `now` sets are pairwise disjoint: at most one of a group fires at a position."""
    groups: list[tuple[list[int], np.ndarray]] = []
    for i in idx:
        m = np.zeros(rules.vocab_size, bool)
        m[rules.sets.members(rules.rules[i].now)] = True
        for g, used in groups:
            if not (used & m).any():
                g.append(i)
                used |= m
                break
        else:
            groups.append(([i], m))
    return [g for g, _ in groups]


def copy_logits(rules, seqs: list[np.ndarray], group: list[int], zero: int) -> np.ndarray:
    """[N, V] float32: the logits the copying rules of `group` add at every position with copy = 1 (multiply by
    a rule's copy weight where it fires). `zero` must be a token no sequence holds (copying never writes it)."""
    from handmodel import HandModel

    lp = np.concatenate(HandModel(probe_rules(rules, group, copy=True)).log_probs_batch(seqs))
    lp -= lp[:, [zero]]
    return lp


def _support(rules, targets) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, weights) of a `next` list, overlapping sets summed (the compiler's own expansion)."""
    from handmodel.compiled import _Targets

    t = _Targets(rules.sets)
    t.add(targets)
    return t.tok[0].astype(np.int64), t.w[0]


def _lse(z: np.ndarray) -> np.ndarray:
    """log Σ exp over each row of z [P, V]."""
    m = z.max(1, keepdims=True)
    return m[:, 0] + np.log(np.exp(z - m).sum(1))


def _delta_kl(p, q, hand_lp_rows, a, toks, w) -> float:
    """Σ over positions of KL' − KL when a_t·w (on toks) is subtracted. p, q [P, |toks|]: renormalised
    reference and hand probabilities there; hand_lp_rows(P-mask) -> full hand log-prob rows, used only
    where the log1p form would cancel (the support held almost all of the hand's mass)."""
    d = a[:, None] * w[None, :]
    cross = (p * d).sum(1)
    arg = (q * np.expm1(-d)).sum(1)
    lse = np.log1p(np.maximum(arg, -1.0 + 1e-300))
    bad = arg < -0.5
    if bad.any():
        full = hand_lp_rows(bad).astype(np.float64)  # [b, V]
        full[:, toks] -= d[bad]
        lse[bad] = _lse(full)
    return float((cross + lse).sum())


def fast_ablation(hm, rules, ref, kl_full: float, kl_pos: np.ndarray, log=lambda m: None) -> list[dict]:
    """Same result as ledger.run_ablation (within float rounding), in a handful of passes."""
    from . import core as L

    seqs = list(ref.seqs)
    N = sum(len(s) for s in seqs)
    n = len(rules.rules)
    tok = np.concatenate([np.asarray(s, np.int64) for s in seqs]) if seqs else np.zeros(0, np.int64)
    total = float(np.sum(kl_pos, dtype=np.float64))
    kinds = rules.rule_kinds
    probed = [i for i in range(n) if kinds[i] in PROBED and not (kinds[i] == "head_out" and rules.rules[i].copy is not None)]
    additive = probed + [i for i in range(n) if kinds[i] == "bigram"]
    absent = np.flatnonzero(np.bincount(tok, minlength=rules.vocab_size) == 0)
    copying = [i for i in range(n) if kinds[i] == "head_out" and rules.rules[i].copy is not None
               and not rules.rules[i].next] if len(absent) else []  # no absent token: nothing to read a copy against
    done = set(additive) | set(copying)
    rest = [i for i in range(n) if i not in done]
    log(f"ablation: {len(probed)} rules probed, {len(additive) - len(probed)} bigram rules, {len(copying)} copying rules "
        f"probed, {len(rest)} recomputed")
    import time

    t0 = time.perf_counter()
    a_all = scalars(rules, seqs, probed) if probed else np.zeros((N, 0), np.float32)
    log(f"ablation: probe pass done ({time.perf_counter() - t0:.0f} s)")
    col = {i: k for k, i in enumerate(probed)}
    hand = np.concatenate(hm.log_probs_batch(seqs)) if additive else None  # [N, V] float32, all rules on
    ref_lp = ref.logp
    S = np.empty(N)
    for s in range(0, N, 4096):
        S[s:s + 4096] = np.exp(np.asarray(ref_lp[s:s + 4096], np.float64)).sum(1)
    kl_without = {}
    for i in additive:
        r = rules.rules[i]
        if kinds[i] == "bigram":
            groups = []  # (positions, tokens, weights): positions sharing the same hit rows
            hit = np.stack([np.isin(tok, rules.sets.members(now)) for now, _ in r.rows]) if r.rows else np.zeros((0, N), bool)
            anyhit = hit.any(0) if len(hit) else np.zeros(N, bool)
            pos = np.flatnonzero(anyhit)
            if len(pos):
                pat, inv = np.unique(hit[:, pos].T, axis=0, return_inverse=True)
                inv = inv.ravel()
                for g, rowsel in enumerate(pat):
                    t, w = _support(rules, [x for (now, row), on in zip(r.rows, rowsel) if on for x in row])
                    at = pos[inv == g]
                    groups.append((at, np.ones(len(at)), t, w))
        else:
            a = a_all[:, col[i]].astype(np.float64)
            pos = np.flatnonzero(a != 0)
            t, w = _support(rules, r.next)
            groups = [(pos, a[pos], t, w)]
        d = 0.0
        for pos, a, t, w in groups:
            if not len(pos) or not len(t):
                continue
            # positions in chunks of ~CHUNK_ENTRIES gathered entries: a neuron writing large weighted sets has
            # thousands of support tokens at tens of thousands of positions, and arrays that size cost more in
            # fresh pages (system time) than in arithmetic
            step = max(1, CHUNK_ENTRIES // len(t))
            for c0 in range(0, len(pos), step):
                pc, ac = pos[c0:c0 + step], a[c0:c0 + step]
                p = np.exp(np.asarray(ref_lp[pc[:, None], t[None, :]], np.float64)) / S[pc, None]
                q = np.exp(hand[pc[:, None], t[None, :]].astype(np.float64))
                d += _delta_kl(p, q, lambda m, pc=pc: hand[pc[m]], ac, t, w)
        kl_without[i] = (total + d) / N if N else 0.0
    del a_all
    if copying:
        if hand is None:
            hand = np.concatenate(hm.log_probs_batch(seqs))
        log(f"ablation: additive rules done ({time.perf_counter() - t0:.0f} s)")
        groups = _disjoint_groups(rules, copying)
        for gi, group in enumerate(groups):
            log(f"ablation: copying rules, probe {gi + 1} of {len(groups)} ({len(group)} rules)")
            C = copy_logits(rules, seqs, group, int(absent[0]))  # an absent token: copying never writes it
            for i in group:
                r = rules.rules[i]
                pos = np.flatnonzero(np.isin(tok, rules.sets.members(r.now)))
                d = 0.0
                for c0 in range(0, len(pos), 2048):  # dense over the vocabulary: the copied tokens vary by position
                    pc = pos[c0:c0 + 2048]
                    dl = r.copy * C[pc].astype(np.float64)
                    p = np.exp(np.asarray(ref_lp[pc], np.float64)) / S[pc, None]
                    d += float((p * dl).sum() + _lse(hand[pc].astype(np.float64) - dl).sum())
                kl_without[i] = (total + d) / N if N else 0.0
            del C
    del hand
    if rest:
        log(f"ablation: re-running {len(rest)} rules (prior, heads, copy rules with `next`) "
            f"({time.perf_counter() - t0:.0f} s so far)")
        at = {rid: i for i, rid in enumerate(rules.rule_ids)}
        for row in L.run_ablation(hm, rules, ref, kl_full, kl_pos, only=rest):
            kl_without[at[row["rule"]]] = row["kl_without"]
    out = [L.ablation_row(rules, i, kl_without[i], kl_full) for i in range(n)]
    out.sort(key=lambda r: -r["delta"])
    return out
