"""numba kernels. Plain loops over the CSR arrays built in compiled.py; semantics in docs/rules.md.

Cost model (docs/method.md, "Where the hand model's time goes"): a row of libm exps is ~18 us per position
(4,096 tokens, one thread), a row dot ~1 us. So each distinct current token gets a dense *base row* (prior +
bigram rows) with its log-sum-exp and top-K computed once; per position only the sparse changes from heads, neurons and
skip-trigrams are applied, and log Z is updated with O(changed) exps. KL needs p_ref: float16 input
is read through a 65536-entry table (exp of every float16), so no exp per vocabulary entry at all.
Class outputs of neurons change whole atoms (one exp per atom, not per member token); the ledger's
rows are computed in one pass (outputs keyed by row, each row finished from the rows up to it).
A position whose outputs touch much of the vocabulary (large weighted sets written by many neurons) is
the exception: there the per-token bookkeeping costs more than the exps, so weighted-set outputs, and all
outputs once the previous position was that large, are summed into a dense row without flags and log Z
and the argmax come from passes over the vocabulary (_dense_finish, with a vectorised exp: ~4 us a row).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

TOP_K = 64
NEVER = 1 << 62  # "token not seen yet" for first-occurrence positions

# run_seqs' helpers and phase functions. Each is compiled once, on its own, and LLVM inlines it into run_seqs
# (forceinline: `alwaysinline`), so none is cached apart from run_seqs' entry and none stays a call. numba's IR
# inliner (inline="always") typed and lowered every call site again: half of a 55 s cold compile. _nrt=False:
# no reference counting of their array arguments (an inlined call with it kept an atomic incref/decref pair per
# array in the inner loops: passes 3.8x slower); so they may not allocate, which numba refuses to compile.
_inlined = njit(forceinline=True, error_model="numpy", _nrt=False, no_cpython_wrapper=True, no_cfunc_wrapper=True)
# In the hottest loops an index that is never negative is cast to np.uint64 (`_u`), the loop variable too: numba
# wraps a negative signed index around (x[-1]), a compare and a select at every access that LLVM cannot drop when
# the index comes from an array; an unsigned one has nothing to wrap. The weighted-set writes ran 2x faster so
# (benchmarks/README.md, "Unsigned indices"). Beware numba's typing: uint64 + int64 is float64, so cast the sum.
_u = np.uint64


def atom_top_k(n_atoms: int) -> int:
    """Entries per (base row, atom) top list: TOP_K in all when there are few atoms, at least 8 each."""
    return max(8, -(-TOP_K // max(n_atoms, 1)))


@njit(cache=True, nogil=True, error_model="numpy")
def build_base(lo, hi, uniq, V, mask, blk_rule, blk_ptr, blk_tok, blk_w, glob_blk, nb_ptr, nb_blk, atom_of, n_atoms, KA,
               base, prob, lse, pat, top):
    """Dense base rows for the current tokens uniq[lo:hi], into rows lo:hi of the outputs: logits (base), probabilities,
    log-sum-exp, and per atom (atoms: compiled._atoms) its probability mass and its top-KA member ids (value desc,
    index asc; -1 pads). pat must come zeroed and top filled with -1. Rows are independent: the engine runs
    chunks of them on its threads (engine._on_rows)."""
    glob = np.zeros(V)
    for b in glob_blk:
        if mask[blk_rule[b]]:
            for j in range(blk_ptr[b], blk_ptr[b + 1]):
                glob[blk_tok[j]] += blk_w[j]
    for u in range(lo, hi):
        row = glob.copy()
        c = uniq[u]
        for j in range(nb_ptr[c], nb_ptr[c + 1]):
            b = nb_blk[j]
            if mask[blk_rule[b]]:
                for e in range(blk_ptr[b], blk_ptr[b + 1]):
                    row[blk_tok[e]] += blk_w[e]
        m = -np.inf
        for v in range(V):
            x = np.float32(row[v])
            base[u, v] = x
            if x > m:
                m = x
        s = 0.0
        for v in range(V):
            e = math.exp(base[u, v] - m)
            prob[u, v] = e
            s += e
        lse[u] = m + math.log(s)
        inv = 1.0 / s
        for v in range(V):
            prob[u, v] *= inv
            pat[u, atom_of[v]] += prob[u, v]
        # per-atom top-KA by (value desc, index asc): insertion, entering only when strictly larger
        n_in = np.zeros(n_atoms, dtype=np.int64)
        for v in range(V):
            a = atom_of[v]
            x = base[u, v]
            tl = top[u, a]
            if n_in[a] < KA or x > base[u, tl[KA - 1]]:
                k = n_in[a] if n_in[a] < KA else KA - 1
                while k > 0 and x > base[u, tl[k - 1]]:
                    tl[k] = tl[k - 1]
                    k -= 1
                tl[k] = v
                if n_in[a] < KA:
                    n_in[a] += 1


@njit(cache=True, nogil=True, error_model="numpy")
def ref_stats(lo, hi, ref16, ref32, use16, lut_p, lut_pl, rows, S, A, arg):
    """Reference rows lo:hi (row rows[i] of ref16/ref32; rows empty: row i): S = sum p, A = sum p log p, argmax p
    (first on ties). Independent of the rules."""
    for i in range(lo, hi):
        q = rows[i] if len(rows) > 0 else i
        s = 0.0
        a = 0.0
        bp = -1.0
        best = 0
        if use16:
            row = ref16[q]
            for v in range(row.shape[0]):
                u = row[v]
                p = lut_p[u]
                s += p
                a += lut_pl[u]
                if p > bp:
                    bp = p
                    best = v
        else:
            frow = ref32[q]
            for v in range(frow.shape[0]):
                y = np.float64(frow[v])
                p = math.exp(y)
                s += p
                if p > 0.0:
                    a += p * y
                if p > bp:
                    bp = p
                    best = v
        S[i] = s
        A[i] = a
        arg[i] = best


@njit(cache=True, nogil=True, error_model="numpy")
def ref_atom_mass(lo, hi, ref16, ref32, use16, lut_p, atom_of, rows, R):
    """Reference rows lo:hi (rows: as ref_stats), per atom: sum of p_ref over the atom's tokens (KL's p .
    class-output term), into R (zeroed by the caller)."""
    for i in range(lo, hi):
        q = rows[i] if len(rows) > 0 else i
        if use16:
            row = ref16[q]
            for v in range(row.shape[0]):
                R[i, atom_of[v]] += lut_p[row[v]]
        else:
            frow = ref32[q]
            for v in range(frow.shape[0]):
                R[i, atom_of[v]] += math.exp(np.float64(frow[v]))


@_inlined
def _member(sid, c, V, class_member):
    if sid < V:
        return sid == c
    return class_member[sid - V, c]


@_inlined
def _write(k, scale, off, ptr, tok, w, delta, dflag, touched, cnt):
    for j in range(_u(ptr[k]), _u(ptr[k + 1])):
        _add(off + tok[j], scale * w[j], delta, dflag, touched, cnt)


@_inlined
def _note(n, flag, lst, cnt):
    if not flag[_u(n)]:
        flag[_u(n)] = True
        lst[_u(cnt[0])] = n
        cnt[0] += 1


@_inlined
def _p_ref(i, v, use16, lut_p, ref16, ref32):
    """The reference's probability of token v at position i (float16 rows through the exp table)."""
    return lut_p[ref16[_u(i), _u(v)]] if use16 else math.exp(np.float64(ref32[_u(i), _u(v)]))


@_inlined
def _add_p_dot(B, i, x, V, use16, lut_p, ref16, ref32):
    """B plus p_ref(v) x[v] over reference row i, for each v with x[v] != 0 in token order: a dense row of outputs'
    share of the KL's p . logits."""
    for v in range(V):
        if x[v] != 0.0:
            B += _p_ref(i, v, use16, lut_p, ref16, ref32) * x[v]
    return B


@_inlined
def _row_entry(v, x, i, r, fresh, want_logp, use16, lut_p, ref16, ref32, cum, cflg, ctl, tcnt, base, base_p, aexp,
               cums, cuma, atom_of, B, zrel, hi):
    """A fused ledger row changes token v's logit by x: sum it into cum (noting v as touched), add p_ref(v) x to
    the KL's p . logits (B) and, unless the row recomputes zrel from scratch (fresh), v's new minus old
    probability mass (relative to the base row's) to zrel; hi keeps the largest changed logit (overflow guard).
    v's logit is base + cum + cums + cuma[atom] (cums: an earlier row's dense outputs, or zeros)."""
    _note(v, cflg, ctl, tcnt)
    u = _u(v)
    old = cum[u] + cums[u]
    cum[u] += x
    if not want_logp:
        B += _p_ref(i, v, use16, lut_p, ref16, ref32) * x
    if not fresh:
        ak = _u(atom_of[u])
        zrel += base_p[r, u] * aexp[ak] * (math.exp(cum[u] + cums[u]) - (1.0 if old == 0.0 else math.exp(old)))
        y = base[r, u] + cum[u] + cums[u] + cuma[ak]
        if y > hi:
            hi = y
    return B, zrel, hi


@intrinsic
def _two_to(typingctx, k):
    """2.0 ** k for an integer k in -1022 .. 1023, assembled from its exponent bits: straight-line code, so a
    loop of it vectorises (a table read or math.ldexp does not)."""
    if not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        k64 = context.cast(builder, args[0], sig.args[0], types.int64)
        bits = builder.shl(builder.add(k64, ir.Constant(ir.IntType(64), 1023)), ir.Constant(ir.IntType(64), 52))
        return builder.bitcast(bits, ir.DoubleType())
    return types.float64(k), codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 in two parts (Cody and Waite): n x _LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.42860682030941723212e-06
_EXP_LOW = -700.0  # exp(-700) ~ 1e-304: under half an ulp of any sum that holds exp(0) = 1
_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11, _E12, _E13 = (1.0 / math.factorial(k)
                                                                      for k in range(14))  # 1 / k!


# contract: each Horner step is one fused multiply-add (half the instructions; rounding at least as good)
@njit(forceinline=True, error_model="numpy", _nrt=False, no_cpython_wrapper=True, no_cfunc_wrapper=True,
      fastmath={"contract"})
def _exp_le0(x):
    """exp(x) for x <= 0 within one ulp of libm's, as straight-line arithmetic that a loop vectorises (libm's exp
    is a call per element: most of what a dense finish cost). x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor series
    to degree 13 (remainder < 5e-18), times 2^n. Below _EXP_LOW it gives exp(_EXP_LOW); NaN stays NaN."""
    x = x if not (x < _EXP_LOW) else _EXP_LOW
    n = np.floor(x * _LOG2E + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = ((((((((((((_E13 * r + _E12) * r + _E11) * r + _E10) * r + _E9) * r + _E8) * r + _E7) * r + _E6) * r + _E5)
                * r + _E4) * r + _E3) * r + _E2) * r + _E1) * r + _E0
    return p * _two_to(np.int64(n if n == n else 0.0))


@_inlined
def _argmax4(yb, V):
    """The largest of yb[:V] and its first index (-inf and -1 when none is larger than -inf, NaN never wins), in
    four interleaved lanes (a sequential max waits on every previous compare); ties go to the lower index."""
    m0 = m1 = m2 = m3 = -np.inf  # lane j: the first largest of yb[v], v = j mod 4
    b0 = b1 = b2 = b3 = -1
    V4 = V - V % 4
    for v in range(0, V4, 4):
        if yb[v] > m0:
            m0 = yb[v]
            b0 = v
        if yb[v + 1] > m1:
            m1 = yb[v + 1]
            b1 = v + 1
        if yb[v + 2] > m2:
            m2 = yb[v + 2]
            b2 = v + 2
        if yb[v + 3] > m3:
            m3 = yb[v + 3]
            b3 = v + 3
    for v in range(V4, V):
        if yb[v] > m0:
            m0 = yb[v]
            b0 = v
    m = m0
    best = b0
    if m1 > m or (m1 == m and b1 >= 0 and (best < 0 or b1 < best)):
        m = m1
        best = b1
    if m2 > m or (m2 == m and b2 >= 0 and (best < 0 or b2 < best)):
        m = m2
        best = b2
    if m3 > m or (m3 == m and b3 >= 0 and (best < 0 or b3 < best)):
        m = m3
        best = b3
    return m, best


@_inlined
def _argmax_after(yb, ymax, ybest, chg, nch, brow, cum, cums, cuma, atom_of, V):
    """The argmax (ties: lower id) of logits that differ from yb's (largest ymax, first at ybest) only at the tokens
    chg[:nch] (repeats allowed), whose logits are computed afresh into yb. The largest unchanged logit is ymax, and
    ybest comes first among the tokens holding it, so ybest (when its logit did not fall) and the changed tokens are
    the only candidates; otherwise yb is scanned. Returns (argmax, its logit)."""
    for j in range(nch):
        v = _u(chg[j])
        yb[v] = brow[v] + cum[v] + cums[v] + cuma[_u(atom_of[v])]
    if ybest < 0 or not (yb[_u(ybest)] >= ymax):
        m, best = _argmax4(yb, V)
        return best, m
    best = ybest
    bv = yb[_u(ybest)]
    for j in range(nch):
        v = chg[j]
        y = yb[_u(v)]
        if y > bv or (y == bv and v < best):
            best = v
            bv = y
    return best, bv


@_inlined
def _dense_finish(brow, cum, cums, cuma, atom_of, V, yb, eb):
    """log Z and argmax (ties: lower id) of the logits brow + cum + cums + cuma[atom] by passes over the
    vocabulary: cheaper than the per-touched-token bookkeeping once most of it is touched, and exact (no
    cancellation), so it is also the fallback when the incremental log Z is at risk. Leaves the logits in yb
    (eb: scratch). Each pass is a loop LLVM vectorises or one with independent chains (_argmax4's four running
    maxima, eight partial sums, in a fixed order): a sequential max and sum wait on every previous element."""
    for v in range(V):
        yb[v] = brow[v] + cum[v] + cums[v] + cuma[_u(atom_of[v])]
    m, best = _argmax4(yb, V)
    for v in range(V):
        eb[v] = _exp_le0(yb[v] - m)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    V8 = V - V % 8
    for v in range(0, V8, 8):
        s0 += eb[v]
        s1 += eb[v + 1]
        s2 += eb[v + 2]
        s3 += eb[v + 3]
        s4 += eb[v + 4]
        s5 += eb[v + 5]
        s6 += eb[v + 6]
        s7 += eb[v + 7]
    for v in range(V8, V):
        s0 += eb[v]
    z = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    return m + math.log(z), best


@njit(cache=True, nogil=True, error_model="numpy")
def base_dot(lo, hi, tok, row_of, base, ref16, ref32, use16, lut_p, rows, out):
    """sum_v p_ref[i, v] * base[row of tok[i], v] for positions lo:hi (reference row rows[i]; rows empty: i): the
    rule-independent part of the KL dot product (depends only on the reference rows, the tokens and the
    prior/bigram rules), cached by the engine."""
    for i in range(lo, hi):
        brow = base[row_of[tok[i]]]
        q = rows[i] if len(rows) > 0 else i
        B = 0.0
        if use16:
            rrow = ref16[q]
            for v in range(brow.shape[0]):
                B += lut_p[rrow[v]] * brow[v]
        else:
            frow = ref32[q]
            for v in range(brow.shape[0]):
                B += math.exp(np.float64(frow[v])) * brow[v]
        out[i] = B


@njit(cache=True)
def build_uncond(H, V, row, ho_rule, ho_ptr, ho_tok, ho_w, hos_ptr, hos_id, ho_uncond, cp_rule, cp_w, cps_ptr, cps_id):
    """Per (head, source token): the merged output of every switched-on head_out with now = @all reading
    that source (their contributions scale with the same attention weight, so they add into one sparse
    vector), `copy` outputs of now = @all head_outs included (target: the source token itself).
    Outputs are keyed row x V + token (row: the rule's ledger row, kernels.run_seqs; one row: the token).
    Returns CSR (ptr[H*V+1], key, w) and per head the number of distinct keys."""
    RV = V * (max(row.max(), 0) + 1) if len(row) else V
    total = 0
    for key in range(H * V):
        for j in range(hos_ptr[key], hos_ptr[key + 1]):
            k = hos_id[j]
            if ho_uncond[k] and row[ho_rule[k]] >= 0:
                total += ho_ptr[k + 1] - ho_ptr[k]
        total += cps_ptr[key + 1] - cps_ptr[key]
    ptr = np.zeros(H * V + 1, dtype=np.int64)
    otok = np.empty(total, dtype=np.int64)
    ow = np.empty(total)
    acc = np.zeros(RV)
    flag = np.zeros(RV, dtype=np.bool_)
    lst = np.empty(RV, dtype=np.int64)
    hflag = np.zeros(RV, dtype=np.bool_)
    hlist = np.empty(RV, dtype=np.int64)
    ucap = np.zeros(H, dtype=np.int64)
    n = 0
    for h in range(H):
        nh = 0
        for x in range(V):
            key = h * V + x
            cnt = 0
            for j in range(hos_ptr[key], hos_ptr[key + 1]):
                k = hos_id[j]
                if ho_uncond[k] and row[ho_rule[k]] >= 0:
                    off = row[ho_rule[k]] * V
                    for e in range(ho_ptr[k], ho_ptr[k + 1]):
                        v = off + ho_tok[e]
                        if not flag[v]:
                            flag[v] = True
                            lst[cnt] = v
                            cnt += 1
                        acc[v] += ho_w[e]
            for j in range(cps_ptr[key], cps_ptr[key + 1]):
                k = cps_id[j]
                if row[cp_rule[k]] >= 0:
                    v = row[cp_rule[k]] * V + x
                    if not flag[v]:
                        flag[v] = True
                        lst[cnt] = v
                        cnt += 1
                    acc[v] += cp_w[k]
            for e in range(cnt):
                v = lst[e]
                otok[n] = v
                ow[n] = acc[v]
                n += 1
                acc[v] = 0.0
                flag[v] = False
                if not hflag[v]:
                    hflag[v] = True
                    hlist[nh] = v
                    nh += 1
            ptr[key + 1] = n
        ucap[h] = nh
        for e in range(nh):
            hflag[hlist[e]] = False
    return ptr, otok[:n].copy(), ow[:n].copy(), ucap


@_inlined
def _add(v, val, delta, dflag, touched, cnt):
    if not dflag[_u(v)]:
        dflag[_u(v)] = True
        touched[_u(cnt[0])] = v
        cnt[0] += 1
    delta[_u(v)] += val


@_inlined
def _route(sl, mass, k, kind, c, V, row, ho_rule, ho_now, class_member, ov_acc, ov_flag, ov_list, ocnt,
           pre, pflag, plist, pcnt, wr_mass, wr_flag, wr_list, wr_cnt):
    """Attention mass `mass` reaching reader slot `sl` (a head_out, a neuron attending to this head, or a
    weighted set read through it: its mass goes to its neurons once the heads are done)."""
    if kind == 0:
        if row[ho_rule[k]] >= 0 and _member(ho_now[k], c, V, class_member):
            ov_acc[_u(k)] += mass
            _note(k, ov_flag, ov_list, ocnt)
    elif kind == 1:
        pre[_u(k)] += mass
        _note(k, pflag, plist, pcnt)
    else:
        wr_mass[_u(k)] += mass
        _note(k, wr_flag, wr_list, wr_cnt)


@_inlined
def _attend(t, i, lo, c, need, V, RV, row, tok, HD, A, U, CP, HOR, ST, RD, dl, df, touched, dcnt):
    """The attention heads at position t (sequence offset lo, eval position i, current token c; RV: output keys,
    rows x V). For each head, position t - D leaves its position table and is folded into the running sums of
    every active score combination (F, G, W, M in ST); then, when the position is computed (need), the softmax
    over the near window and the far sums, whose weights route each attended token's reader slots (head_outs,
    attending neurons, weighted sets: RD) and write its unconditional outputs (U) and copies (CP) into dl/df.
    Returns the entries written. HD: the head rules, A: AttentionArrays, U: UncondOutputs, CP: the copy rules,
    HOR: (ho_rule, ho_now), ST: the running attention state of the sequence, RD: the reader accumulators."""
    (head_rule, head_used, pos_ptr, pos_val, pos_default, src_by_tok, hg_ptr, hg_grp, class_member) = HD
    (cb_of, cb_ptr, cb_rep, sl_ptr, sl_kind, sl_id, re_ptr, re_slot, re_w) = A
    (uo_ptr, uo_tok, uo_w, ucap) = U
    (cp_rule, cp_src, cp_w, cp_cond, cpn_ptr, cpn_id) = CP
    (ho_rule, ho_now) = HOR
    (F, fref, G, g_off, W, w_off, wix, wsup, wcnt, M, m_off, mix, msup, mcnt, act_of, act_cb, act_last, act_lo,
     sl_on, sl_list, sl_cnt, att, capp, exa) = ST
    (ov_acc, ov_flag, ov_list, ocnt, pre, pflag, plist, pcnt, wr_mass, wr_flag, wr_list, wr_cnt) = RD
    H = len(head_rule)
    nw = 0
    for h in range(H):
        if not head_used[h] or row[head_rule[h]] < 0:
            continue
        p0 = pos_ptr[h]
        D = pos_ptr[h + 1] - p0
        s0 = sl_ptr[h]
        # position t - D leaves the position table: fold it into the running sums of every combination
        sf = t - D
        # a head no position of this sequence computes (`fin`: none finishes) has no active combination, and its
        # far-sum buffers (wix, mix, ...) were sized for none: nothing to fold, and nothing may be written there
        if sf >= 0 and act_lo[h + 1] > act_lo[h]:
            x = tok[lo + sf]
            e0 = re_ptr[h * V + x]
            e1 = re_ptr[h * V + x + 1]
            for j in range(e0, e1):
                sl = re_slot[j]
                if not sl_on[s0 + sl]:
                    sl_on[s0 + sl] = True
                    sl_list[s0 + sl_cnt[h]] = sl
                    sl_cnt[h] += 1
            u0 = uo_ptr[h * V + x]
            u1 = uo_ptr[h * V + x + 1]
            for j in range(u0, u1):
                v = uo_tok[j]
                if wix[h * RV + v] < 0:
                    wix[h * RV + v] = wcnt[h]
                    wsup[h * RV + wcnt[h]] = v
                    wcnt[h] += 1
            mx = -1
            if cp_cond[h]:
                if mix[h * V + x] < 0:
                    mix[h * V + x] = mcnt[h]
                    msup[h * V + mcnt[h]] = x
                    mcnt[h] += 1
                mx = mix[h * V + x]
            a0 = act_lo[h]
            na = act_lo[h + 1] - a0  # the head's W is entry-major: (support entry u, combination a) at w_off[a] + u x na
            for a in range(a0, a0 + na):
                exa[a] = 0.0
                if act_last[a] < t:
                    continue  # no position from t on reads this combination's sums
                r0 = cb_rep[act_cb[a]]
                sc = 0.0
                for g in range(_u(hg_ptr[h * V + r0]), _u(hg_ptr[h * V + r0 + 1])):
                    sc += src_by_tok[x, _u(hg_grp[g])]  # one token, many groups: its own row, not a column
                if sc > fref[a]:
                    if F[a] > 0.0:
                        scale = math.exp(fref[a] - sc)
                        F[a] *= scale
                        for u in range(sl_cnt[h]):
                            G[g_off[a] + sl_list[s0 + u]] *= scale
                        for u in range(wcnt[h]):
                            W[w_off[a] + u * na] *= scale
                        if mx >= 0:
                            for u in range(mcnt[h]):
                                M[m_off[a] + u] *= scale
                    fref[a] = sc
                ex = math.exp(sc - fref[a])
                F[a] += ex
                exa[a] = ex
                for j in range(_u(e0), _u(e1)):
                    G[_u(g_off[a] + re_slot[j])] += re_w[j] * ex
                if mx >= 0:
                    M[m_off[a] + mx] += ex
            # every combination's far outputs gain the leaving token's: contiguous over combinations (vectorised;
            # a combination no later position reads adds 0). Its reader slots (G) stay combination-major: each
            # position reads all of one combination's, and the same layout for them measured slower (lineprof)
            ea = exa[a0:a0 + na]
            for j in range(_u(u0), _u(u1)):
                o = _u(w_off[a0] + wix[h * RV + uo_tok[j]] * na)
                w = uo_w[j]
                for k in range(_u(na)):
                    W[o + k] += w * ea[k]
        if not need:
            continue
        a = act_of[cb_ptr[h] + cb_of[h * V + c]]
        g0 = hg_ptr[h * V + c]
        g1 = hg_ptr[h * V + c + 1]
        m = -np.inf
        nd = D if D <= t + 1 else t + 1
        for d in range(nd):
            xs = tok[i - d]
            sc = pos_val[p0 + d]
            for g in range(g0, g1):
                sc += src_by_tok[xs, hg_grp[g]]  # the same table: a window's tokens are rows too
            att[d] = sc
            if sc > m:
                m = sc
        far = pos_default[h] + fref[a] if F[a] > 0.0 else -np.inf
        if far > m:
            m = far
        z = 0.0
        for d in range(nd):
            att[d] = math.exp(att[d] - m)
            z += att[d]
        ef = 0.0
        if F[a] > 0.0:
            ef = math.exp(far - m)
            z += F[a] * ef
            ef /= z
        for d in range(nd):
            w = att[d] / z
            key = h * V + tok[i - d]
            for j in range(_u(uo_ptr[key]), _u(uo_ptr[key + 1])):
                _add(uo_tok[j], w * uo_w[j], dl, df, touched, dcnt)
            nw += uo_ptr[key + 1] - uo_ptr[key]
            for j in range(_u(re_ptr[key]), _u(re_ptr[key + 1])):
                sl = re_slot[j]
                _route(sl, re_w[j] * w, sl_id[_u(s0 + sl)], sl_kind[_u(s0 + sl)], c, V, row, ho_rule, ho_now,
                       class_member, ov_acc, ov_flag, ov_list, ocnt, pre, pflag, plist, pcnt,
                       wr_mass, wr_flag, wr_list, wr_cnt)
        if cp_cond[h]:
            # conditional copy rules whose `now` holds c: w x attention goes to the attended token itself
            napp = 0
            for j in range(cpn_ptr[h * V + c], cpn_ptr[h * V + c + 1]):
                k = cpn_id[j]
                if row[cp_rule[k]] >= 0:
                    capp[napp] = k
                    napp += 1
            if napp > 0:
                for d in range(nd):
                    xs = tok[i - d]
                    for u in range(napp):
                        k = capp[u]
                        if _member(cp_src[k], xs, V, class_member):
                            _add(row[cp_rule[k]] * V + xs, cp_w[k] * (att[d] / z), dl, df, touched, dcnt)
                            nw += 1
                if ef > 0.0:
                    mo = m_off[a]
                    for u in range(mcnt[h]):
                        xs = msup[h * V + u]
                        for uu in range(napp):
                            k = capp[uu]
                            if _member(cp_src[k], xs, V, class_member):
                                _add(row[cp_rule[k]] * V + xs, cp_w[k] * (M[mo + u] * ef), dl, df,
                                     touched, dcnt)
                                nw += 1
        if ef > 0.0:
            wo = w_off[a]
            na = act_lo[h + 1] - act_lo[h]
            for u in range(wcnt[h]):
                _add(wsup[h * RV + u], W[wo + u * na] * ef, dl, df, touched, dcnt)
            nw += wcnt[h]
            go = g_off[a]
            for u in range(sl_cnt[h]):
                sl = sl_list[s0 + u]
                _route(sl, G[_u(go + sl)] * ef, sl_id[_u(s0 + sl)], sl_kind[_u(s0 + sl)], c, V, row, ho_rule, ho_now,
                       class_member, ov_acc, ov_flag, ov_list, ocnt, pre, pflag, plist, pcnt,
                       wr_mass, wr_flag, wr_list, wr_cnt)
    return nw


@_inlined
def _head_out_writes(V, row, HO, ov_acc, ov_flag, ov_list, ocnt, dl, df, touched, dcnt):
    """Output accumulation for the head_outs the heads read at this position: each writes its `next` row
    scaled by its summed attention mass (ov_acc, over the ov_list entries) into dl/df (keyed row x V +
    token). Returns the entries written. HO: (ho_rule, ho_ptr, ho_tok, ho_w)."""
    (ho_rule, ho_ptr, ho_tok, ho_w) = HO
    nw = 0
    for j in range(ocnt[0]):
        k = ov_list[j]
        _write(k, ov_acc[k], row[ho_rule[k]] * V, ho_ptr, ho_tok, ho_w, dl, df, touched, dcnt)
        nw += ho_ptr[k + 1] - ho_ptr[k]
        ov_acc[k] = 0.0
        ov_flag[k] = False
    ocnt[0] = 0
    return nw


@_inlined
def _neuron_inputs(c, NR, live, n_live, Q):
    """The neurons' pre-activations at this position (current token c), before any fires: what the heads routed to
    pre (attention inputs), weighted-set masses read through heads (wr_*, fanned out here), the token-alone inputs
    (nn_*). Candidates (plist) are those plus the `live` neurons (presence inputs over the threshold: they fire
    with no other input). NR: the neuron rule arrays, Q: the per-sequence scratch."""
    (nr_rule, nr_thr, nr_ptr, nr_tok, nr_w, ncl_ptr, ncl_cls, ncl_w, nws_ptr, nws_set, nws_w,
     nn_ptr, nn_neu, nn_w, wrn_ptr, wrn_neu, wrn_w) = NR
    (pre, pflag, plist, pcnt, wr_mass, wr_flag, wr_list, wr_cnt, cacc, cflag, clist, ccnt,
     sacc, sflag, slist, scnt, aacc, aflag, alist, acnt, sd, srow) = Q
    for j in range(wr_cnt[0]):  # each attended weighted set's mass, once, to the neurons reading it
        k = wr_list[j]
        for j2 in range(_u(wrn_ptr[k]), _u(wrn_ptr[k + 1])):
            n = wrn_neu[j2]
            pre[_u(n)] += wrn_w[j2] * wr_mass[k]
            _note(n, pflag, plist, pcnt)
        wr_mass[k] = 0.0
        wr_flag[k] = False
    wr_cnt[0] = 0
    # neurons: candidates are those with an input at t and those whose presence inputs beat the threshold
    for j in range(_u(nn_ptr[c]), _u(nn_ptr[c + 1])):
        n = nn_neu[j]
        pre[_u(n)] += nn_w[j]
        _note(n, pflag, plist, pcnt)
    for j in range(n_live):
        _note(live[j], pflag, plist, pcnt)


@_inlined
def _gate_quiet(gate_n, gate_m, pre, pres_sum, nr_thr):
    """True when every gated neuron (gate_n) is certainly off at this position both as it is and as it was before
    an edit: its activation (as _neurons computes it, from the inputs _neuron_inputs summed) plus gate_m, a bound
    on how much the edit moved it, is <= 0."""
    for k in range(len(gate_n)):
        n = _u(gate_n[k])
        if pre[n] + pres_sum[n] - nr_thr[n] + gate_m[k] > 0.0:
            return False
    return True


@_inlined
def _neurons(V, row, n_atoms, NR, WS, CA, pres_sum, Q, dl, df, touched, dcnt):
    """Neuron activations and their outputs at this position, from the inputs _neuron_inputs summed. A firing
    neuron (act = pre + presence - threshold > 0, its rule on) writes its token pattern into dl/df, sums its
    weighted-set outputs per (row, set) into the dense rows sd (srow flags a written row) and its class outputs per
    (row, class), spread to atoms in aacc/alist. Returns the entries written. NR: the neuron rule arrays, WS: the
    weighted sets, CA: class -> atoms, Q: the per-sequence scratch."""
    (nr_rule, nr_thr, nr_ptr, nr_tok, nr_w, ncl_ptr, ncl_cls, ncl_w, nws_ptr, nws_set, nws_w,
     nn_ptr, nn_neu, nn_w, wrn_ptr, wrn_neu, wrn_w) = NR
    (ws_ptr, ws_tok, ws_w) = WS
    (ca_ptr, ca_atom) = CA
    (pre, pflag, plist, pcnt, wr_mass, wr_flag, wr_list, wr_cnt, cacc, cflag, clist, ccnt,
     sacc, sflag, slist, scnt, aacc, aflag, alist, acnt, sd, srow) = Q
    n_cls = len(ca_ptr) - 1
    n_ws = len(ws_ptr) - 1
    nw = 0
    for j in range(pcnt[0]):
        n = plist[j]
        un = _u(n)
        act = pre[un] + pres_sum[un] - nr_thr[un]
        if act > 0.0 and row[_u(nr_rule[un])] >= 0:
            rn = row[_u(nr_rule[un])]
            _write(n, act, rn * V, nr_ptr, nr_tok, nr_w, dl, df, touched, dcnt)
            nw += nr_ptr[n + 1] - nr_ptr[n]
            for j2 in range(_u(ncl_ptr[n]), _u(ncl_ptr[n + 1])):
                k = rn * n_cls + ncl_cls[j2]
                _note(k, cflag, clist, ccnt)
                cacc[_u(k)] += act * ncl_w[j2]
            for j2 in range(_u(nws_ptr[n]), _u(nws_ptr[n + 1])):
                k = rn * n_ws + nws_set[j2]
                _note(k, sflag, slist, scnt)
                sacc[_u(k)] += act * nws_w[j2]
        pre[un] = 0.0
        pflag[un] = False
    pcnt[0] = 0
    for j in range(scnt[0]):  # each touched (row, weighted set) once, however many neurons wrote to it
        key = slist[j]
        rk = key // n_ws
        k = key - rk * n_ws
        val = sacc[key]
        o = rk * V
        for j2 in range(_u(ws_ptr[k]), _u(ws_ptr[k + 1])):
            sd[_u(o + ws_tok[j2])] += val * ws_w[j2]
        nw += ws_ptr[k + 1] - ws_ptr[k]
        srow[rk] = True
        sacc[key] = 0.0
        sflag[key] = False
    scnt[0] = 0
    for j in range(ccnt[0]):  # each touched (row, class) once, however many neurons wrote to it
        key = clist[j]
        val = cacc[key]
        rk = key // n_cls
        k = key - rk * n_cls
        for j2 in range(ca_ptr[k], ca_ptr[k + 1]):
            ak = rk * n_atoms + ca_atom[j2]
            _note(ak, aflag, alist, acnt)
            aacc[ak] += val
        cacc[key] = 0.0
        cflag[key] = False
    ccnt[0] = 0
    return nw


@_inlined
def _finish(ir, r, nx, R, V, want_logp, dense_min, K, S, B, F, O, delta, dflag, touched, nk, aacc, alist, nak):
    """One position's distribution from its summed outputs, per ledger row: log Z, CE (nx: the next token, -1
    at a sequence's end), the hand argmax and either the full log-prob row (want_logp) or KL against reference
    row ir (outputs in O at column ir). r: the position's base row. delta/touched (nk keys) and aacc/alist (nak
    atom keys) hold this position's outputs keyed by row (R > 1) or by token (R = 1); sd/srow (in K) its
    flagless dense outputs. Leaves K's scratch clear; the caller clears delta and aacc.
    K: scratch, S: base rows, B: reference rows, F: atoms, O: outputs (tuples unpacked below)."""
    (cum, cflg, ctl, tcnt, cuma, cal, tacnt, bptr, aptr, bkey, akey, caflg, sd, srow, cums, aexp, yb, eb, chg) = K
    (base, base_p, base_lse, base_pat, base_atop) = S
    (ref16, ref32, use16, lut_p, ref_S, ref_A, ref_arg, ref_B, ref_R, ref_row) = B
    (atom_of, am_ptr, am_tok) = F
    (out_logp, out_kl, out_ce, out_agree, out_lse, out_argmax) = O
    n_atoms = len(am_ptr) - 1
    KA = base_atop.shape[2]
    lb = base_lse[r]
    iq = ref_row[ir] if len(ref_row) > 0 else ir  # its row of ref16/ref32 (ref_S, ref_B...: row ir)
    if R == 1:  # one row: the keys are the tokens and atoms themselves, nothing to bucket or sum
        cum_ = delta
        cflg_ = dflag
        ctl_ = touched
        cuma_ = aacc
        cal_ = alist
        cums_ = sd
        nt = nk
        na = nak
    else:  # bucket the touched token and atom keys by row (stable), then each row in turn
        cum_ = cum
        cflg_ = cflg
        ctl_ = ctl
        cuma_ = cuma
        cal_ = cal
        cums_ = cums
        nt = 0
        na = 0
        tcnt[0] = 0
        tacnt[0] = 0
        bptr[:] = 0
        aptr[:] = 0
        for j in range(nk):
            bptr[touched[j] // V + 1] += 1
        for j in range(nak):
            aptr[alist[j] // n_atoms + 1] += 1
        for rr in range(R):
            bptr[rr + 1] += bptr[rr]
            aptr[rr + 1] += aptr[rr]
        for j in range(nk):
            rr = touched[j] // V
            bkey[bptr[rr]] = touched[j]
            bptr[rr] += 1
        for j in range(nak):
            rr = alist[j] // n_atoms
            akey[aptr[rr]] = alist[j]
            aptr[rr] += 1
    b0 = 0
    a0 = 0
    # log Z = base lse + log(zrel), zrel = 1 + sum over changed entries of (new - old) probability
    # mass. Row by row, zrel (and p_ref . logits, B) gain only the entries that row changes; a row
    # changing atoms rescales every touched token's term, so it recomputes zrel from scratch.
    zrel = 1.0
    hi = -np.inf
    B = ref_B[ir] if not want_logp else 0.0
    # dense: this position touches at least dense_min tokens, so log Z and the argmax come from one pass
    # over the vocabulary (_dense_finish). In R > 1 only a row that must recompute zrel from scratch
    # (it changes atoms, or it is the first row to reach dense_min touched tokens) goes dense; the rows after it
    # go on from the exact log Z it leaves, and from the logits it leaves in yb (ybok): their argmax is the
    # best of yb's and the tokens they change (chg), not a scan of every touched token and atom.
    dense = False
    sused = False
    ybok = False
    ymax = -np.inf  # with ybok: yb's largest logit and its first token
    ybest = -1
    sdin = False  # R > 1: a row's flagless outputs (sd) are in cums, for it and every later row
    for rr in range(R):
        yrow = False
        if R == 1:
            fresh = True
            dense = nk >= dense_min or srow[0]
            sused = srow[0]
            if sused and not want_logp:
                B = _add_p_dot(B, iq, sd, V, use16, lut_p, ref16, ref32)
            for j in range(na):
                aexp[alist[j]] = math.exp(aacc[alist[j]])
            if not want_logp:
                for j in range(na):
                    B += aacc[alist[j]] * ref_R[ir, alist[j]]
                if use16:
                    rrow = ref16[iq]
                    for j in range(nt):
                        B += lut_p[rrow[_u(touched[j])]] * delta[_u(touched[j])]
                else:
                    frow = ref32[iq]
                    for j in range(nt):
                        B += math.exp(np.float64(frow[_u(touched[j])])) * delta[_u(touched[j])]
        else:
            fresh = aptr[rr] > a0 or (not ybok and tcnt[0] >= dense_min)
            nch = 0
            if srow[rr] and fresh and not sdin:
                # the first row that recomputes log Z from scratch and has flagless outputs: they are cums for it and
                # every later row (not summed entry by entry into cum), and it goes dense (below: only a dense pass
                # reads cums whole)
                srow[rr] = False
                sdin = True
                o = rr * V
                for v in range(V):
                    cums[v] = sd[o + v]
                    sd[o + v] = 0.0
                if not want_logp:
                    B = _add_p_dot(B, iq, cums, V, use16, lut_p, ref16, ref32)
            if srow[rr]:  # a later row's flagless outputs join its touched tokens
                srow[rr] = False
                o = rr * V
                for v in range(V):
                    x = sd[o + v]
                    if x != 0.0:
                        sd[o + v] = 0.0
                        B, zrel, hi = _row_entry(v, x, iq, r, fresh, want_logp, use16, lut_p, ref16, ref32, cum,
                                                 cflg, ctl, tcnt, base, base_p, aexp, cums, cuma, atom_of, B, zrel,
                                                 hi)
                        chg[nch] = v
                        nch += 1
            for j in range(b0, bptr[rr]):
                v = bkey[j] - rr * V
                B, zrel, hi = _row_entry(v, delta[bkey[j]], iq, r, fresh, want_logp, use16, lut_p, ref16, ref32,
                                         cum, cflg, ctl, tcnt, base, base_p, aexp, cums, cuma, atom_of, B, zrel, hi)
                chg[nch] = v
                nch += 1
            b0 = bptr[rr]
            for j in range(a0, aptr[rr]):
                ak = akey[j] - rr * n_atoms
                _note(ak, caflg, cal, tacnt)
                cuma[ak] += aacc[akey[j]]
                aexp[ak] = math.exp(cuma[ak])
                if not want_logp:
                    B += aacc[akey[j]] * ref_R[ir, ak]
            a0 = aptr[rr]
            nt = tcnt[0]
            na = tacnt[0]
            dense = fresh and (nt >= dense_min or sdin)
        if dense:
            lse, best = _dense_finish(base[r], cum_, cums_, cuma_, atom_of, V, yb, eb)
            zrel = math.exp(lse - lb)  # the next rows (R > 1) add their changes to it
            hi = lse  # >= every logit: keeps the overflow guard
            ybok = True
        elif fresh:
            ybok = False  # atoms changed: yb's logits are stale
            zrel = 1.0
            hi = -np.inf
            for j in range(na):
                ak = cal_[j]
                zrel += base_pat[r, ak] * (aexp[ak] - 1.0)
                y = base[r, base_atop[r, ak, 0]] + cuma_[ak] if base_atop[r, ak, 0] >= 0 else -np.inf
                if y > hi:
                    hi = y
            for j in range(nt):
                v = _u(ctl_[j])
                ak = _u(atom_of[v])
                if base[r, v] + cum_[v] + cuma_[ak] > hi:
                    hi = base[r, v] + cum_[v] + cuma_[ak]
                zrel += base_p[r, v] * aexp[ak] * (math.exp(cum_[v]) - 1.0)
        if not dense:
            if hi - lb > 30.0 or zrel < 1e-4:  # overflow or cancellation risk: recompute densely
                lse, best = _dense_finish(base[r], cum_, cums_, cuma_, atom_of, V, yb, eb)
                ybok = R > 1
            else:
                lse = lb + math.log(zrel)
                best = -2  # argmax below
                if ybok:  # R > 1, a row without atom changes after one that left its logits in yb
                    best, ymax = _argmax_after(yb, ymax, ybest, chg, nch, base[r], cum_, cums_, cuma_, atom_of, V)
                    yrow = True  # yb holds this row's logits
        if ybok and best != -2:
            ybest = best
            ymax = yb[best] if best >= 0 else -np.inf
        out_lse[rr, ir] = lse
        if nx >= 0:
            out_ce[rr, ir] = lse - (base[r, nx] + cum_[nx] + cums_[nx] + cuma_[atom_of[nx]])
        else:
            out_ce[rr, ir] = np.nan
        # hand argmax (unless a dense pass found it): per atom its best member without a token delta
        # (the atom's top list, else a scan of its members), then every touched token; ties go to the
        # lower token id
        if best == -2:
            best = -1
            bv = -np.inf
            for ak in range(n_atoms):
                cand = -1
                for k in range(KA):
                    v = base_atop[r, ak, k]
                    if v < 0:
                        break
                    if not cflg_[v]:
                        cand = v
                        break
                if cand < 0 and am_ptr[ak + 1] - am_ptr[ak] > KA:  # top list used up by touched tokens
                    cv = -np.inf
                    for j in range(am_ptr[ak], am_ptr[ak + 1]):
                        v = am_tok[j]
                        if not cflg_[v] and (cand < 0 or base[r, v] > cv):
                            cand = v
                            cv = base[r, v]
                if cand >= 0:
                    y = np.float64(base[r, cand]) + cuma_[ak]
                    if best < 0 or y > bv or (y == bv and cand < best):
                        best = cand
                        bv = y
            for j in range(nt):
                v = ctl_[j]
                y = base[r, v] + cum_[_u(v)] + cuma_[_u(atom_of[_u(v)])]
                if best < 0 or y > bv or (y == bv and v < best):
                    best = v
                    bv = y
        out_argmax[rr, ir] = best
        if want_logp:
            orow = out_logp[ir]
            brow = base[r]
            if dense or yrow:  # _dense_finish left this row's logits in yb, or _argmax_after updated them
                for v in range(V):
                    orow[v] = yb[v] - lse
            else:
                if na > 0:
                    for v in range(V):
                        orow[v] = brow[v] + cuma_[_u(atom_of[v])] - lse
                else:
                    for v in range(V):
                        orow[v] = brow[v] - lse
                for j in range(nt):
                    v = _u(ctl_[j])
                    orow[v] = brow[v] + cum_[v] + cuma_[_u(atom_of[v])] - lse
        else:
            # KL(p_ref || p_hand), p_ref renormalised: (sum p log p - sum p logit)/S - log S + lse.
            # sum p log p, S, argmax p_ref and p_ref . base come precomputed: only touched entries here.
            S = ref_S[ir]
            kl = (ref_A[ir] - B) / S - math.log(S) + lse
            out_kl[rr, ir] = kl if kl > 0.0 else (0.0 if kl == kl else kl)
            out_agree[rr, ir] = ref_arg[ir] == best
    if sused:  # R = 1 (R > 1 clears each row of sd as it moves it to cums or sums it into cum)
        for v in range(V):
            if sd[v] != 0.0:
                sd[v] = 0.0
        srow[0] = False
    if R > 1:
        for j in range(nt):
            cum[ctl[j]] = 0.0
            cflg[ctl[j]] = False
        if sdin:
            for v in range(V):
                cums[v] = 0.0
        for j in range(na):
            ak = cal[j]
            cuma[ak] = 0.0
            aexp[ak] = 1.0
            caflg[ak] = False


@njit(cache=True, nogil=True, error_model="numpy")
def run_seqs(q0, q1, tok, seq_ptr, row_of, base, base_p, base_lse, base_pat, base_atop, row, R, P, A, U,
             ref16, ref32, use16, lut_p, ref_S, ref_A, ref_arg, ref_B, ref_R, ref_row, want_logp, out_logp, out_kl,
             out_ce, out_agree, out_lse, out_argmax, out_dense, dense_min, fin, gate_n, gate_m, old_dense, out_kept):
    """P, A, U: handmodel.passargs' RuleArrays, AttentionArrays, UncondOutputs, unpacked below in their field order.

    Sequences q0 .. q1 - 1, every position: base row + sparse rule deltas -> log Z, CE, argmax, and either the
    full log-prob row (want_logp) or KL against the reference row (ref_B = p_ref . base, precomputed).

    The driver, per position t: arm skip-trigrams and presence inputs from the token before t, write the skips
    that fire, then the phase kernels in the model's order: _attend (every head: its attention and what it
    writes itself), _head_out_writes, _neurons, _finish (log Z, CE, argmax, KL or the log-prob row, per ledger
    row). Each phase is its own function (`_inlined`: compiled once, inlined by LLVM); the per-sequence state they
    share is allocated here and bound into tuples once per sequence.

    Ledger rows in one pass: rule i is on from row `row[i]` on (-1: off), R rows in all; every output
    goes to a delta keyed row x V + token, and row r's logits are the base plus the deltas of rows <= r
    (out_*[r, i]). Exact when each rule's contribution does not depend on which later rules are on, which
    the caller ensures (engine.HandModel.stream_metrics_rows). One row (R = 1): a plain mask.

    Output positions: `fin` empty, every position i finishes into out_*[:, i] against reference row i; else
    position i finishes into out_*[:, fin[i]] against reference row fin[i], and a position with fin[i] = -1 is
    not finished. Such a position still folds into the attention sums and arms skips and presence inputs (state
    that later positions read), but computes no heads or neurons, unless the next position finishes: then its
    outputs are summed (and dropped) for their write count, which decides how the next position writes (below).
    So a finished position computes exactly what a full pass computes there (verify/ledger/incremental.py).
    out_dense[k] (one per finished position, whatever R) says how: bit 0, it stored its outputs densely (its
    previous position's write count); bit 1, its own write count makes the next position store densely. A caller
    that recomputes some positions after an edit reads there whether the position after each needs it too.
    "Reference row k" is row ref_row[k] of ref16/ref32 when ref_row is given (else row k; ref_S, ref_B and the
    other precomputed statistics are always indexed by k), so a caller finishing a few positions of a large
    reference cache does not gather their rows out of it first.

    Gated positions (gate_n not empty; every position finishes): after an edit of the neurons gate_n (numbers
    only), a position where each of them is certainly off both before and after it (_gate_quiet: its activation
    plus gate_m, a bound on the edit's change of it, <= 0) writes and finishes nothing: the old row's outputs stand
    there (out_kept[k] = True, out_dense[k] = old_dense[k], the old row's out_dense). That holds only where the
    position stores its outputs as it did then (dense_pos = old_dense bit 0), else it is computed. Its write
    count, which decides the next position's storage, is the old one (bit 1): every write is the same as then.

    Attention is incremental: a position at distance >= D (the head's position-table length) from t has
    score default + srcscore(token), the same for every later t, so it is folded once into running sums
    per head and *score combination* (the set of score groups the current token selects; `A`): F = sum of
    exp(srcscore - ref) and, per reader slot (head_out or attending neuron), G = sum of w exp(srcscore - ref),
    ref being the running max (sums rescaled when it grows). Each t then costs O(D + active reader slots).
    head_out `copy` outputs: now = @all ones are merged into the per-source-token outputs U (far part: W);
    for heads with conditional copy rules the far attention mass per source token is kept too (M).

    Neuron class outputs are summed per atom (aacc; compiled._atoms) and never expanded to tokens: log Z
    gains sum over touched atoms of P_atom (e^aacc - 1) (base_pat: the atom's base mass), each touched
    token's term is scaled by e^aacc of its atom, and KL's p . logits gains aacc x p_ref mass of the atom (ref_R).

    Weighted sets shared by neurons cost per set, not per reference: outputs are summed per (row, set)
    over the firing neurons (sacc) and each touched set is written once (ws_*); a set attended through a
    head is one reader slot (kind 2) whose weighted mass is fanned out to the neurons reading it (wrn_*).
    """
    (V, class_member, head_rule, head_used, pos_ptr, pos_val, pos_default, src_by_tok, hg_ptr, hg_grp,
     ho_rule, ho_now, ho_ptr, ho_tok, ho_w, hos_ptr, hos_id,
     sk_rule, sk_ptr, sk_tok, sk_w, skn_ptr, skn_id, ske_ptr, ske_id,
     nr_rule, nr_thr, nr_always, nr_ptr, nr_tok, nr_w, ncl_ptr, ncl_cls, ncl_w, atom_of, ca_ptr, ca_atom, am_ptr, am_tok,
     nn_ptr, nn_neu, nn_w,
     npe_neu, npe_w, np_ptr, np_ent, na_ptr, na_neu, na_w,
     cp_rule, cp_src, cp_w, cp_cond, cpn_ptr, cpn_id,
     nws_ptr, nws_set, nws_w, ws_ptr, ws_tok, ws_w, wrn_ptr, wrn_neu, wrn_w) = P
    (cb_of, cb_ptr, cb_rep, sl_ptr, sl_kind, sl_id, re_ptr, re_slot, re_w) = A
    (uo_ptr, uo_tok, uo_w, ucap) = U
    H = len(head_rule)
    n_ho = len(ho_rule)
    n_sk = len(sk_rule)
    n_nr = len(nr_rule)
    n_cb = len(cb_rep)
    n_sl = len(sl_kind)
    RV = R * V
    for q in range(q0, q1):
        lo = seq_ptr[q]
        T = seq_ptr[q + 1] - lo
        delta = np.zeros(RV)  # keyed row x V + token
        dflag = np.zeros(RV, dtype=np.bool_)
        touched = np.empty(RV, dtype=np.int64)
        dcnt = np.zeros(1, dtype=np.int64)
        cum = np.zeros(V)  # a row's summed deltas (rows up to it), per token
        cflg = np.zeros(V, dtype=np.bool_)
        ctl = np.empty(V, dtype=np.int64)
        tcnt = np.zeros(1, dtype=np.int64)  # tokens in ctl
        bptr = np.zeros(R + 1, dtype=np.int64)  # touched keys bucketed by row
        bkey = np.empty(RV, dtype=np.int64)
        ov_acc = np.zeros(n_ho)
        ov_flag = np.zeros(n_ho, dtype=np.bool_)
        ov_list = np.empty(n_ho, dtype=np.int64)
        ocnt = np.zeros(1, dtype=np.int64)
        pre = np.zeros(n_nr)
        n_cls = len(ca_ptr) - 1
        cacc = np.zeros(R * n_cls)  # per (row, class): summed output weight of the neurons firing at t
        cflag = np.zeros(R * n_cls, dtype=np.bool_)
        clist = np.empty(R * n_cls, dtype=np.int64)
        ccnt = np.zeros(1, dtype=np.int64)
        n_atoms = len(am_ptr) - 1
        aacc = np.zeros(R * n_atoms)  # per (row, atom): summed class outputs at t
        aflag = np.zeros(R * n_atoms, dtype=np.bool_)
        alist = np.empty(R * n_atoms, dtype=np.int64)
        acnt = np.zeros(1, dtype=np.int64)
        aptr = np.zeros(R + 1, dtype=np.int64)  # touched atom keys bucketed by row
        akey = np.empty(R * n_atoms, dtype=np.int64)
        cuma = np.zeros(n_atoms)  # a row's summed atom outputs, their exp, the atoms touched so far
        aexp = np.ones(n_atoms)
        caflg = np.zeros(n_atoms, dtype=np.bool_)
        cal = np.empty(n_atoms, dtype=np.int64)
        tacnt = np.zeros(1, dtype=np.int64)  # atoms in cal
        pflag = np.zeros(n_nr, dtype=np.bool_)
        plist = np.empty(n_nr, dtype=np.int64)
        pcnt = np.zeros(1, dtype=np.int64)
        n_ws = len(ws_ptr) - 1
        sacc = np.zeros(R * n_ws)  # per (row, weighted set): summed act x of the neurons writing it at t
        # weighted-set outputs bypass the touched lists: a set has hundreds of members, so they are summed into
        # a dense row per ledger row (sd) and a position that writes one finishes densely
        sd = np.zeros(R * V)
        srow = np.zeros(R, dtype=np.bool_)
        cums = np.zeros(V)  # R > 1: the flagless outputs (sd) of the first fresh row that has them (_finish)
        # A position that touches much of the vocabulary writes *every* output into sd without flags (dl, df =
        # sd, all-true flags: _add then only adds). Whether it does is predicted from the position before (its
        # write count nw: outputs come from the heads and neurons, which change slowly along a sequence). Both ways
        # are exact. nw counts every output entry once however it was stored, so the prediction never depends on
        # how the position before stored its own: a position finishes without the ones before it (fin).
        dense_pos = False
        nofin = len(fin) == 0
        no_flags = np.ones(RV, dtype=np.bool_)
        sflag = np.zeros(R * n_ws, dtype=np.bool_)
        slist = np.empty(R * n_ws, dtype=np.int64)
        scnt = np.zeros(1, dtype=np.int64)
        n_wr = len(wrn_ptr) - 1
        wr_mass = np.zeros(n_wr)  # per (head, weighted set) read: weighted attention mass at t
        wr_flag = np.zeros(n_wr, dtype=np.bool_)
        wr_list = np.empty(n_wr, dtype=np.int64)
        wr_cnt = np.zeros(1, dtype=np.int64)
        pres_sum = np.zeros(n_nr)
        # neurons whose presence inputs minus threshold are > 0: they fire even with no other input at t
        live_idx = np.full(n_nr, -1, dtype=np.int64)
        live = np.empty(n_nr, dtype=np.int64)
        n_live = 0
        for n in nr_always:
            live_idx[n] = n_live
            live[n_live] = n
            n_live += 1
        pres_seen = np.zeros(len(npe_neu), dtype=np.bool_)
        sk_first = np.full(n_sk, NEVER, dtype=np.int64)
        # attention state: active score combinations (those of this sequence's tokens) per head
        act_of = np.full(n_cb, -1, dtype=np.int64)
        act_cb = np.empty(n_cb, dtype=np.int64)
        act_last = np.empty(n_cb, dtype=np.int64)  # last position whose current token selects the combination
        act_lo = np.zeros(H + 1, dtype=np.int64)
        n_act = 0
        for h in range(H):
            act_lo[h] = n_act
            if not head_used[h] or row[head_rule[h]] < 0:
                continue
            for t in range(T):
                if not (nofin or fin[lo + t] >= 0 or (t + 1 < T and fin[lo + t + 1] >= 0)):
                    continue  # no heads computed at t (fin)
                g = cb_ptr[h] + cb_of[h * V + tok[lo + t]]
                if act_of[g] < 0:
                    act_of[g] = n_act
                    act_cb[n_act] = g
                    n_act += 1
                act_last[act_of[g]] = t
        act_lo[H] = n_act
        g_off = np.empty(n_act + 1, dtype=np.int64)
        g_off[0] = 0
        for h in range(H):
            for a in range(act_lo[h], act_lo[h + 1]):
                g_off[a + 1] = g_off[a] + (sl_ptr[h + 1] - sl_ptr[h])
        G = np.zeros(g_off[n_act])
        # unconditional head_outs: running far output per active combination, over a per-head support; one block per
        # head laid out [support entry, combination] (the fold adds an entry to every combination at once): w_off[a] =
        # the block's start + a's column, w_off[n_act] = the total
        w_off = np.empty(n_act + 1, dtype=np.int64)
        tot = 0
        for h in range(H):
            for a in range(act_lo[h], act_lo[h + 1]):
                w_off[a] = tot + a - act_lo[h]
            tot += (act_lo[h + 1] - act_lo[h]) * ucap[h]
        w_off[n_act] = tot
        W = np.zeros(tot)
        wix = np.full(H * RV if w_off[n_act] > 0 else 0, -1, dtype=np.int64)  # per (head, output key)
        wsup = np.empty(H * RV if w_off[n_act] > 0 else 0, dtype=np.int64)
        wcnt = np.zeros(H, dtype=np.int64)
        # conditional copy rules: running far attention mass per (active combination, source token), per-head support
        mcap = T if T < V else V
        m_off = np.empty(n_act + 1, dtype=np.int64)
        m_off[0] = 0
        for h in range(H):
            for a in range(act_lo[h], act_lo[h + 1]):
                m_off[a + 1] = m_off[a] + (mcap if cp_cond[h] else 0)
        M = np.zeros(m_off[n_act])
        mix = np.full(H * V if m_off[n_act] > 0 else 0, -1, dtype=np.int64)
        msup = np.empty(H * V if m_off[n_act] > 0 else 0, dtype=np.int64)
        mcnt = np.zeros(H, dtype=np.int64)
        capp = np.empty(len(cp_rule), dtype=np.int64)  # conditional copy rules applying at t
        F = np.zeros(n_act)
        fref = np.full(n_act, -np.inf)
        sl_on = np.zeros(n_sl, dtype=np.bool_)
        sl_list = np.empty(n_sl, dtype=np.int64)  # per head: sl_list[sl_ptr[h] : sl_ptr[h] + sl_cnt[h]]
        sl_cnt = np.zeros(H, dtype=np.int64)
        maxD = 1
        for h in range(H):
            if pos_ptr[h + 1] - pos_ptr[h] > maxD:
                maxD = pos_ptr[h + 1] - pos_ptr[h]
        att = np.empty(maxD)
        # what each phase kernel reads and updates, bound once per sequence (arrays: updated in place)
        heads = (head_rule, head_used, pos_ptr, pos_val, pos_default, src_by_tok, hg_ptr, hg_grp, class_member)
        copies = (cp_rule, cp_src, cp_w, cp_cond, cpn_ptr, cpn_id)
        attention = (F, fref, G, g_off, W, w_off, wix, wsup, wcnt, M, m_off, mix, msup, mcnt, act_of, act_cb, act_last,
                     act_lo, sl_on, sl_list, sl_cnt, att, capp, np.zeros(n_act))
        readers = (ov_acc, ov_flag, ov_list, ocnt, pre, pflag, plist, pcnt, wr_mass, wr_flag, wr_list, wr_cnt)
        neurons = (nr_rule, nr_thr, nr_ptr, nr_tok, nr_w, ncl_ptr, ncl_cls, ncl_w, nws_ptr, nws_set, nws_w, nn_ptr, nn_neu,
                   nn_w, wrn_ptr, wrn_neu, wrn_w)
        spread = (pre, pflag, plist, pcnt, wr_mass, wr_flag, wr_list, wr_cnt, cacc, cflag, clist, ccnt, sacc, sflag,
                  slist, scnt, aacc, aflag, alist, acnt, sd, srow)
        finish = (cum, cflg, ctl, tcnt, cuma, cal, tacnt, bptr, aptr, bkey, akey, caflg, sd, srow, cums, aexp,
                  np.empty(V), np.empty(V), np.empty(2 * V, dtype=np.int64))
        # (the last three: _dense_finish's logits and exps, the tokens one fused row changes)
        bases = (base, base_p, base_lse, base_pat, base_atop)
        refs = (ref16, ref32, use16, lut_p, ref_S, ref_A, ref_arg, ref_B, ref_R, ref_row)
        atoms = (atom_of, am_ptr, am_tok)
        outs = (out_logp, out_kl, out_ce, out_agree, out_lse, out_argmax)
        for t in range(T):
            i = lo + t
            c = tok[i]
            ir = i if nofin else fin[i]  # this position's output and reference row; -1: not finished
            need = ir >= 0 or (t + 1 < T and fin[i + 1] >= 0)  # heads and neurons computed at t
            if ir < 0:
                dense_pos = False  # its writes are only counted: the flagged lists clear them cheaply
            nw = 0  # writes at t (each output entry once; whichever way they are stored): decides dense_pos
            if dense_pos:
                dl = sd
                df = no_flags
                srow[:] = True
            else:
                dl = delta
                df = dflag
            # tokens strictly before t: arm skip-trigrams and neuron presence inputs on first sight
            if t > 0:
                x = tok[i - 1]
                for j in range(ske_ptr[x], ske_ptr[x + 1]):
                    k = ske_id[j]
                    if sk_first[k] == NEVER:
                        sk_first[k] = t - 1
                for j in range(np_ptr[x], np_ptr[x + 1]):
                    e = np_ent[j]
                    if not pres_seen[e]:
                        pres_seen[e] = True
                        n = npe_neu[e]
                        pres_sum[n] += npe_w[e]
                        if pres_sum[n] - nr_thr[n] > 0.0:
                            if live_idx[n] < 0:
                                live_idx[n] = n_live
                                live[n_live] = n
                                n_live += 1
                        elif live_idx[n] >= 0:
                            n_live -= 1
                            last = live[n_live]
                            live[live_idx[n]] = last
                            live_idx[last] = live_idx[n]
                            live_idx[n] = -1
            for j in range(skn_ptr[c], skn_ptr[c + 1]):
                k = skn_id[j]
                if need and row[sk_rule[k]] >= 0 and sk_first[k] < t:
                    _write(k, 1.0, row[sk_rule[k]] * V, sk_ptr, sk_tok, sk_w, dl, df, touched, dcnt)
                    nw += sk_ptr[k + 1] - sk_ptr[k]
            # the phases: attention (and the outputs it writes itself), head_out outputs, neurons, then the finish
            nw += _attend(t, i, lo, c, need, V, RV, row, tok, heads, A, U, copies, (ho_rule, ho_now), attention,
                          readers, dl, df, touched, dcnt)
            if not need:
                continue  # nothing written at t
            _neuron_inputs(c, neurons, live, np.int64(n_live), spread)  # not a literal 0: typed once
            if (ir >= 0 and len(gate_n) > 0 and np.int8(dense_pos) == (old_dense[ir] & 1)
                    and _gate_quiet(gate_n, gate_m, pre, pres_sum, nr_thr)):
                # the old row's outputs stand (docstring, "Gated positions"): drop what was summed, finish nothing
                for j in range(ocnt[0]):
                    ov_acc[ov_list[j]] = 0.0
                    ov_flag[ov_list[j]] = False
                ocnt[0] = 0
                for j in range(pcnt[0]):
                    pre[plist[j]] = 0.0
                    pflag[plist[j]] = False
                pcnt[0] = 0
                for rr in range(R):
                    if srow[rr]:
                        sd[rr * V:(rr + 1) * V] = 0.0
                        srow[rr] = False
                for j in range(dcnt[0]):
                    delta[touched[j]] = 0.0
                    dflag[touched[j]] = False
                dcnt[0] = 0
                out_kept[ir] = True
                out_dense[ir] = old_dense[ir]
                dense_pos = (old_dense[ir] & 2) != 0
                continue
            nw += _head_out_writes(V, row, (ho_rule, ho_ptr, ho_tok, ho_w), ov_acc, ov_flag, ov_list, ocnt, dl, df,
                                   touched, dcnt)
            nw += _neurons(V, row, n_atoms, neurons, (ws_ptr, ws_tok, ws_w), (ca_ptr, ca_atom), pres_sum, spread, dl,
                           df, touched, dcnt)
            nk = dcnt[0]
            nak = acnt[0]
            if ir >= 0:
                _finish(ir, row_of[c], tok[i + 1] if t + 1 < T else -1, R, V, want_logp, dense_min, finish, bases,
                        refs, atoms, outs, delta, dflag, touched, nk, aacc, alist, nak)  # it clears sd itself
            else:  # counted only (the next position finishes): its writes are dropped
                for rr in range(R):
                    if srow[rr]:
                        sd[rr * V:(rr + 1) * V] = 0.0
                        srow[rr] = False
            for j in range(nk):
                delta[touched[j]] = 0.0
                dflag[touched[j]] = False
            dcnt[0] = 0
            for j in range(nak):
                aacc[alist[j]] = 0.0
                aflag[alist[j]] = False
                aexp[alist[j] % n_atoms] = 1.0
            acnt[0] = 0
            if ir >= 0:
                out_dense[ir] = np.int8(dense_pos) + np.int8(2) * np.int8(nw >= dense_min)
            dense_pos = nw >= dense_min
