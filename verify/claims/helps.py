"""`helps = 1` (any kind): the rule corrects the hand model toward the reference where it acts (docs/claims.md)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .records import Claim, NoClaim, Outcome, Plan, kl_last

if TYPE_CHECKING:
    from .runner import Checker


def plan_helps(ck: Checker, r, claim: Claim) -> Plan:
    """`helps = 1`: contexts are corpus slices ending where the rule's trigger occurs in the pool (no token
    is inserted: a fitted correction claims nothing about contexts unlike the text it was fitted to),
    judged by KL to the reference at the last position with and without the rule."""
    from hypothesis import strategies as st

    where = trigger_positions(ck, r)
    if not len(where):
        raise NoClaim(f"the rule's trigger does not occur in the context pool ({ck.pool_note})")
    L = ck.max_prefix

    def context(t):
        return [int(x) for x in ck.pool[max(0, t - L): t + 1]]

    def evaluate(t):
        seq = context(t)
        lp_ref = ck.last_logp(seq)[0]
        on, off = ck._hand_last_logp(r, [seq, seq], without=[False, True])
        if np.max(np.abs(on - off)) < 1e-6:
            return Outcome(False, 0.0, "the rule does not act in this context", skip=True)
        kl_on, kl_off = kl_last(lp_ref, on), kl_last(lp_ref, off)
        eff = kl_off - kl_on
        return Outcome(eff >= claim.margin, eff, f"KL(ref ‖ hand) {kl_on:.3f} with the rule, {kl_off:.3f} without")

    return Plan(st.sampled_from([int(t) for t in where]), evaluate, lambda t: ck._text(context(t)),
                ck._claim_text(claim, "KL(ref ‖ hand without the rule) − KL(ref ‖ hand)"))


def trigger_positions(ck: Checker, r) -> np.ndarray:
    """Positions t of the pool where the rule can act on the next-token prediction: its current-token
    set (any row / score entry / positive `now` input) at t and, for [[skip]] / [[head_out]], its source
    among the max_prefix tokens before t."""
    P, L = ck.pool, ck.max_prefix

    def at(sid) -> np.ndarray:
        return np.isin(P, ck._tokens_of(sid))

    def before(sid) -> np.ndarray:  # a member of sid in P[t-L .. t-1]
        c = np.concatenate([[0], np.cumsum(at(sid))])
        t = np.arange(len(P))
        return c[t] - c[np.maximum(t - L, 0)] > 0

    any_pos = np.ones(len(P), dtype=bool)
    if r.kind == "bigram":
        hit = np.zeros(len(P), dtype=bool)
        for now, _ in r.rows:
            hit |= at(now)
    elif r.kind in ("skip", "head_out"):
        hit = at(r.now) & before(r.src)
    elif r.kind == "head":
        hit = any_pos if r.position else np.zeros(len(P), dtype=bool)
        for now, src, _ in r.scores:
            hit = hit | (at(now) & before(src))
    elif r.kind == "neuron":
        pos_now = [s for s, w in ck._signed(r.n_now) if w > 0]
        hit = np.zeros(len(P), dtype=bool) if pos_now else any_pos
        for s in pos_now:
            hit = hit | at(s)
    else:
        hit = any_pos
    return np.flatnonzero(hit)

