"""A differentiable re-implementation of the rule semantics (handmodel/twin.py, docs/rules.md) in torch.

`fit` needs gradients of KL(p_ref ‖ p_hand) with respect to every number written in the rule files.
The hand model itself never uses this (it is numba, torch-free); tests check that this module and
the real engine give the same log-probs for the same rules.

Every number in the rule files is one *slot* (see slots.py): theta[slot]. This class gathers the slots
into the tables of each rule and builds the logits with torchsem.py, the rule semantics in torch (the same
as handmodel/twin.py; tests hold them equal). A weighted set's ([[weights]]) member weights are constants
here: fit moves the numbers of the rules referencing it.
"""
from __future__ import annotations

import numpy as np
import torch

from . import torchsem as sem


class TorchRules:
    """Built once for (compiled rules, slots, windows [B, T]); forward(theta) -> logits for windows[idx]."""

    def __init__(self, rules, slots, windows: np.ndarray):
        self.rules, self.slots = rules, slots
        self.sets = rules.sets
        self.V = rules.vocab_size
        self.windows = torch.as_tensor(windows, dtype=torch.int64)
        self.n_slots = len(slots.values)
        self.ZERO = self.n_slots  # index of a constant 0 appended to theta
        self._member = torch.as_tensor(self.sets.member_matrix)  # [classes, V] bool
        self._weight = torch.zeros(self._member.shape, dtype=torch.float64)  # [classes, V]: w_v, 0 off the set
        for k in range(len(self._weight)):
            self._weight[k, self.sets.members(self.V + k)] = torch.as_tensor(self.sets.weights_of(self.V + k))
        self._build()

    # -- token-set helpers -------------------------------------------------------------------------
    def members(self, sid: int) -> np.ndarray:
        return self.sets.members(sid)

    def in_set(self, sid: int, toks: torch.Tensor) -> torch.Tensor:
        if sid < self.V:
            return toks == sid
        return self._member[sid - self.V][toks]

    def weight_in(self, sid: int, toks: torch.Tensor, dtype) -> torch.Tensor:
        """Each token's weight in set sid: 1 or 0 for a plain set, w_v (0 off the set) for a weighted one."""
        if sid < self.V:
            return (toks == sid).to(dtype)
        return self._weight[sid - self.V][toks].to(dtype)

    def _targets(self, entries):
        """[(row, sid, slot)] -> index arrays (row, token, slot, set weight) expanding class sids to members."""
        r, t, s, w = [], [], [], []
        for row, sid, slot in entries:
            m = self.members(sid)
            r.append(np.full(len(m), row)); t.append(m); s.append(np.full(len(m), slot)); w.append(self.sets.weights_of(sid))
        cat = (lambda xs, dt: torch.as_tensor(np.concatenate(xs), dtype=dt) if xs else torch.zeros(0, dtype=dt))
        return cat(r, torch.int64), cat(t, torch.int64), cat(s, torch.int64), cat(w, torch.float64)

    # -- structure (no parameters) --------------------------------------------------------------------
    def _build(self):
        R, S, V = self.rules.rules, self.slots, self.V
        ALL = self.sets.ALL
        glob, tab = [], []  # (0, next sid, slot), (now token, next sid, slot)
        self.skip, self.head, self.ho, self.neu = [], [], [], []
        for ri, r in enumerate(R):
            sl = S.by_rule[ri]
            if r.kind == "prior":
                glob += [(0, sid, slot) for (sid, _), slot in zip(r.next, sl["next"])]
            elif r.kind == "bigram":
                for j, (now, row) in enumerate(r.rows):
                    for (sid, _), slot in zip(row, sl["rows"][j]):
                        if now == ALL:
                            glob.append((0, sid, slot))
                        else:
                            tab += [(int(m), sid, slot) for m in self.members(now)]
            elif r.kind == "skip":
                self.skip.append((ri, r, sl))
            elif r.kind == "head":
                self.head.append((ri, r, sl))
            elif r.kind == "head_out":
                self.ho.append((ri, r, sl))
            elif r.kind == "neuron":
                self.neu.append((ri, r, sl))
        self.glob_idx = self._targets(glob)
        # bigram table only for current tokens that occur in the windows: compact row index
        present = torch.unique(self.windows)
        self.row_of = torch.full((V,), -1, dtype=torch.int64)
        self.row_of[present] = torch.arange(len(present))
        self.n_rows = len(present)
        tab = [(int(self.row_of[m]), sid, slot) for m, sid, slot in tab if self.row_of[m] >= 0]
        self.tab_idx = self._targets(tab)
        self.skip_idx = self._targets([(k, sid, slot) for k, (_, r, sl) in enumerate(self.skip)
                                       for (sid, _), slot in zip(r.next, sl["next"])])
        self.ho_idx = self._targets([(k, sid, slot) for k, (_, r, sl) in enumerate(self.ho)
                                     for (sid, _), slot in zip(r.next, sl.get("next", []))])
        self.copy = [(r, sl["copy"]) for _, r, sl in self.ho if r.copy is not None]
        self.neu_idx = self._targets([(k, sid, slot) for k, (_, r, sl) in enumerate(self.neu)
                                      for (sid, _), slot in zip(r.next, sl["next"])])

    def _scatter(self, theta_ext, idx, n_rows) -> torch.Tensor:
        rows, toks, slots, w = idx
        out = torch.zeros(n_rows * self.V, dtype=theta_ext.dtype)
        return out.index_add(0, rows * self.V + toks, theta_ext[slots] * w.to(theta_ext.dtype)).view(n_rows, self.V)

    # -- forward --------------------------------------------------------------------------------------
    def logits(self, theta: torch.Tensor, idx=None) -> torch.Tensor:
        """[b, T, V] logits for windows[idx] (all windows if idx is None)."""
        th = torch.cat([theta, theta.new_zeros(1)])
        W = self.windows if idx is None else self.windows[idx]
        B, T = W.shape
        V = self.V
        out = self._scatter(th, self.glob_idx, 1)[0].expand(B, T, V)
        out = out + self._scatter(th, self.tab_idx, max(self.n_rows, 1))[self.row_of[W].clamp(min=0)]
        if self.skip:
            act = torch.stack([self.in_set(r.now, W) & sem.earlier_any(self.in_set(r.src, W)) for _, r, _ in self.skip], -1)
            out = out + act.to(th.dtype) @ self._scatter(th, self.skip_idx, len(self.skip))
        att = self._attention(th, W) if self.head else []
        if self.ho:
            mass = torch.stack([sem.attention_mass(att[r.head], self.in_set(r.src, W))
                                * self.in_set(r.now, W).to(th.dtype) for _, r, _ in self.ho], -1)
            out = out + mass @ self._scatter(th, self.ho_idx, len(self.ho))
        if self.copy:
            cp = out.new_zeros(B, T, T)  # [b, t, s]: copy weight x attention, added to the logit of token W[b, s]
            for r, slot in self.copy:
                cp = cp + att[r.head] * sem.pair_scores(self.in_set(r.now, W), self.in_set(r.src, W), th[slot])
            out = sem.copy_logits(out, W, cp)
        if self.neu:
            acts = []
            for _, r, sl in self.neu:
                pre = (-th[sl["threshold"]] if "threshold" in sl else th.new_zeros(())).expand(B, T)
                for (sid, _), slot in zip(r.n_now, sl.get("now", [])):
                    pre = pre + th[slot] * self.weight_in(sid, W, th.dtype)
                for (sid, _), slot in zip(r.n_present, sl.get("present", [])):
                    pre = pre + th[slot] * sem.earlier_any(self.in_set(sid, W)).to(th.dtype)
                for (h, sid, _), slot in zip(r.n_attend, sl.get("attend", [])):
                    pre = pre + th[slot] * sem.attention_mass(att[h], self.weight_in(sid, W, th.dtype))
                acts.append(sem.neuron_activation(pre))
            out = out + torch.stack(acts, -1) @ self._scatter(th, self.neu_idx, len(self.neu))
        return out

    def _attention(self, th, W) -> list[torch.Tensor]:
        B, T = W.shape
        res = []
        for _, r, sl in self.head:
            default = sl.get("default", self.ZERO)
            D = min(max(r.position) + 1 if r.position else 0, T)  # the table: distances 0..D-1, unwritten ones default
            table = th[torch.as_tensor([sl["position"].get(d, default) for d in range(D)], dtype=torch.int64)]
            score = sem.position_scores(table, th[default], T).expand(B, T, T)
            for (now, src, _), slot in zip(r.scores, sl.get("score", [])):
                score = score + sem.pair_scores(self.in_set(now, W), self.in_set(src, W), th[slot])
            res.append(sem.causal_attention(score))
        return res
