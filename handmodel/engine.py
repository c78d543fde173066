"""HandModel: next-token log-probs and streaming metrics from CompiledRules (orchestrates kernels.py)."""
from __future__ import annotations

import numpy as np

from . import kernels, twin
from .compiled import CompiledRules
from .errors import UserError


def _float16_tables() -> tuple[np.ndarray, np.ndarray]:
    """exp(x) and x*exp(x) for every float16 bit pattern; -inf -> probability 0; NaN/+inf stay NaN."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(x)
        pl = p * x
    neg_inf = np.isneginf(x)
    p[neg_inf] = 0.0
    pl[neg_inf] = 0.0
    bad = np.isnan(x) | np.isposinf(x)
    p[bad] = np.nan
    pl[bad] = np.nan
    return p, pl


_LUT: tuple[np.ndarray, np.ndarray] | None = None


class HandModel:
    def __init__(self, rules: CompiledRules):
        self.rules = rules
        a = rules.arrays
        V = rules.vocab_size
        H = rules.n_heads
        used = np.zeros(H, dtype=np.bool_)
        used[a.ho_head] = True
        for h in range(H):  # heads nobody reads need no attention computed
            used[h] |= a.na_ptr[(h + 1) * V] > a.na_ptr[h * V]
        self._base_rules = np.array([k in ("prior", "bigram") for k in rules.rule_kinds], dtype=np.bool_)
        self._base_cache = None
        self._ref_cache = None
        self._P = (np.int64(V), a.class_member, a.head_rule, used, a.pos_ptr, a.pos_val, a.pos_default,
                   a.src_score, a.hg_ptr, a.hg_grp,
                   a.ho_rule, a.ho_now, a.ho_ptr, a.ho_tok, a.ho_w, a.hos_ptr, a.hos_id,
                   a.sk_rule, a.sk_ptr, a.sk_tok, a.sk_w, a.skn_ptr, a.skn_id, a.ske_ptr, a.ske_id,
                   a.nr_rule, a.nr_thr, a.nr_always, a.nr_ptr, a.nr_tok, a.nr_w, a.nn_ptr, a.nn_neu, a.nn_w,
                   a.npe_neu, a.npe_w, a.np_ptr, a.np_ent, a.na_ptr, a.na_neu, a.na_w)

    # -- internals ---------------------------------------------------------------------------
    def _tokens(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        lens = [len(s) for s in seqs]
        ptr = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lens, out=ptr[1:])
        tok = np.concatenate([np.asarray(s).ravel() for s in seqs]).astype(np.int64) if seqs else np.zeros(0, np.int64)
        if len(tok) and (tok.min() < 0 or tok.max() >= self.rules.vocab_size):
            bad = int(tok[(tok < 0) | (tok >= self.rules.vocab_size)][0])
            raise UserError(f"token id {bad} is outside this vocabulary (0..{self.rules.vocab_size - 1}); "
                            "tokenize with the tokenizer the rules were compiled against")
        return tok, ptr

    def _run(self, seqs, mask, ref=None, want_logp=False):
        rules = self.rules
        V = rules.vocab_size
        m = rules.mask_of(mask)
        tok, ptr = self._tokens(seqs)
        N = len(tok)
        uniq = np.unique(tok)
        row_of = np.full(V, -1, dtype=np.int64)
        row_of[uniq] = np.arange(len(uniq))
        base, lse, top = self._base(uniq, m)
        global _LUT
        if _LUT is None:
            _LUT = _float16_tables()
        ref16 = np.zeros((0, V), np.uint16)
        ref32 = np.zeros((0, V), np.float32)
        use16 = False
        if ref is not None:
            ref = np.asarray(ref)
            if ref.ndim != 2 or ref.shape != (N, V):
                raise UserError(f"ref_logp has shape {ref.shape}, expected ({N}, {V}): one row of reference "
                                "log-probs per position of the concatenated sequences")
            if ref.dtype == np.float16:
                ref16 = np.ascontiguousarray(ref).view(np.uint16)
                use16 = True
            else:
                ref32 = np.ascontiguousarray(ref, dtype=np.float32)
        out_logp = np.empty((N, V) if want_logp else (0, V), dtype=np.float32)
        kl = np.zeros(N)
        ce = np.empty(N)
        agree = np.zeros(N, dtype=np.bool_)
        hand_lse = np.empty(N)
        argmax = np.empty(N, dtype=np.int64)
        S, A, arg = self._ref_stats(ref, ref16, ref32, use16) if ref is not None else (np.ones(0), np.ones(0), np.zeros(0, np.int64))
        kernels.run_seqs(tok, ptr, row_of, base, lse, top, m, self._P, ref16, ref32, use16, _LUT[0], S, A, arg,
                         want_logp, out_logp, kl, ce, agree, hand_lse, argmax)
        return ptr, out_logp, {"kl": kl, "ce": ce, "agree": agree, "hand_lse": hand_lse, "hand_argmax": argmax}

    def _base(self, uniq: np.ndarray, mask: np.ndarray):
        """Base rows depend only on the current tokens and the prior/bigram part of the mask: ablating a
        head or neuron (the usual loop) reuses them."""
        key = (uniq.tobytes(), mask[self._base_rules].tobytes())
        if self._base_cache is None or self._base_cache[0] != key:
            a = self.rules.arrays
            out = kernels.build_base(uniq, self.rules.vocab_size, mask, a.blk_rule, a.blk_ptr, a.blk_tok, a.blk_w,
                                     a.glob_blk, a.nb_ptr, a.nb_blk)
            self._base_cache = (key, out)
        return self._base_cache[1]

    def _ref_stats(self, ref, ref16, ref32, use16):
        """sum p, sum p log p and argmax of each reference row: rule-independent, so cached for the same
        array (identified by buffer address, shape, dtype and a sample of its bytes)."""
        sample = ref[:: max(1, len(ref) // 16)].tobytes() if len(ref) else b""
        key = (ref.__array_interface__["data"][0], ref.shape, ref.dtype.str, ref.strides, hash(sample))
        if self._ref_cache is None or self._ref_cache[0] != key:
            self._ref_cache = (key, kernels.ref_stats(ref16, ref32, use16, _LUT[0], _LUT[1]))
        return self._ref_cache[1]

    # -- API ---------------------------------------------------------------------------------
    def log_probs(self, seq: np.ndarray, mask=None) -> np.ndarray:
        """[T, V] float32 next-token log-probs at every position of `seq`."""
        return self.log_probs_batch([seq], mask)[0]

    def log_probs_batch(self, seqs: list[np.ndarray], mask=None) -> list[np.ndarray]:
        ptr, out, _ = self._run(list(seqs), mask, want_logp=True)
        return [out[ptr[k]:ptr[k + 1]] for k in range(len(ptr) - 1)]

    def stream_metrics(self, seqs: list[np.ndarray], ref_logp: np.ndarray, mask=None) -> dict[str, np.ndarray]:
        """Per-position metrics over the concatenated sequences; see docs/rules.md, "Metrics".

        kl: KL(p_ref || p_hand) >= 0 (p_ref renormalised); ce: -log p_hand(next token), NaN at each
        sequence's last position; agree: argmax p_hand == argmax p_ref; hand_lse: log Z of the hand
        logits; hand_argmax: the hand model's top token. Hand log-probs are never materialised.
        """
        _, _, out = self._run(list(seqs), mask, ref=ref_logp)
        bad = ~np.isfinite(out["kl"])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"ref_logp row {i} has NaN, +inf or all -inf values; pass finite log-probs (log_softmax output)")
        return out

    def explain(self, seq: np.ndarray, pos: int, mask=None) -> list[tuple[str, str]]:
        """(rule id, what it did) for every rule that fired at position `pos` (computed by the twin)."""
        seq = np.asarray(seq)
        if not 0 <= pos < len(seq):
            raise UserError(f"position {pos} is outside the sequence (length {len(seq)})")
        return [(self.rules.rule_ids[i], desc) for i, _, desc in twin.contributions(self.rules, seq, pos, mask)]
