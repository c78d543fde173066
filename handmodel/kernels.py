"""The per-position engine (numba): run_seqs, a short parallel driver over sequences, and its phase kernels.

This file is over 400 lines on purpose: numba caches a kernel's machine code per *file* and checks only that
file's timestamp, so a phase kernel in another module edited would leave run_seqs' cached code (which has
the phases compiled in) stale. The driver, its phases and their scratch records therefore live here
together; the kernels run once per call (base rows, reference statistics) are in prekernels.py.

Cost model (docs/method.md, "Where the hand model's time goes"): a full-row exp is ~10 us per token, a
row dot ~1 us. So each distinct current token gets a dense *base row* (prior + bigram rows) with its
log-sum-exp and top-K computed once; per position only the sparse changes from heads, neurons and
skip-trigrams are applied, and log Z is updated with O(changed) exps. KL needs p_ref: float16 input
is read through a 65536-entry table (exp of every float16), so no exp per vocabulary entry at all.
Class outputs of neurons change whole atoms (one exp per atom, not per member token); the ledger's
rows are computed in one pass (outputs keyed by row, each row finished from the rows up to it).
A position whose outputs touch much of the vocabulary (large weighted sets written by many neurons) is
the exception: there the per-token bookkeeping costs more than the exps, so weighted-set outputs, and all
outputs once the previous position was that large, are summed into a dense row without flags and log Z
and the argmax come from one sequential pass over the vocabulary (_dense_finish).

Speed: the phase kernels are separate (not inlined) functions, so numba's parfor passes analyse only the
driver's few lines (compile time), and they are compiled with error_model="numpy", as numba compiles the
body of a prange loop (no zero-division check and exception branch at every `/`, `//` and `%`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

TOP_K = 64
NEVER = 1 << 62  # "token not seen yet" for first-occurrence positions
PHASE = dict(cache=True, error_model="numpy")  # the phase kernels' numba options (module doc: speed)


def atom_top_k(n_atoms: int) -> int:
    """Entries per (base row, atom) top list: TOP_K in all when there are few atoms, at least 8 each."""
    return max(8, -(-TOP_K // max(n_atoms, 1)))


# ---------------------------------------------------------------------------------------------
# Scratch records: one set per sequence (per thread of the parallel loop), reset as each position ends.
# A list "x_list[:x_cnt[0]]" names the keys of x_acc set at this position, x_flag[k] whether k is in it.

class Deltas(NamedTuple):
    """This position's outputs, keyed row x V + token (atoms: row x n_atoms + atom)."""
    delta: np.ndarray      # [R*V] float64: token outputs with a touched list
    dflag: np.ndarray      # [R*V] bool
    touched: np.ndarray    # [R*V] int64
    dcnt: np.ndarray       # [1] int64
    sd: np.ndarray         # [R*V] float64: flagless outputs (weighted sets; every output of a dense position)
    srow: np.ndarray       # [R] bool: row has flagless outputs
    no_flags: np.ndarray   # [R*V] bool, all True: the flags a dense position writes through (_add only adds)
    aacc: np.ndarray       # [R*n_atoms] float64: class outputs summed per atom
    aflag: np.ndarray      # [R*n_atoms] bool
    alist: np.ndarray      # [R*n_atoms] int64
    acnt: np.ndarray       # [1] int64
    dense_pos: np.ndarray  # [1] bool: this position writes flagless (predicted from the position before)


class Reads(NamedTuple):
    """What the heads hand on at this position: attention mass per conditional head_out, neuron
    pre-activation (inputs other than presence), weighted mass per weighted-set reader."""
    ov_acc: np.ndarray   # [n_ho] float64
    ov_flag: np.ndarray
    ov_list: np.ndarray
    ocnt: np.ndarray
    pre: np.ndarray      # [n_nr] float64
    pflag: np.ndarray
    plist: np.ndarray
    pcnt: np.ndarray
    wr_mass: np.ndarray  # [n_wr] float64
    wr_flag: np.ndarray
    wr_list: np.ndarray
    wr_cnt: np.ndarray


class NeuronState(NamedTuple):
    """Neuron and skip state along the sequence, and the class / weighted-set sums at this position."""
    cacc: np.ndarray       # [R*n_cls] float64: per (row, class) summed output weight of the firing neurons
    cflag: np.ndarray
    clist: np.ndarray
    ccnt: np.ndarray
    sacc: np.ndarray       # [R*n_ws] float64: per (row, weighted set) summed act x of the neurons writing it
    sflag: np.ndarray
    slist: np.ndarray
    scnt: np.ndarray
    pres_sum: np.ndarray   # [n_nr] float64: presence inputs of the tokens seen so far
    pres_seen: np.ndarray  # [n_pe] bool: presence entry counted
    live: np.ndarray       # [n_nr] int64: live[:n_live[0]]: neurons whose presence sum beats the threshold
    live_idx: np.ndarray   # [n_nr] int64: index in live, -1 if not there
    n_live: np.ndarray     # [1] int64
    sk_first: np.ndarray   # [n_sk] int64: first position holding the skip's src token (NEVER: none yet)


class RowSums(NamedTuple):
    """Fused ledger rows (R > 1): the touched keys bucketed by row and a row's sums over the rows up to it."""
    cum: np.ndarray    # [V] float64: a row's summed token deltas
    cflg: np.ndarray   # [V] bool
    ctl: np.ndarray    # [V] int64: tokens in cum
    tcnt: np.ndarray   # [1] int64
    bptr: np.ndarray   # [R + 1] int64: touched token keys bucketed by row (bkey)
    bkey: np.ndarray   # [R*V] int64
    aptr: np.ndarray   # [R + 1] int64: touched atom keys bucketed by row (akey)
    akey: np.ndarray   # [R*n_atoms] int64
    cuma: np.ndarray   # [n_atoms] float64: a row's summed atom outputs
    aexp: np.ndarray   # [n_atoms] float64: exp(cuma) (1 for untouched atoms)
    caflg: np.ndarray  # [n_atoms] bool
    cal: np.ndarray    # [n_atoms] int64: atoms in cuma
    tacnt: np.ndarray  # [1] int64
    cums: np.ndarray   # [V] float64: stays 0 (R > 1 sums each row's flagless outputs into cum)


class AttnState(NamedTuple):
    """Incremental attention of one sequence: per head its active score combinations (those of the
    sequence's tokens) a in act_lo[h]:act_lo[h+1], with far sums F, G (reader slots), W (merged unconditional
    outputs), M (attention mass per source token, heads with conditional copies), referenced to fref[a]."""
    act_of: np.ndarray    # [n_cb] int64: combination -> active index, -1
    act_cb: np.ndarray    # [n_act] int64
    act_last: np.ndarray  # [n_act] int64: last position whose current token selects it
    act_lo: np.ndarray    # [H + 1] int64
    F: np.ndarray         # [n_act] float64: sum of exp(srcscore - fref) over far positions
    fref: np.ndarray      # [n_act] float64
    g_off: np.ndarray     # [n_act + 1] int64: G[g_off[a] + slot]
    G: np.ndarray
    w_off: np.ndarray     # [n_act + 1] int64: W[w_off[a] + u], u indexing the head's support wsup
    W: np.ndarray
    wix: np.ndarray       # [H*R*V] int64: output key -> u (-1)
    wsup: np.ndarray      # [H*R*V] int64
    wcnt: np.ndarray      # [H] int64
    m_off: np.ndarray     # [n_act + 1] int64: M[m_off[a] + u], u indexing msup
    M: np.ndarray
    mix: np.ndarray       # [H*V] int64: source token -> u (-1)
    msup: np.ndarray      # [H*V] int64
    mcnt: np.ndarray      # [H] int64
    sl_on: np.ndarray     # [n_sl] bool: slot fed by some far position
    sl_list: np.ndarray   # [n_sl] int64: per head sl_list[sl_ptr[h] : sl_ptr[h] + sl_cnt[h]]
    sl_cnt: np.ndarray    # [H] int64
    capp: np.ndarray      # [n_cp] int64: conditional copies applying at t
    att: np.ndarray       # [max D] float64: near attention weights


@njit(**PHASE)
def _new_scratch(R, V, n_ho, n_nr, n_wr, n_cls, n_ws, n_atoms, n_pe, n_sk, always):
    RV = R * V
    dt = Deltas(np.zeros(RV), np.zeros(RV, dtype=np.bool_), np.empty(RV, dtype=np.int64), np.zeros(1, dtype=np.int64),
                np.zeros(RV), np.zeros(R, dtype=np.bool_), np.ones(RV, dtype=np.bool_), np.zeros(R * n_atoms),
                np.zeros(R * n_atoms, dtype=np.bool_), np.empty(R * n_atoms, dtype=np.int64),
                np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.bool_))
    rds = Reads(np.zeros(n_ho), np.zeros(n_ho, dtype=np.bool_), np.empty(n_ho, dtype=np.int64),
                np.zeros(1, dtype=np.int64), np.zeros(n_nr), np.zeros(n_nr, dtype=np.bool_),
                np.empty(n_nr, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(n_wr),
                np.zeros(n_wr, dtype=np.bool_), np.empty(n_wr, dtype=np.int64), np.zeros(1, dtype=np.int64))
    ns = NeuronState(np.zeros(R * n_cls), np.zeros(R * n_cls, dtype=np.bool_), np.empty(R * n_cls, dtype=np.int64),
                     np.zeros(1, dtype=np.int64), np.zeros(R * n_ws), np.zeros(R * n_ws, dtype=np.bool_),
                     np.empty(R * n_ws, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(n_nr),
                     np.zeros(n_pe, dtype=np.bool_), np.empty(n_nr, dtype=np.int64),
                     np.full(n_nr, -1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.full(n_sk, NEVER, dtype=np.int64))
    for n in always:  # threshold < 0: live from the start
        ns.live_idx[n] = ns.n_live[0]
        ns.live[ns.n_live[0]] = n
        ns.n_live[0] += 1
    rs = RowSums(np.zeros(V), np.zeros(V, dtype=np.bool_), np.empty(V, dtype=np.int64), np.zeros(1, dtype=np.int64),
                 np.zeros(R + 1, dtype=np.int64), np.empty(RV, dtype=np.int64), np.zeros(R + 1, dtype=np.int64),
                 np.empty(R * n_atoms, dtype=np.int64), np.zeros(n_atoms), np.ones(n_atoms),
                 np.zeros(n_atoms, dtype=np.bool_), np.empty(n_atoms, dtype=np.int64), np.zeros(1, dtype=np.int64),
                 np.zeros(V))
    return dt, rds, ns, rs


@njit(**PHASE)
def _new_attention(tok, lo, T, row, R, V, hd, cp, rd, mo):
    """The active score combinations of this sequence per head and their (empty) far sums."""
    H = len(hd.rule)
    n_cb = len(rd.cb_rep)
    act_of = np.full(n_cb, -1, dtype=np.int64)
    act_cb = np.empty(n_cb, dtype=np.int64)
    act_last = np.empty(n_cb, dtype=np.int64)
    act_lo = np.zeros(H + 1, dtype=np.int64)
    n_act = 0
    for h in range(H):
        act_lo[h] = n_act
        if not hd.used[h] or row[hd.rule[h]] < 0:
            continue
        for t in range(T):
            g = rd.cb_ptr[h] + rd.cb_of[h * V + tok[lo + t]]
            if act_of[g] < 0:
                act_of[g] = n_act
                act_cb[n_act] = g
                n_act += 1
            act_last[act_of[g]] = t
    act_lo[H] = n_act
    g_off = np.empty(n_act + 1, dtype=np.int64)
    w_off = np.empty(n_act + 1, dtype=np.int64)
    m_off = np.empty(n_act + 1, dtype=np.int64)
    g_off[0] = 0
    w_off[0] = 0
    m_off[0] = 0
    mcap = T if T < V else V
    for h in range(H):
        for a in range(act_lo[h], act_lo[h + 1]):
            g_off[a + 1] = g_off[a] + (rd.sl_ptr[h + 1] - rd.sl_ptr[h])
            w_off[a + 1] = w_off[a] + mo.cap[h]
            m_off[a + 1] = m_off[a] + (mcap if cp.cond[h] else 0)
    RV = R * V
    n_sl = len(rd.sl_kind)
    maxD = 1
    for h in range(H):
        if hd.pos_ptr[h + 1] - hd.pos_ptr[h] > maxD:
            maxD = hd.pos_ptr[h + 1] - hd.pos_ptr[h]
    return AttnState(act_of, act_cb, act_last, act_lo, np.zeros(n_act), np.full(n_act, -np.inf), g_off,
                     np.zeros(g_off[n_act]), w_off, np.zeros(w_off[n_act]),
                     np.full(H * RV if w_off[n_act] > 0 else 0, -1, dtype=np.int64),
                     np.empty(H * RV if w_off[n_act] > 0 else 0, dtype=np.int64), np.zeros(H, dtype=np.int64),
                     m_off, np.zeros(m_off[n_act]), np.full(H * V if m_off[n_act] > 0 else 0, -1, dtype=np.int64),
                     np.empty(H * V if m_off[n_act] > 0 else 0, dtype=np.int64), np.zeros(H, dtype=np.int64),
                     np.zeros(n_sl, dtype=np.bool_), np.empty(n_sl, dtype=np.int64), np.zeros(H, dtype=np.int64),
                     np.empty(len(cp.rule), dtype=np.int64), np.empty(maxD))


# ---------------------------------------------------------------------------------------------
# Small helpers (inlined into the phases)

@njit(cache=True, inline="always")
def _member(sid, c, V, class_member):
    if sid < V:
        return sid == c
    return class_member[sid - V, c]


@njit(cache=True, inline="always")
def _note(n, flag, lst, cnt):
    if not flag[n]:
        flag[n] = True
        lst[cnt[0]] = n
        cnt[0] += 1


@njit(cache=True, inline="always")
def _add(v, val, delta, dflag, touched, cnt):
    if not dflag[v]:
        dflag[v] = True
        touched[cnt[0]] = v
        cnt[0] += 1
    delta[v] += val


@njit(cache=True, inline="always")
def _write(k, scale, off, ptr, tok, w, delta, dflag, touched, cnt):
    for j in range(ptr[k], ptr[k + 1]):
        _add(off + tok[j], scale * w[j], delta, dflag, touched, cnt)


@njit(cache=True, inline="always")
def _route(sl, mass, s0, c, V, row, rd, ho, class_member, rds):
    """Attention mass `mass` reaching reader slot `sl` of the head whose slots start at s0 (a head_out, a neuron
    attending to this head, or a weighted set read through it: its mass goes to its neurons once the heads are done)."""
    k = rd.sl_id[s0 + sl]
    kind = rd.sl_kind[s0 + sl]
    if kind == 0:
        if row[ho.rule[k]] >= 0 and _member(ho.now[k], c, V, class_member):
            rds.ov_acc[k] += mass
            _note(k, rds.ov_flag, rds.ov_list, rds.ocnt)
    elif kind == 1:
        rds.pre[k] += mass
        _note(k, rds.pflag, rds.plist, rds.pcnt)
    else:
        rds.wr_mass[k] += mass
        _note(k, rds.wr_flag, rds.wr_list, rds.wr_cnt)


# ---------------------------------------------------------------------------------------------
# Phase 1: attention. Per head, the position leaving its position table is folded into the far sums of
# every active combination; then the head's attention at t over the near positions and the far sums is
# routed to its outputs (merged unconditional outputs, copies) and reader slots.

@njit(cache=True, inline="always")
def _fold_far(h, x, t, V, RV, hd, cp, rd, mo, st):
    """Source token x, now at distance D of head h, joins the far sums (running max fref: sums rescaled)."""
    s0 = rd.sl_ptr[h]
    e0 = rd.re_ptr[h * V + x]
    e1 = rd.re_ptr[h * V + x + 1]
    for j in range(e0, e1):
        sl = rd.re_slot[j]
        if not st.sl_on[s0 + sl]:
            st.sl_on[s0 + sl] = True
            st.sl_list[s0 + st.sl_cnt[h]] = sl
            st.sl_cnt[h] += 1
    u0 = mo.ptr[h * V + x]
    u1 = mo.ptr[h * V + x + 1]
    for j in range(u0, u1):
        v = mo.key[j]
        if st.wix[h * RV + v] < 0:
            st.wix[h * RV + v] = st.wcnt[h]
            st.wsup[h * RV + st.wcnt[h]] = v
            st.wcnt[h] += 1
    mx = -1
    if cp.cond[h]:
        if st.mix[h * V + x] < 0:
            st.mix[h * V + x] = st.mcnt[h]
            st.msup[h * V + st.mcnt[h]] = x
            st.mcnt[h] += 1
        mx = st.mix[h * V + x]
    for a in range(st.act_lo[h], st.act_lo[h + 1]):
        if st.act_last[a] < t:
            continue  # no position from t on reads this combination's sums
        r0 = rd.cb_rep[st.act_cb[a]]
        sc = 0.0
        for g in range(hd.grp_ptr[h * V + r0], hd.grp_ptr[h * V + r0 + 1]):
            sc += hd.src_score[hd.grp[g], x]
        if sc > st.fref[a]:
            if st.F[a] > 0.0:
                scale = math.exp(st.fref[a] - sc)
                st.F[a] *= scale
                for u in range(st.sl_cnt[h]):
                    st.G[st.g_off[a] + st.sl_list[s0 + u]] *= scale
                for u in range(st.wcnt[h]):
                    st.W[st.w_off[a] + u] *= scale
                if mx >= 0:
                    for u in range(st.mcnt[h]):
                        st.M[st.m_off[a] + u] *= scale
            st.fref[a] = sc
        ex = math.exp(sc - st.fref[a])
        st.F[a] += ex
        for j in range(e0, e1):
            st.G[st.g_off[a] + rd.re_slot[j]] += rd.re_w[j] * ex
        for j in range(u0, u1):
            st.W[st.w_off[a] + st.wix[h * RV + mo.key[j]]] += mo.w[j] * ex
        if mx >= 0:
            st.M[st.m_off[a] + mx] += ex


@njit(cache=True, inline="always")
def _near_attention(h, i, t, c, D, a, tok, V, hd, st):
    """Head h's scores at t over the near positions (st.att[:nd], made exp(score - max)) and the far sums:
    returns nd, the normaliser z and the far weight per unit of F (0 without far positions), over z."""
    p0 = hd.pos_ptr[h]
    g0 = hd.grp_ptr[h * V + c]
    g1 = hd.grp_ptr[h * V + c + 1]
    m = -np.inf
    nd = D if D <= t + 1 else t + 1
    for d in range(nd):
        xs = tok[i - d]
        sc = hd.pos_val[p0 + d]
        for g in range(g0, g1):
            sc += hd.src_score[hd.grp[g], xs]
        st.att[d] = sc
        if sc > m:
            m = sc
    far = hd.pos_default[h] + st.fref[a] if st.F[a] > 0.0 else -np.inf
    if far > m:
        m = far
    z = 0.0
    for d in range(nd):
        st.att[d] = math.exp(st.att[d] - m)
        z += st.att[d]
    ef = 0.0
    if st.F[a] > 0.0:
        ef = math.exp(far - m)
        z += st.F[a] * ef
        ef /= z
    return nd, z, ef


@njit(cache=True, inline="always")
def _conditional_copies(h, i, c, a, nd, z, ef, tok, V, row, cp, at, st, dl, df, dt):
    """Copies whose `now` holds c: w x attention on a source position goes to that position's own token."""
    napp = 0
    for j in range(cp.now_ptr[h * V + c], cp.now_ptr[h * V + c + 1]):
        k = cp.now_id[j]
        if row[cp.rule[k]] >= 0:
            st.capp[napp] = k
            napp += 1
    if napp == 0:
        return
    for d in range(nd):
        xs = tok[i - d]
        for u in range(napp):
            k = st.capp[u]
            if _member(cp.src[k], xs, V, at.class_member):
                _add(row[cp.rule[k]] * V + xs, cp.w[k] * (st.att[d] / z), dl, df, dt.touched, dt.dcnt)
    if ef > 0.0:
        mo_ = st.m_off[a]
        for u in range(st.mcnt[h]):
            xs = st.msup[h * V + u]
            for uu in range(napp):
                k = st.capp[uu]
                if _member(cp.src[k], xs, V, at.class_member):
                    _add(row[cp.rule[k]] * V + xs, cp.w[k] * (st.M[mo_ + u] * ef), dl, df, dt.touched, dt.dcnt)


@njit(**PHASE)
def _attend(t, i, c, lo, ps, hd, ho, cp, at, rd, mo, st, rds, dl, df, dt):
    """Every head some switched-on rule reads: its attention at t, routed to outputs and reader slots."""
    tok, row, V = ps.tok, ps.row, ps.V
    RV = ps.R * V
    for h in range(len(hd.rule)):
        if not hd.used[h] or row[hd.rule[h]] < 0:
            continue
        D = hd.pos_ptr[h + 1] - hd.pos_ptr[h]
        s0 = rd.sl_ptr[h]
        if t - D >= 0:
            _fold_far(h, tok[lo + t - D], t, V, RV, hd, cp, rd, mo, st)
        a = st.act_of[rd.cb_ptr[h] + rd.cb_of[h * V + c]]
        nd, z, ef = _near_attention(h, i, t, c, D, a, tok, V, hd, st)
        for d in range(nd):
            w = st.att[d] / z
            key = h * V + tok[i - d]
            for j in range(mo.ptr[key], mo.ptr[key + 1]):
                _add(mo.key[j], w * mo.w[j], dl, df, dt.touched, dt.dcnt)
            for j in range(rd.re_ptr[key], rd.re_ptr[key + 1]):
                _route(rd.re_slot[j], rd.re_w[j] * w, s0, c, V, row, rd, ho, at.class_member, rds)
        if cp.cond[h]:
            _conditional_copies(h, i, c, a, nd, z, ef, tok, V, row, cp, at, st, dl, df, dt)
        if ef > 0.0:
            wo = st.w_off[a]
            for u in range(st.wcnt[h]):
                _add(st.wsup[h * RV + u], st.W[wo + u] * ef, dl, df, dt.touched, dt.dcnt)
            go = st.g_off[a]
            for u in range(st.sl_cnt[h]):
                sl = st.sl_list[s0 + u]
                _route(sl, st.G[go + sl] * ef, s0, c, V, row, rd, ho, at.class_member, rds)


@njit(**PHASE)
def _head_out_reads(row, V, ho, ws, rds, dl, df, dt):
    """The conditional head_outs' outputs (attention mass x next), and each attended weighted set's mass,
    once, to the neurons reading it."""
    for j in range(rds.ocnt[0]):
        k = rds.ov_list[j]
        _write(k, rds.ov_acc[k], row[ho.rule[k]] * V, ho.ptr, ho.tok, ho.w, dl, df, dt.touched, dt.dcnt)
        rds.ov_acc[k] = 0.0
        rds.ov_flag[k] = False
    rds.ocnt[0] = 0
    for j in range(rds.wr_cnt[0]):
        k = rds.wr_list[j]
        for j2 in range(ws.rd_ptr[k], ws.rd_ptr[k + 1]):
            n = ws.rd_neu[j2]
            rds.pre[n] += ws.rd_w[j2] * rds.wr_mass[k]
            _note(n, rds.pflag, rds.plist, rds.pcnt)
        rds.wr_mass[k] = 0.0
        rds.wr_flag[k] = False
    rds.wr_cnt[0] = 0


# ---------------------------------------------------------------------------------------------
# Phase 2: skip-trigrams and neuron activations (their inputs from the heads are in Reads by now)

@njit(**PHASE)
def _arm_earlier(t, x, sk, nr, ns):
    """Token x at t - 1 is now strictly earlier: it arms skip-trigrams and neuron presence inputs on first sight."""
    for j in range(sk.src_ptr[x], sk.src_ptr[x + 1]):
        k = sk.src_id[j]
        if ns.sk_first[k] == NEVER:
            ns.sk_first[k] = t - 1
    for j in range(nr.pres_ptr[x], nr.pres_ptr[x + 1]):
        e = nr.pres_ent[j]
        if not ns.pres_seen[e]:
            ns.pres_seen[e] = True
            n = nr.pres_neu[e]
            ns.pres_sum[n] += nr.pres_w[e]
            if ns.pres_sum[n] - nr.thr[n] > 0.0:
                if ns.live_idx[n] < 0:
                    ns.live_idx[n] = ns.n_live[0]
                    ns.live[ns.n_live[0]] = n
                    ns.n_live[0] += 1
            elif ns.live_idx[n] >= 0:
                ns.n_live[0] -= 1
                last = ns.live[ns.n_live[0]]
                ns.live[ns.live_idx[n]] = last
                ns.live_idx[last] = ns.live_idx[n]
                ns.live_idx[n] = -1


@njit(**PHASE)
def _skips(t, c, row, V, sk, ns, dl, df, dt):
    """Skip-trigrams whose now holds c and whose src token came strictly before t."""
    for j in range(sk.now_ptr[c], sk.now_ptr[c + 1]):
        k = sk.now_id[j]
        if row[sk.rule[k]] >= 0 and ns.sk_first[k] < t:
            _write(k, 1.0, row[sk.rule[k]] * V, sk.ptr, sk.tok, sk.w, dl, df, dt.touched, dt.dcnt)


@njit(**PHASE)
def _fire_neurons(c, row, V, nr, ws, at, ns, rds, dl, df, dt):
    """Candidates are the neurons with an input at t and those whose presence inputs beat the threshold:
    act = inputs - threshold > 0 writes act x its token outputs; class and weighted-set outputs are summed
    per (row, class) and (row, set) for _spread."""
    n_cls = len(at.ca_ptr) - 1
    n_ws = len(ws.ptr) - 1
    for j in range(nr.now_ptr[c], nr.now_ptr[c + 1]):
        n = nr.now_neu[j]
        rds.pre[n] += nr.now_w[j]
        _note(n, rds.pflag, rds.plist, rds.pcnt)
    for j in range(ns.n_live[0]):
        _note(ns.live[j], rds.pflag, rds.plist, rds.pcnt)
    for j in range(rds.pcnt[0]):
        n = rds.plist[j]
        act = rds.pre[n] + ns.pres_sum[n] - nr.thr[n]
        if act > 0.0 and row[nr.rule[n]] >= 0:
            rn = row[nr.rule[n]]
            _write(n, act, rn * V, nr.ptr, nr.tok, nr.w, dl, df, dt.touched, dt.dcnt)
            for j2 in range(nr.cls_ptr[n], nr.cls_ptr[n + 1]):
                k = rn * n_cls + nr.cls[j2]
                _note(k, ns.cflag, ns.clist, ns.ccnt)
                ns.cacc[k] += act * nr.cls_w[j2]
            for j2 in range(nr.ws_ptr[n], nr.ws_ptr[n + 1]):
                k = rn * n_ws + nr.ws[j2]
                _note(k, ns.sflag, ns.slist, ns.scnt)
                ns.sacc[k] += act * nr.ws_w[j2]
        rds.pre[n] = 0.0
        rds.pflag[n] = False
    rds.pcnt[0] = 0


@njit(**PHASE)
def _spread(V, ws, at, ns, dt):
    """Each touched (row, weighted set) written once into the flagless rows, however many neurons wrote to it;
    each touched (row, class) added to its atoms."""
    n_ws = len(ws.ptr) - 1
    n_cls = len(at.ca_ptr) - 1
    n_atoms = len(at.am_ptr) - 1
    for j in range(ns.scnt[0]):
        key = ns.slist[j]
        rk = key // n_ws
        k = key - rk * n_ws
        val = ns.sacc[key]
        o = rk * V
        for j2 in range(ws.ptr[k], ws.ptr[k + 1]):
            dt.sd[o + ws.tok[j2]] += val * ws.w[j2]
        dt.srow[rk] = True
        ns.sacc[key] = 0.0
        ns.sflag[key] = False
    ns.scnt[0] = 0
    for j in range(ns.ccnt[0]):
        key = ns.clist[j]
        val = ns.cacc[key]
        rk = key // n_cls
        k = key - rk * n_cls
        for j2 in range(at.ca_ptr[k], at.ca_ptr[k + 1]):
            ak = rk * n_atoms + at.ca_atom[j2]
            _note(ak, dt.aflag, dt.alist, dt.acnt)
            dt.aacc[ak] += val
        ns.cacc[key] = 0.0
        ns.cflag[key] = False
    ns.ccnt[0] = 0


# ---------------------------------------------------------------------------------------------
# Phase 3: finish each ledger row at this position: log Z, CE, argmax, and KL (or the log-prob row)

@njit(cache=True, inline="always")
def _p_ref(i, v, use16, lut_p, ref16, ref32):
    """The reference's probability of token v at position i (float16 rows through the exp table)."""
    return lut_p[ref16[i, v]] if use16 else math.exp(np.float64(ref32[i, v]))


@njit(cache=True, inline="always")
def _row_entry(v, x, i, r, fresh, want_logp, rf, rs, bs, atom_of, B, zrel, hi):
    """A fused ledger row changes token v's logit by x: sum it into cum (noting v as touched), add p_ref(v) x to
    the KL's p . logits (B) and, unless the row recomputes zrel from scratch (fresh), v's new minus old
    probability mass (relative to the base row's) to zrel; hi keeps the largest changed logit (overflow guard)."""
    _note(v, rs.cflg, rs.ctl, rs.tcnt)
    old = rs.cum[v]
    rs.cum[v] += x
    if not want_logp:
        B += _p_ref(i, v, rf.use16, rf.lut_p, rf.p16, rf.p32) * x
    if not fresh:
        ak = atom_of[v]
        zrel += bs.prob[r, v] * rs.aexp[ak] * (math.exp(rs.cum[v]) - (1.0 if old == 0.0 else math.exp(old)))
        y = bs.logit[r, v] + rs.cum[v] + rs.cuma[ak]
        if y > hi:
            hi = y
    return B, zrel, hi


@njit(cache=True, inline="always")
def _dense_finish(brow, cum, cums, cuma, atom_of, V):
    """log Z and argmax (ties: lower id) of the logits brow + cum + cums + cuma[atom] by one sequential pass
    over the vocabulary: cheaper than the per-touched-token bookkeeping once most of it is touched, and
    exact (no cancellation), so it is also the fallback when the incremental log Z is at risk."""
    m = -np.inf
    best = -1
    for v in range(V):
        y = brow[v] + cum[v] + cums[v] + cuma[atom_of[v]]
        if y > m:
            m = y
            best = v
    z = 0.0
    for v in range(V):
        z += math.exp(brow[v] + cum[v] + cums[v] + cuma[atom_of[v]] - m)
    return m + math.log(z), best


@njit(cache=True, inline="always")
def _bucket_by_row(nk, nak, R, V, n_atoms, dt, rs):
    """R > 1: the touched token and atom keys bucketed by row (stable)."""
    rs.tcnt[0] = 0
    rs.tacnt[0] = 0
    rs.bptr[:] = 0
    rs.aptr[:] = 0
    for j in range(nk):
        rs.bptr[dt.touched[j] // V + 1] += 1
    for j in range(nak):
        rs.aptr[dt.alist[j] // n_atoms + 1] += 1
    for rr in range(R):
        rs.bptr[rr + 1] += rs.bptr[rr]
        rs.aptr[rr + 1] += rs.aptr[rr]
    for j in range(nk):
        rr = dt.touched[j] // V
        rs.bkey[rs.bptr[rr]] = dt.touched[j]
        rs.bptr[rr] += 1
    for j in range(nak):
        rr = dt.alist[j] // n_atoms
        rs.akey[rs.aptr[rr]] = dt.alist[j]
        rs.aptr[rr] += 1


@njit(cache=True, inline="always")
def _hand_argmax(r, nt, KA, bs, at, cum_, cflg_, ctl_, cuma_):
    """Hand argmax without a dense pass: per atom its best member without a token delta (the atom's top list,
    else a scan of its members), then every touched token; ties go to the lower token id."""
    best = -1
    bv = -np.inf
    for ak in range(len(at.am_ptr) - 1):
        cand = -1
        for k in range(KA):
            v = bs.atom_top[r, ak, k]
            if v < 0:
                break
            if not cflg_[v]:
                cand = v
                break
        if cand < 0 and at.am_ptr[ak + 1] - at.am_ptr[ak] > KA:  # top list used up by touched tokens
            cv = -np.inf
            for j in range(at.am_ptr[ak], at.am_ptr[ak + 1]):
                v = at.am_tok[j]
                if not cflg_[v] and (cand < 0 or bs.logit[r, v] > cv):
                    cand = v
                    cv = bs.logit[r, v]
        if cand >= 0:
            y = np.float64(bs.logit[r, cand]) + cuma_[ak]
            if best < 0 or y > bv or (y == bv and cand < best):
                best = cand
                bv = y
    for j in range(nt):
        v = ctl_[j]
        y = bs.logit[r, v] + cum_[v] + cuma_[at.atom_of[v]]
        if best < 0 or y > bv or (y == bv and v < best):
            best = v
            bv = y
    return best


@njit(cache=True, inline="always")
def _logp_row(orow, brow, lse, dense, nt, na, V, atom_of, cum_, cums_, cuma_, ctl_):
    """The full log-prob row (want_logp)."""
    if dense:
        for v in range(V):
            orow[v] = brow[v] + cum_[v] + cums_[v] + cuma_[atom_of[v]] - lse
    else:
        if na > 0:
            for v in range(V):
                orow[v] = brow[v] + cuma_[atom_of[v]] - lse
        else:
            for v in range(V):
                orow[v] = brow[v] - lse
        for j in range(nt):
            v = ctl_[j]
            orow[v] = brow[v] + cum_[v] + cuma_[atom_of[v]] - lse


@njit(**PHASE)
def _finish(i, t, T, c, ps, bs, rf, out, at, dt, rs):
    """Every ledger row at position i: log Z = base lse + log(zrel), zrel = 1 + sum over changed entries of
    (new - old) probability mass. Row by row, zrel (and p_ref . logits, B) gain only the entries that row
    changes; a row changing atoms rescales every touched token's term, so it recomputes zrel from scratch.
    A position touching at least dense_min tokens finishes densely (_dense_finish); in R > 1 only a row that
    recomputes zrel from scratch goes dense, and the rows after it go on from the exact log Z it leaves."""
    R, V, tok, dense_min = ps.R, ps.V, ps.tok, ps.dense_min
    want_logp = out.want_logp
    atom_of = at.atom_of
    n_atoms = len(at.am_ptr) - 1
    nk = dt.dcnt[0]
    nak = dt.acnt[0]
    r = bs.slot[c]
    lb = bs.lse[r]
    if R == 1:  # one row: the keys are the tokens and atoms themselves, nothing to bucket or sum
        cum_, cflg_, ctl_, cuma_, cal_, cums_ = dt.delta, dt.dflag, dt.touched, dt.aacc, dt.alist, dt.sd
        nt = nk
        na = nak
    else:
        cum_, cflg_, ctl_, cuma_, cal_, cums_ = rs.cum, rs.cflg, rs.ctl, rs.cuma, rs.cal, rs.cums
        nt = 0
        na = 0
        _bucket_by_row(nk, nak, R, V, n_atoms, dt, rs)
    b0 = 0
    a0 = 0
    zrel = 1.0
    hi = -np.inf
    B = rf.B[i] if not want_logp else 0.0
    dense = False
    sused = False
    nz = 0  # flagless outputs (sd entries) at this position: with nk, whether the next one is dense
    for rr in range(R):
        if R == 1:
            fresh = True
            dense = nk >= dense_min or dt.srow[0]
            sused = dt.srow[0]
            if sused and not want_logp:
                for v in range(V):
                    if dt.sd[v] != 0.0:
                        B += _p_ref(i, v, rf.use16, rf.lut_p, rf.p16, rf.p32) * dt.sd[v]
            for j in range(na):
                rs.aexp[dt.alist[j]] = math.exp(dt.aacc[dt.alist[j]])
            if not want_logp:
                for j in range(na):
                    B += dt.aacc[dt.alist[j]] * rf.atom_mass[i, dt.alist[j]]
                if rf.use16:
                    rrow = rf.p16[i]
                    for j in range(nt):
                        B += rf.lut_p[rrow[dt.touched[j]]] * dt.delta[dt.touched[j]]
                else:
                    frow = rf.p32[i]
                    for j in range(nt):
                        B += math.exp(np.float64(frow[dt.touched[j]])) * dt.delta[dt.touched[j]]
        else:
            fresh = rs.aptr[rr] > a0
            if dt.srow[rr]:  # this row's flagless outputs join its touched tokens
                dt.srow[rr] = False
                o = rr * V
                for v in range(V):
                    x = dt.sd[o + v]
                    if x != 0.0:
                        nz += 1
                        dt.sd[o + v] = 0.0
                        B, zrel, hi = _row_entry(v, x, i, r, fresh, want_logp, rf, rs, bs, atom_of, B, zrel, hi)
            for j in range(b0, rs.bptr[rr]):
                key = rs.bkey[j]
                B, zrel, hi = _row_entry(key - rr * V, dt.delta[key], i, r, fresh, want_logp, rf, rs, bs, atom_of,
                                         B, zrel, hi)
            b0 = rs.bptr[rr]
            for j in range(a0, rs.aptr[rr]):
                ak = rs.akey[j] - rr * n_atoms
                _note(ak, rs.caflg, rs.cal, rs.tacnt)
                rs.cuma[ak] += dt.aacc[rs.akey[j]]
                rs.aexp[ak] = math.exp(rs.cuma[ak])
                if not want_logp:
                    B += dt.aacc[rs.akey[j]] * rf.atom_mass[i, ak]
            a0 = rs.aptr[rr]
            nt = rs.tcnt[0]
            na = rs.tacnt[0]
            dense = fresh and nt >= dense_min
        if dense:
            lse, best = _dense_finish(bs.logit[r], cum_, cums_, cuma_, atom_of, V)
            zrel = math.exp(lse - lb)  # the next rows (R > 1) add their changes to it
            hi = lse  # >= every logit: keeps the overflow guard
        elif fresh:
            zrel = 1.0
            hi = -np.inf
            for j in range(na):
                ak = cal_[j]
                zrel += bs.atom_mass[r, ak] * (rs.aexp[ak] - 1.0)
                y = bs.logit[r, bs.atom_top[r, ak, 0]] + cuma_[ak] if bs.atom_top[r, ak, 0] >= 0 else -np.inf
                if y > hi:
                    hi = y
            for j in range(nt):
                v = ctl_[j]
                ak = atom_of[v]
                if bs.logit[r, v] + cum_[v] + cuma_[ak] > hi:
                    hi = bs.logit[r, v] + cum_[v] + cuma_[ak]
                zrel += bs.prob[r, v] * rs.aexp[ak] * (math.exp(cum_[v]) - 1.0)
        if not dense:
            if hi - lb > 30.0 or zrel < 1e-4:  # overflow or cancellation risk: recompute densely
                lse, best = _dense_finish(bs.logit[r], cum_, cums_, cuma_, atom_of, V)
            else:
                lse = lb + math.log(zrel)
                best = -2  # argmax below
        out.lse[rr, i] = lse
        if t + 1 < T:
            nx = tok[i + 1]
            out.ce[rr, i] = lse - (bs.logit[r, nx] + cum_[nx] + cums_[nx] + cuma_[atom_of[nx]])
        else:
            out.ce[rr, i] = np.nan
        if best == -2:
            best = _hand_argmax(r, nt, bs.atom_top.shape[2], bs, at, cum_, cflg_, ctl_, cuma_)
        out.argmax[rr, i] = best
        if want_logp:
            _logp_row(out.logp[i], bs.logit[r], lse, dense, nt, na, V, atom_of, cum_, cums_, cuma_, ctl_)
        else:
            # KL(p_ref || p_hand), p_ref renormalised: (sum p log p - sum p logit)/S - log S + lse.
            # sum p log p, S, argmax p_ref and p_ref . base come precomputed: only touched entries here.
            S = rf.S[i]
            kl = (rf.A[i] - B) / S - math.log(S) + lse
            out.kl[rr, i] = kl if kl > 0.0 else (0.0 if kl == kl else kl)
            out.agree[rr, i] = rf.arg[i] == best
    _clear(nk, nak, nt, na, nz, sused, R, V, n_atoms, dense_min, dt, rs)


@njit(cache=True, inline="always")
def _clear(nk, nak, nt, na, nz, sused, R, V, n_atoms, dense_min, dt, rs):
    """Reset what this position wrote; predict whether the next one is dense (outputs change slowly)."""
    for j in range(nk):
        dt.delta[dt.touched[j]] = 0.0
        dt.dflag[dt.touched[j]] = False
    dt.dcnt[0] = 0
    if sused:  # R = 1 (R > 1 clears each row of sd as it sums it into cum)
        for v in range(V):
            if dt.sd[v] != 0.0:
                nz += 1
                dt.sd[v] = 0.0
        dt.srow[0] = False
    dt.dense_pos[0] = nk + nz >= dense_min
    for j in range(nak):
        dt.aacc[dt.alist[j]] = 0.0
        dt.aflag[dt.alist[j]] = False
        rs.aexp[dt.alist[j] % n_atoms] = 1.0
    dt.acnt[0] = 0
    if R > 1:
        for j in range(nt):
            rs.cum[rs.ctl[j]] = 0.0
            rs.cflg[rs.ctl[j]] = False
        for j in range(na):
            ak = rs.cal[j]
            rs.cuma[ak] = 0.0
            rs.aexp[ak] = 1.0
            rs.caflg[ak] = False


# ---------------------------------------------------------------------------------------------
# The driver

@njit(**PHASE)
def _output_rows(dt):
    """Where this position's outputs go: the touched-token deltas, or, when dense (predicted from the position
    before), flagless into dt.sd (all-true flags: _add then only adds). Both ways are exact.
    (Not in run_seqs' body: there numba's parfor pass loses the slice assignment to a record's field.)"""
    if dt.dense_pos[0]:
        dt.srow[:] = True
        return dt.sd, dt.no_flags
    return dt.delta, dt.dflag


@njit(cache=True, parallel=True)
def run_seqs(ps, bs, rf, out, hd, ho, cp, sk, nr, ws, at, rd, mo):
    """Every position of every sequence (records: handmodel/families.py): base row + sparse rule deltas ->
    log Z, CE, argmax, and either the full log-prob row (out.want_logp) or KL against the reference row.
    Per position, the model's equation in phases: logits = base row (bs) + skips + head outputs (_attend,
    _head_out_reads) + neuron outputs (_fire_neurons, _spread); then _finish (log Z, KL, CE, argmax).

    Ledger rows in one pass: rule i is on from row `ps.row[i]` on (-1: off), ps.R rows in all; every output
    goes to a delta keyed row x V + token, and row r's logits are the base plus the deltas of rows <= r
    (out.*[r, i]). Exact when each rule's contribution does not depend on which later rules are on, which
    the caller ensures (engine.HandModel.stream_metrics_rows). One row (R = 1): a plain mask.

    Attention is incremental: a position at distance >= D (the head's position-table length) from t has
    score default + srcscore(token), the same for every later t, so it is folded once into running sums
    per head and *score combination* (the set of score groups the current token selects; Readers): F = sum of
    exp(srcscore - ref) and, per reader slot (head_out or attending neuron), G = sum of w exp(srcscore - ref),
    ref being the running max (sums rescaled when it grows). Each t then costs O(D + active reader slots).
    head_out `copy` outputs: now = @all ones are merged into the per-source-token outputs (mo; far part: W);
    for heads with conditional copy rules the far attention mass per source token is kept too (M).

    Neuron class outputs are summed per atom (aacc; compiled._atoms) and never expanded to tokens: log Z
    gains sum over touched atoms of P_atom (e^aacc - 1) (bs.atom_mass), each touched token's term is scaled
    by e^aacc of its atom, and KL's p . logits gains aacc x p_ref mass of the atom (rf.atom_mass).

    Weighted sets shared by neurons cost per set, not per reference: outputs are summed per (row, set)
    over the firing neurons (sacc) and each touched set is written once; a set attended through a head is
    one reader slot (kind 2) whose weighted mass is fanned out to the neurons reading it (ws.rd_*).
    """
    R, V, tok, row = ps.R, ps.V, ps.tok, ps.row
    for q in prange(len(ps.seq_ptr) - 1):
        lo = ps.seq_ptr[q]
        T = ps.seq_ptr[q + 1] - lo
        dt, rds, ns, rs = _new_scratch(R, V, len(ho.rule), len(nr.rule), len(ws.rd_head), len(at.ca_ptr) - 1,
                                       len(ws.ptr) - 1, len(at.am_ptr) - 1, len(nr.pres_neu), len(sk.rule), nr.always)
        st = _new_attention(tok, lo, T, row, R, V, hd, cp, rd, mo)
        for t in range(T):
            i = lo + t
            c = tok[i]
            dl, df = _output_rows(dt)
            if t > 0:
                _arm_earlier(t, tok[i - 1], sk, nr, ns)
            _skips(t, c, row, V, sk, ns, dl, df, dt)
            _attend(t, i, c, lo, ps, hd, ho, cp, at, rd, mo, st, rds, dl, df, dt)
            _head_out_reads(row, V, ho, ws, rds, dl, df, dt)
            _fire_neurons(c, row, V, nr, ws, at, ns, rds, dl, df, dt)
            _spread(V, ws, at, ns, dt)
            _finish(i, t, T, c, ps, bs, rf, out, at, dt, rs)
