"""[[neuron]] claims: the reference neuron fires where the rule does and ablating it moves the targets, or
(feature = 1) the rule's behaviour beyond the rest of the hand model (docs/claims.md)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from handmodel import twin

from .head import preferred_distances
from .records import Claim, NoClaim, Outcome, Plan

if TYPE_CHECKING:
    from .runner import Checker


def plan_neuron(ck: Checker, r, claim: Claim) -> Plan:
    n = NeuronClaim(ck, r, claim)
    if claim.feature:
        return Plan(n.cases(), n.evaluate_feature, n.render,
                    ck._claim_text(claim, "sign·(Δ log p_ref − Δ log p_hand without the rule) (triggers vs neutral)"))
    return Plan(n.cases(), n.evaluate_reference, n.render,
                f"neuron {n.n_idx}: fires (> {claim.level:g}) iff the rule does; ablation Δ ≥ {claim.margin:+.2f}; "
                f"in ≥ {claim.fraction:.0%}", unit="nats")


class NeuronClaim:
    """A neuron rule's triggers (its positive inputs), its targets and its reference neuron. A case is a
    triggered context and the same context with the triggers swapped for neutral tokens: (on, off, marks)."""

    def __init__(self, ck: Checker, r, claim: Claim):
        self.ck, self.r, self.claim = ck, r, claim
        self.targets = ck._targets(r.next, claim)
        if claim.feature and not self.targets:
            raise NoClaim("no target weight (above min_weight): a feature claim is about its targets")
        self.n_idx = None if claim.feature else ck._ref_index(r, claim, "neuron")
        self.now_pos = [(s, w) for s, w in ck._signed(r.n_now) if w > 0]  # a weighted set: its raising members
        self.present_pos = [(s, w) for s, w in r.n_present if w > 0]
        self.attend_pos = [(h, p, x) for h, s, w in r.n_attend for p, x in ck._signed([(s, w)]) if x > 0]
        trig_sids = ([s for s, _ in self.now_pos] + [s for s, _ in self.present_pos]
                     + [s for _, s, _ in self.attend_pos])
        excl = np.concatenate([ck._tokens_of(s) for s in trig_sids]) if trig_sids else np.zeros(0, np.int32)
        self.neutrals = ck._neutrals(claim, excl)
        self.trig = set(int(t) for t in excl)
        self.read = sorted({hh for hh, _, _ in r.n_attend})  # the heads its `attend` inputs read

    def hand_act(self, seq) -> float:
        """The rule's own activation at the last position (handmodel.twin)."""
        ck, s = self.ck, np.asarray(seq)
        t = len(s) - 1
        att = {hh: twin.attention(ck.rules, ck.heads[hh], s, t) for hh in self.read}
        return twin.neuron_activation(twin.neuron_preactivation(ck.rules, self.r, s, t, att))

    def cases(self):
        from hypothesis import strategies as st

        ck, claim = self.ck, self.claim

        @st.composite
        def cases(draw):
            n = draw(st.sampled_from(self.neutrals))
            pre = [n if t in self.trig else t for t in ck._prefix(draw, st)]
            inserts: list[tuple[int, int]] = []  # (distance from the last token, token)
            # a feature claim is about the triggered context: every positive input is put in
            for sid, _ in self.present_pos:
                if claim.feature or draw(st.booleans()):
                    inserts.append((draw(st.integers(1, len(pre) + 1)), draw(st.sampled_from(ck._members(sid)))))
            for hh, sid, _ in self.attend_pos:
                if claim.feature or draw(st.booleans()):
                    d = (preferred_distances(ck.heads[hh]) or [1])[0]
                    inserts.append((d, draw(st.sampled_from(ck._members(sid)))))
            if self.now_pos:
                sid = draw(st.sampled_from([s for s, _ in self.now_pos]))
                b = draw(st.sampled_from(ck._members(sid)))
            else:
                b = draw(st.sampled_from(self.neutrals))
            need = max([d for d, _ in inserts], default=0)
            pre = [n] * max(0, need - len(pre)) + pre
            on = pre + [b]
            off = list(on)
            marks = []
            for d, tok in inserts:
                on[len(on) - 1 - d] = tok
                marks.append(len(on) - 1 - d)
            off[-1] = n if b in self.trig else b
            return tuple(on), tuple(off), tuple(marks)

        return cases()

    def evaluate_feature(self, case) -> Outcome:
        ck, on, off = self.ck, case[0], case[1]
        h_on, h_off = self.hand_act(list(on)), self.hand_act(list(off))
        if h_on <= h_off:
            return Outcome(False, 0.0, f"the rule does not fire more with its triggers ({h_on:.2f} vs {h_off:.2f})")
        lp = ck.last_logp(list(on), list(off))
        ho, hf = ck._hand_last_logp_without(self.r, on, off)
        worst, desc = math.inf, ""
        for sid, w in self.targets:
            d_ref = ck._mass(lp[0], sid) - ck._mass(lp[1], sid)
            d_hand = ck._mass(ho, sid) - ck._mass(hf, sid)
            eff = math.copysign(1.0, w) * (d_ref - d_hand)
            if eff < worst:
                worst, desc = eff, f"{ck._tname(sid)}: reference {d_ref:+.2f}, rest of the hand model {d_hand:+.2f}"
        return Outcome(worst >= self.claim.margin, float(worst), f"rule act {h_on:.2f} vs {h_off:.2f}; {desc}")

    def evaluate_reference(self, case) -> Outcome:
        import torch

        ck, claim, n_idx, on, off = self.ck, self.claim, self.n_idx, case[0], case[1]
        lp, c = ck._forward([list(on), list(off)], cache=True)
        post = c["mlp.post"][:, -1, n_idx].double().numpy()
        h_on, h_off = self.hand_act(list(on)), self.hand_act(list(off))
        ok, notes = True, []
        for i, ha in ((0, h_on), (1, h_off)):
            ok &= bool(post[i] > claim.level) if ha > 0 else bool(post[i] <= claim.level)
        # the reported number: the ablation effect where the rule fires, else the activation vs level
        eff = float(post[0] - claim.level) if h_on > 0 else float(claim.level - post[0])
        notes.append(f"act with trigger {post[0]:.2f} (rule {h_on:.2f}), without {post[1]:.2f} (rule {h_off:.2f})")
        if h_on > 0 and self.targets:
            model = ck.o.model
            with torch.inference_mode():
                x2 = c["resid_post"][0, -1] - c["mlp.post"][0, -1, n_idx] * model.W_out[n_idx]
                lpa = torch.log_softmax(model.unembed(x2).double(), -1).numpy()
            d_eff, desc = ck._target_effects(self.targets, lp[0], lpa)
            ok &= d_eff >= claim.margin
            eff = d_eff
            notes.append(f"ablation Δ {desc}")
        return Outcome(bool(ok), float(eff), "; ".join(notes))

    def render(self, case) -> str:
        on, off, marks = case
        return self.ck._text(on, {m: "«" for m in marks}) + "   (without trigger: " + self.ck._text(off) + ")"
