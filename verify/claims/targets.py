"""Claim targets: a rule's weighted entries as the tokens (or pools of tokens) whose log-probability it
claims to move, and how a context's effect on them is measured. A weighted set ([[weights]]) entry x
pushes each member v its own way, sign(x·w_v): its raised members are one pooled target, its lowered
ones another."""
from __future__ import annotations

import math

import numpy as np

from .records import Claim


class Pool(tuple):
    """A pooled claim target (check.together): the summed probability of these token ids."""

    def __new__(cls, toks, name: str):
        self = super().__new__(cls, toks)
        self.name = name
        return self


class Targets:
    """The target helpers of a Checker (needs self.sets and self.V)."""

    def _tokens_of(self, sid) -> np.ndarray:
        return np.asarray(sid, dtype=np.int64) if isinstance(sid, Pool) else self.sets.members(sid)

    def _mass(self, lp: np.ndarray, sid) -> float:
        if not isinstance(sid, Pool) and sid < self.V:
            return float(lp[sid])
        m = lp[self._tokens_of(sid)]
        mx = m.max()
        return float(mx + np.log(np.exp(m - mx).sum()))

    def _signed(self, items, shift: float = 0.0, min_weight: float = 0.0) -> list:
        """(sid, w − shift) per entry, but a weighted set's members each move by x·w_v − shift: its entry
        becomes one Pool per sign (members with |x·w_v − shift| ≥ min_weight; weight: their mean)."""
        out = []
        for s, w in items:
            if not self.sets.is_weighted(s):
                out.append((s, w - shift))
                continue
            vals = w * self.sets.weights_of(s) - shift
            mem = self.sets.members(s)
            for sign, label in ((1.0, "raised"), (-1.0, "lowered")):
                on = (vals * sign > 0) & (np.abs(vals) >= min_weight)
                if on.any():
                    out.append((Pool([int(t) for t in mem[on]], f"{self.sets.name(s)} ({on.sum()} {label})"), float(vals[on].mean())))
        return out

    def _targets(self, items, claim: Claim, shift: float = 0.0) -> list[tuple[int, float]]:
        out = [(s, w) for s, w in self._signed(items, shift, claim.min_weight)
               if w != 0 and abs(w) >= claim.min_weight and s != self.sets.ALL]
        if not claim.together:
            return out
        pools = []
        for sign, label in ((1.0, "raised"), (-1.0, "lowered")):
            toks = sorted({int(t) for s, w in out if w * sign > 0 for t in self._tokens_of(s)})
            if toks:
                pools.append((Pool(toks, f"{len(toks)} {label} token" + ("s" if len(toks) > 1 else "")), sign))
        return pools

    def _tname(self, sid) -> str:
        return sid.name if isinstance(sid, Pool) else self.sets.name(sid)

    @staticmethod
    def _claim_text(claim: Claim, what: str) -> str:
        return f"{what} ≥ {claim.margin:+.2f} in ≥ {claim.fraction:.0%}"

    def _target_effects(self, targets, a: np.ndarray, b_or_base) -> tuple[float, str]:
        """min over targets of sign(w)·(L_a − L_b); b_or_base is a logp vector or a per-sid baseline fn."""
        worst, desc = math.inf, ""
        for sid, w in targets:
            base = b_or_base(sid) if callable(b_or_base) else self._mass(b_or_base, sid)
            eff = math.copysign(1.0, w) * (self._mass(a, sid) - base)
            if eff < worst:
                worst, desc = eff, f"{self._tname(sid)} {self._mass(a, sid) - base:+.2f}"
        return worst, desc
