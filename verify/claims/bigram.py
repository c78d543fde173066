"""[[prior]] and [[bigram]] claims: the targets' log-probability against the median token / the unigram (docs/claims.md)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from handmodel import twin

from .records import Claim, NoClaim, Outcome, Plan

if TYPE_CHECKING:
    from .runner import Checker


def plan_prior(ck: Checker, r, claim: Claim) -> Plan:
    from hypothesis import strategies as st

    wvec = np.zeros(ck.V)
    twin.add_targets(ck.rules, wvec, r.next, 1.0)  # the prior's logit vector
    w_med = float(np.median(wvec))
    targets = ck._targets(r.next, claim, shift=w_med)
    if not targets:
        raise NoClaim("no listed weight differs from the median weight (by min_weight)")
    sizes = {s: len(ck._tokens_of(s)) for s, _ in targets}

    @st.composite
    def cases(draw):
        return ck._prefix(draw, st) + [draw(st.sampled_from(ck.freq))]

    def evaluate(ctx):
        lp = ck.last_logp(ctx)[0]
        med = float(np.median(lp))
        eff, desc = ck._target_effects(targets, lp, lambda s: med + math.log(sizes[s]))
        return Outcome(eff >= claim.margin, eff, f"vs the median token: {desc}")

    return Plan(cases(), evaluate, lambda ctx: ck._text(ctx),
                ck._claim_text(claim, "sign·(log p − median log p)"))


def plan_bigram(ck: Checker, r, claim: Claim) -> Plan:
    from hypothesis import strategies as st

    rows = [(now, ck._targets(row, claim)) for now, row in r.rows]
    rows = [(now, t) for now, t in rows if t]
    if not rows:
        raise NoClaim("no target weight (above min_weight) in any row")
    members = [ck._members(now) for now, _ in rows]

    @st.composite
    def cases(draw):
        k = draw(st.integers(0, len(rows) - 1))
        b = draw(st.sampled_from(members[k]))
        return k, ck._prefix(draw, st) + [b]

    def evaluate(case):
        k, ctx = case
        eff, desc = ck._target_effects(rows[k][1], ck.last_logp(ctx)[0], lambda s: ck._mass(ck.uni, s))
        return Outcome(eff >= claim.margin, eff, f"vs unigram: {desc}")

    return Plan(cases(), evaluate, lambda case: ck._text(case[1]),
                ck._claim_text(claim, "sign·(log p − log unigram)"))

