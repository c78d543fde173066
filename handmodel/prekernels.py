"""numba kernels run once per call (or per mask) before the per-position pass (kernels.run_seqs): the dense
base rows of the current tokens, the reference's per-row statistics, p_ref . base row, and the merged
outputs of the unconditional head_outs. Each reads its inputs' typed records (handmodel/families.py)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def build_base(uniq, V, mask, bg, atom_of, n_atoms, KA):
    """Dense base rows for the current tokens in `uniq` (bg: families.BigramRows): logits, probabilities,
    log-sum-exp, and per atom (atoms: compiled._atoms) its probability mass and its top-KA member ids (value
    desc, index asc; -1 pads): the fields of families.BaseRows after `slot`."""
    blk_rule, blk_ptr, blk_tok, blk_w, glob_blk, nb_ptr, nb_blk = bg.rule, bg.ptr, bg.tok, bg.w, bg.glob, bg.now_ptr, bg.now_blk
    U = len(uniq)
    glob = np.zeros(V)
    for b in glob_blk:
        if mask[blk_rule[b]]:
            for j in range(blk_ptr[b], blk_ptr[b + 1]):
                glob[blk_tok[j]] += blk_w[j]
    base = np.empty((U, V), dtype=np.float32)
    prob = np.empty((U, V))
    lse = np.empty(U)
    pat = np.zeros((U, n_atoms))
    top = np.full((U, n_atoms, KA), -1, dtype=np.int32)
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
    return base, prob, lse, pat, top


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


@njit(cache=True, parallel=True)
def ref_atom_mass(ref16, ref32, use16, lut_p, atom_of, n_atoms):
    """Per reference row and atom: sum of p_ref over the atom's tokens (KL's p . class-output term)."""
    N = ref16.shape[0] if use16 else ref32.shape[0]
    R = np.zeros((N, n_atoms))
    for i in prange(N):
        if use16:
            row = ref16[i]
            for v in range(row.shape[0]):
                R[i, atom_of[v]] += lut_p[row[v]]
        else:
            frow = ref32[i]
            for v in range(frow.shape[0]):
                R[i, atom_of[v]] += math.exp(np.float64(frow[v]))
    return R


@njit(cache=True, parallel=True)
def base_dot(tok, row_of, base, ref16, ref32, use16, lut_p):
    """sum_v p_ref[i, v] * base[row of tok[i], v] per position: the rule-independent part of the KL dot
    product (depends only on the reference rows, the tokens and the prior/bigram rules), cached by the engine."""
    N = len(tok)
    out = np.empty(N)
    for i in prange(N):
        brow = base[row_of[tok[i]]]
        B = 0.0
        if use16:
            rrow = ref16[i]
            for v in range(brow.shape[0]):
                B += lut_p[rrow[v]] * brow[v]
        else:
            frow = ref32[i]
            for v in range(brow.shape[0]):
                B += math.exp(np.float64(frow[v])) * brow[v]
        out[i] = B
    return out


@njit(cache=True)
def build_uncond(H, V, row, ho, cp, ho_uncond):
    """Per (head, source token): the merged output of every switched-on head_out with now = @all reading
    that source (their contributions scale with the same attention weight, so they add into one sparse
    vector), `copy` outputs of now = @all head_outs included (target: the source token itself).
    Outputs are keyed row x V + token (row: the rule's ledger row, kernels.run_seqs; one row: the token).
    Returns CSR (ptr[H*V+1], key, w) and per head the number of distinct keys: families.MergedOuts's fields."""
    ho_rule, ho_ptr, ho_tok, ho_w, hos_ptr, hos_id = ho.rule, ho.ptr, ho.tok, ho.w, ho.src_ptr, ho.src_id
    cp_rule, cp_w, cps_ptr, cps_id = cp.rule, cp.w, cp.all_ptr, cp.all_id
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
