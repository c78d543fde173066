"""numba kernels. Plain loops over the CSR arrays built in compiled.py; semantics in docs/rules.md.

Cost model (METHOD.md, "Where the hand model's time goes"): a full-row exp is ~10 us per token, a
row dot ~1 us. So each distinct current token gets a dense *base row* (prior + bigram rows) with its
log-sum-exp and top-K computed once; per position only the sparse changes from heads, neurons and
skip-trigrams are applied, and log Z is updated with O(changed) exps. KL needs p_ref: float16 input
is read through a 65536-entry table (exp of every float16), so no exp per vocabulary entry at all.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

TOP_K = 8
NEVER = 1 << 62  # "token not seen yet" for first-occurrence positions


@njit(cache=True, parallel=True)
def build_base(uniq, V, mask, blk_rule, blk_ptr, blk_tok, blk_w, glob_blk, nb_ptr, nb_blk):
    """Dense base rows for the current tokens in `uniq`: logits, their log-sum-exp, top-K token ids."""
    U = len(uniq)
    glob = np.zeros(V)
    for b in glob_blk:
        if mask[blk_rule[b]]:
            for j in range(blk_ptr[b], blk_ptr[b + 1]):
                glob[blk_tok[j]] += blk_w[j]
    base = np.empty((U, V), dtype=np.float32)
    lse = np.empty(U)
    top = np.empty((U, TOP_K), dtype=np.int64)
    for u in prange(U):
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
            s += math.exp(base[u, v] - m)
        lse[u] = m + math.log(s)
        # top-K by (value desc, index asc): insertion, entering only when strictly larger
        tv = np.full(TOP_K, -np.inf)
        ti = np.full(TOP_K, -1, dtype=np.int64)
        for v in range(V):
            x = base[u, v]
            if x > tv[TOP_K - 1] or ti[TOP_K - 1] < 0:
                k = TOP_K - 1
                while k > 0 and (x > tv[k - 1] or ti[k - 1] < 0):
                    tv[k] = tv[k - 1]
                    ti[k] = ti[k - 1]
                    k -= 1
                tv[k] = x
                ti[k] = v
        top[u, :] = ti
    return base, lse, top


@njit(cache=True, parallel=True)
def ref_stats(ref16, ref32, use16, lut_p, lut_pl):
    """Per reference row: S = sum p, A = sum p log p, argmax p (first on ties). Independent of the rules."""
    N = ref16.shape[0] if use16 else ref32.shape[0]
    S = np.empty(N)
    A = np.empty(N)
    arg = np.empty(N, dtype=np.int64)
    for i in prange(N):
        s = 0.0
        a = 0.0
        bp = -1.0
        best = 0
        if use16:
            row = ref16[i]
            for v in range(row.shape[0]):
                u = row[v]
                p = lut_p[u]
                s += p
                a += lut_pl[u]
                if p > bp:
                    bp = p
                    best = v
        else:
            frow = ref32[i]
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
    return S, A, arg


@njit(cache=True, inline="always")
def _member(sid, c, V, class_member):
    if sid < V:
        return sid == c
    return class_member[sid - V, c]


@njit(cache=True, inline="always")
def _write(k, scale, ptr, tok, w, delta, dflag, touched, cnt):
    for j in range(ptr[k], ptr[k + 1]):
        v = tok[j]
        if not dflag[v]:
            dflag[v] = True
            touched[cnt[0]] = v
            cnt[0] += 1
        delta[v] += scale * w[j]


@njit(cache=True, inline="always")
def _note(n, flag, lst, cnt):
    if not flag[n]:
        flag[n] = True
        lst[cnt[0]] = n
        cnt[0] += 1


@njit(cache=True, parallel=True)
def run_seqs(tok, seq_ptr, row_of, base, base_lse, base_top, mask, P,
             ref16, ref32, use16, lut_p, ref_S, ref_A, ref_arg, want_logp, out_logp, out_kl, out_ce, out_agree, out_lse, out_argmax):
    (V, class_member, head_rule, head_used, pos_ptr, pos_val, pos_default, src_score, hg_ptr, hg_grp,
     ho_rule, ho_now, ho_ptr, ho_tok, ho_w, hos_ptr, hos_id,
     sk_rule, sk_ptr, sk_tok, sk_w, skn_ptr, skn_id, ske_ptr, ske_id,
     nr_rule, nr_thr, nr_always, nr_ptr, nr_tok, nr_w, nn_ptr, nn_neu, nn_w,
     npe_neu, npe_w, np_ptr, np_ent, na_ptr, na_neu, na_w) = P
    H = len(head_rule)
    n_ho = len(ho_rule)
    n_sk = len(sk_rule)
    n_nr = len(nr_rule)
    for q in prange(len(seq_ptr) - 1):
        lo = seq_ptr[q]
        T = seq_ptr[q + 1] - lo
        delta = np.zeros(V)
        dflag = np.zeros(V, dtype=np.bool_)
        touched = np.empty(V, dtype=np.int64)
        dcnt = np.zeros(1, dtype=np.int64)
        ov_acc = np.zeros(n_ho)
        ov_flag = np.zeros(n_ho, dtype=np.bool_)
        ov_list = np.empty(n_ho, dtype=np.int64)
        ocnt = np.zeros(1, dtype=np.int64)
        pre = np.zeros(n_nr)
        pflag = np.zeros(n_nr, dtype=np.bool_)
        plist = np.empty(n_nr, dtype=np.int64)
        pcnt = np.zeros(1, dtype=np.int64)
        pres_sum = np.zeros(n_nr)
        pres_flag = np.zeros(n_nr, dtype=np.bool_)
        pres_list = np.empty(n_nr, dtype=np.int64)
        prcnt = np.zeros(1, dtype=np.int64)
        pres_seen = np.zeros(len(npe_neu), dtype=np.bool_)
        sk_first = np.full(n_sk, NEVER, dtype=np.int64)
        att = np.empty(T)
        for t in range(T):
            i = lo + t
            c = tok[i]
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
                        _note(n, pres_flag, pres_list, prcnt)
            for j in range(skn_ptr[c], skn_ptr[c + 1]):
                k = skn_id[j]
                if mask[sk_rule[k]] and sk_first[k] < t:
                    _write(k, 1.0, sk_ptr, sk_tok, sk_w, delta, dflag, touched, dcnt)
            # attention heads: softmax over positions 0..t, then route weight to readers of each source
            for h in range(H):
                if not head_used[h] or not mask[head_rule[h]]:
                    continue
                D = pos_ptr[h + 1] - pos_ptr[h]
                g0 = hg_ptr[h * V + c]
                g1 = hg_ptr[h * V + c + 1]
                m = -np.inf
                for s in range(t + 1):
                    d = t - s
                    sc = pos_val[pos_ptr[h] + d] if d < D else pos_default[h]
                    xs = tok[lo + s]
                    for g in range(g0, g1):
                        sc += src_score[hg_grp[g], xs]
                    att[s] = sc
                    if sc > m:
                        m = sc
                z = 0.0
                for s in range(t + 1):
                    att[s] = math.exp(att[s] - m)
                    z += att[s]
                for s in range(t + 1):
                    a = att[s] / z
                    xs = tok[lo + s]
                    key = h * V + xs
                    for j in range(hos_ptr[key], hos_ptr[key + 1]):
                        k = hos_id[j]
                        if mask[ho_rule[k]] and _member(ho_now[k], c, V, class_member):
                            ov_acc[k] += a
                            _note(k, ov_flag, ov_list, ocnt)
                    for j in range(na_ptr[key], na_ptr[key + 1]):
                        n = na_neu[j]
                        pre[n] += a * na_w[j]
                        _note(n, pflag, plist, pcnt)
            for j in range(ocnt[0]):
                k = ov_list[j]
                _write(k, ov_acc[k], ho_ptr, ho_tok, ho_w, delta, dflag, touched, dcnt)
                ov_acc[k] = 0.0
                ov_flag[k] = False
            ocnt[0] = 0
            # neurons: every neuron with any input (or a negative threshold) is a candidate
            for j in range(nn_ptr[c], nn_ptr[c + 1]):
                n = nn_neu[j]
                pre[n] += nn_w[j]
                _note(n, pflag, plist, pcnt)
            for j in range(prcnt[0]):
                _note(pres_list[j], pflag, plist, pcnt)
            for n in nr_always:
                _note(n, pflag, plist, pcnt)
            for j in range(pcnt[0]):
                n = plist[j]
                act = pre[n] + pres_sum[n] - nr_thr[n]
                if act > 0.0 and mask[nr_rule[n]]:
                    _write(n, act, nr_ptr, nr_tok, nr_w, delta, dflag, touched, dcnt)
                pre[n] = 0.0
                pflag[n] = False
            pcnt[0] = 0

            # log Z = base lse + log(1 + sum over changed entries of (new - old) probability mass)
            r = row_of[c]
            lb = base_lse[r]
            nt = dcnt[0]
            zrel = 1.0
            hi = -np.inf
            for j in range(nt):
                v = touched[j]
                b = np.float64(base[r, v])
                if b + delta[v] > hi:
                    hi = b + delta[v]
                zrel += math.exp(b + delta[v] - lb) - math.exp(b - lb)
            if hi - lb > 30.0 or zrel < 1e-4:  # overflow or cancellation risk: recompute densely
                m = -np.inf
                for v in range(V):
                    y = base[r, v] + delta[v]
                    if y > m:
                        m = y
                z = 0.0
                for v in range(V):
                    z += math.exp(base[r, v] + delta[v] - m)
                lse = m + math.log(z)
            else:
                lse = lb + math.log(zrel)
            out_lse[i] = lse
            if t + 1 < T:
                nx = tok[i + 1]
                out_ce[i] = lse - (base[r, nx] + delta[nx])
            else:
                out_ce[i] = np.nan
            # hand argmax: best untouched among the base top-K, then every touched entry
            best = -1
            bv = -np.inf
            for k in range(TOP_K):
                v = base_top[r, k]
                if v >= 0 and not dflag[v]:
                    best = v
                    bv = np.float64(base[r, v])
                    break
            if best < 0 and nt < V:
                for v in range(V):
                    if not dflag[v] and (best < 0 or base[r, v] > bv):
                        best = v
                        bv = np.float64(base[r, v])
            for j in range(nt):
                v = touched[j]
                y = base[r, v] + delta[v]
                if best < 0 or y > bv or (y == bv and v < best):
                    best = v
                    bv = y
            out_argmax[i] = best
            if want_logp:
                for v in range(V):
                    out_logp[i, v] = base[r, v] + delta[v] - lse
            else:
                # KL(p_ref || p_hand), p_ref renormalised: (sum p log p - sum p logit)/S - log S + lse.
                # sum p log p, S and argmax p_ref come precomputed (ref_stats): one gather+fma per entry here.
                brow = base[r]
                B = 0.0
                if use16:
                    rrow = ref16[i]
                    for v in range(V):
                        B += lut_p[rrow[v]] * brow[v]
                    for j in range(nt):
                        v = touched[j]
                        B += lut_p[rrow[v]] * delta[v]
                else:
                    frow = ref32[i]
                    for v in range(V):
                        B += math.exp(np.float64(frow[v])) * brow[v]
                    for j in range(nt):
                        v = touched[j]
                        B += math.exp(np.float64(frow[v])) * delta[v]
                S = ref_S[i]
                kl = (ref_A[i] - B) / S - math.log(S) + lse
                out_kl[i] = kl if kl > 0.0 else (0.0 if kl == kl else kl)
                out_agree[i] = ref_arg[i] == best
            for j in range(nt):
                v = touched[j]
                delta[v] = 0.0
                dflag[v] = False
            dcnt[0] = 0
