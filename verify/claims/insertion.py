"""[[skip]] and [[head_out]] (copy included) claims: a causal test, the source inserted earlier vs a neutral token (docs/claims.md)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .head import preferred_distances
from .records import Claim, NoClaim, Outcome, Plan

if TYPE_CHECKING:
    from .runner import Checker


def plan_skip(ck: Checker, r, claim: Claim) -> Plan:
    return insertion_plan(ck, r, claim, None)


def plan_head_out(ck: Checker, r, claim: Claim) -> Plan:
    return insertion_plan(ck, r, claim, preferred_distances(ck.heads[r.head]))


def insertion_plan(ck: Checker, r, claim: Claim, distances: list[int] | None) -> Plan:
    """Causal test shared by [[skip]] and [[head_out]]: src inserted earlier vs a neutral token."""
    from hypothesis import strategies as st

    targets = ck._targets(r.next, claim)
    copy = r.copy if r.copy is not None and r.copy != 0 and abs(r.copy) >= claim.min_weight else None
    if not targets and copy is None:
        raise NoClaim("no target weight (above min_weight)")
    src = ck._members(r.src)
    now = ck._members(r.now)
    src_set = set(src)
    excl = np.concatenate([ck.sets.members(r.src)] + [ck._tokens_of(s) for s, _ in targets])
    neutrals = ck._neutrals(claim, excl)
    if claim.distance is not None:
        distances = [claim.distance]

    @st.composite
    def cases(draw):
        a = draw(st.sampled_from(src))
        b = draw(st.sampled_from(now))
        n = draw(st.sampled_from(neutrals))
        pre = [n if t in src_set else t for t in ck._prefix(draw, st)]
        if distances:
            d = draw(st.sampled_from(distances))
        else:
            d = draw(st.integers(1, len(pre) + 1))
        pre = [n] * max(0, d - 1 - len(pre)) + pre  # pad so the insertion fits
        j = len(pre) + 1 - d
        return pre[:j], a, n, pre[j:], b

    def seqs(case):
        left, a, n, right, b = case
        return left + [a] + right + [b], left + [n] + right + [b]

    def evaluate(case):
        with_a, with_n = seqs(case)
        lp = ck.last_logp(with_a, with_n)
        # copy = w claims the inserted source token itself: likelier (w > 0) with it in the context
        eff, desc = ck._target_effects(targets + ([(case[1], copy)] if copy is not None else []), lp[0], lp[1])
        return Outcome(eff >= claim.margin, eff, f"with {ck.o.vocab[case[1]]!r} vs {ck.o.vocab[case[2]]!r}: {desc}")

    def render(case):
        left, a, n, right, b = case
        return (ck._text(seqs(case)[0], {len(left): "«"})
                + f"   (neutral {ck.o.vocab[n]!r} in its place; distance {len(right) + 1})")

    return Plan(cases(), evaluate, render, ck._claim_text(claim, "sign·Δ log p (src vs neutral)"))

