"""[[head]] claims: the reference head's attention on the rule's preferred source (docs/claims.md)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from handmodel import twin

from .records import Claim, NoClaim, Outcome, Plan

if TYPE_CHECKING:
    from .runner import Checker


def plan_head(ck: Checker, r, claim: Claim) -> Plan:
    from hypothesis import strategies as st

    parts: list[tuple] = []
    dists = preferred_distances(r)
    if dists:
        parts.append(("position", dists))
    for now, src, w in r.scores:
        if w > 0 and src != ck.sets.ALL:
            parts.append(("score", now, src))
    if not parts:
        raise NoClaim("no positional preference and no positive score entry on a specific source")
    h = ck._ref_index(r, claim, "head")
    neutral_cache: dict[int, list[int]] = {}

    def neutrals(src):
        if src not in neutral_cache:
            neutral_cache[src] = ck._neutrals(claim, ck.sets.members(src))
        return neutral_cache[src]

    @st.composite
    def cases(draw):
        k = draw(st.integers(0, len(parts) - 1))
        part = parts[k]
        pre = ck._prefix(draw, st)
        if part[0] == "position":
            d = draw(st.sampled_from(part[1]))
            b = draw(st.sampled_from(ck.freq))
            pad = ck.freq[0]
            pre = [pad] * max(0, d - len(pre)) + pre
            return k, pre + [b], len(pre) - d
        _, now, src = part
        n = draw(st.sampled_from(neutrals(src)))
        src_set = set(ck._members(src))
        pre = [n if t in src_set else t for t in pre]
        a = draw(st.sampled_from(ck._members(src)))
        b = draw(st.sampled_from(ck._members(now)))
        d = claim.distance or draw(st.integers(1, len(pre) + 1))
        pre = [n] * max(0, d - 1 - len(pre)) + pre
        j = len(pre) + 1 - d
        return k, pre[:j] + [a] + pre[j:] + [b], j

    def evaluate(case):
        k, seq, j = case
        _, c = ck._forward([seq], cache=True)
        ref = float(c["attn.pattern"][0, h, -1, j])
        hand = float(twin.attention(ck.rules, r, np.asarray(seq), len(seq) - 1)[j])
        need = claim.share if claim.share is not None else 0.5 * hand
        return Outcome(ref >= need, ref - need, f"{parts[k][0]}: reference head {h} puts {ref:.2f} on the source "
                                                f"(rule predicts {hand:.2f}; needs ≥ {need:.2f})")

    def render(case):
        k, seq, j = case
        return ck._text(seq, {j: "«"}) + f"   (source at distance {len(seq) - 1 - j})"

    what = f"{claim.share:.2f}" if claim.share is not None else "½·rule's share"
    return Plan(cases(), evaluate, render,
                f"ref head {h} attention on source − {what} ≥ 0 in ≥ {claim.fraction:.0%}", unit="share")


def preferred_distances(head_rule) -> list[int] | None:
    """Distances (≥ 1) the head's position table scores highest, if above its default; else None."""
    pos = {d: w for d, w in head_rule.position.items() if d >= 1}
    if not pos or max(pos.values()) <= head_rule.pos_default:
        return None
    best = max(pos.values())
    return sorted(d for d, w in pos.items() if w == best)

