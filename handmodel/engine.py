"""HandModel: next-token log-probs and streaming metrics from CompiledRules (orchestrates kernels.py)."""
from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Protocol

import numpy as np

from .compiled import CompiledRules
from .errors import UserError
from .passargs import AttentionArrays, RuleArrays, UncondOutputs


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
_POOL_BYTES = 1 << 30  # a pool larger than this is cut back to the tokens of the current call
MAX_FUSED_ROWS = 32  # ledger rows per engine pass (per-sequence buffers grow with rows x vocabulary)
FINISH_COST = 50  # a finished position costs about this many of a position only folded into the attention sums
DENSE_SHARE = 2  # dense finish once a position touches 1/DENSE_SHARE of the vocabulary (benchmarks/dense_finish.py)


_POOL: tuple[ThreadPoolExecutor, int] | None = None  # the kernels' worker threads and their number


def _kernels():
    """handmodel.kernels, imported on first use: importing numba costs ~0.3 s, and a `verify` whose ledger rows
    all come from the row cache never runs a kernel."""
    if "handmodel.kernels" not in sys.modules:
        _skip_blas_probe()
    from . import kernels

    return kernels


def _skip_blas_probe() -> None:
    """numba's first kernel call imports numba.np.arraymath, whose BLAS probe imports scipy.linalg when scipy is
    installed: ~0.5 s, as much as the rest of numba's set-up and a quarter of the inner loop's 2 s. The
    kernels use no BLAS (no np.dot, @ or np.linalg), so when scipy.linalg is not loaded yet the probe is answered
    "no BLAS": numba.np.arraymath is imported with scipy.linalg blocked, which is then unblocked, so a later
    import of scipy.linalg in this process works as usual. A kernel that used BLAS would fail to compile, saying
    that scipy is required (tests/test_handmodel_engine.py holds both)."""
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # importing it, or a submodule of it, now raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if "scipy.linalg" in sys.modules and sys.modules["scipy.linalg"] is None:
            del sys.modules["scipy.linalg"]


def _run_chunks(ptr: np.ndarray, args: tuple, fin: np.ndarray | None = None) -> None:
    """kernels.run_seqs over all sequences, one contiguous chunk per numba thread (numba.get_num_threads), chunks
    balanced by cost, not sequence count: a position, and FINISH_COST more for each position that finishes (fin:
    kernels.run_seqs' map; empty or None, all finish). Each writes only its own positions' output entries, so no
    merge is needed. The kernel itself is serial: a parallel=True kernel of this size costs minutes of numba's
    parfor analysis at its cold compile (benchmarks/README.md, "Issue 22 item 4")."""
    import numba

    n_seq = len(ptr) - 1
    n = max(1, min(numba.get_num_threads(), n_seq))
    cost = ptr.astype(np.float64)
    if fin is not None and len(fin):
        done = np.zeros(len(fin) + 1)
        np.cumsum(fin >= 0, out=done[1:])
        cost = cost + FINISH_COST * done[ptr]
    cuts = np.searchsorted(cost, np.linspace(0, cost[-1], n + 1)[1:-1], side="left")
    _on_threads(_kernels().run_seqs, np.concatenate([[0], cuts, [n_seq]]), args)


def _on_rows(fn, n: int, *args) -> None:
    """fn(lo, hi, *args) over rows 0..n-1 of a kernel whose rows are independent (base rows, reference
    statistics), in one contiguous chunk per numba thread."""
    import numba

    k = max(1, min(numba.get_num_threads(), n))
    _on_threads(fn, np.linspace(0, n, k + 1), args)


def _on_threads(fn, bounds: np.ndarray, args: tuple) -> None:
    """fn(bounds[k], bounds[k + 1], *args) for each chunk k, on Python threads (the kernels release the GIL).
    Serial kernels on threads instead of parallel=True ones: numba's parfor lowering cost seconds of every cold
    compile, and a chunk per thread is all these loops need."""
    global _POOL
    bounds = np.unique(np.asarray(bounds).astype(np.int64))
    if len(bounds) < 2:
        bounds = np.zeros(2, np.int64)
    n = len(bounds) - 1
    if n == 1:
        fn(bounds[0], bounds[1], *args)
        return
    if _POOL is None or _POOL[1] < n:
        if _POOL is not None:
            _POOL[0].shutdown(wait=False)
        _POOL = (ThreadPoolExecutor(max_workers=n, thread_name_prefix="kernels"), n)
    futs = [_POOL[0].submit(fn, bounds[k], bounds[k + 1], *args) for k in range(n)]
    for f in futs:
        f.result()


def kernels_cold() -> bool:
    """True when the engine's numba kernels will compile on first use (a fresh checkout or an edited kernel), so a
    caller can say why the first call is slow."""
    return _cache_cold(_kernels().run_seqs)


def _cache_cold(dispatcher) -> bool:
    """True when numba has no cached machine code for `dispatcher` that it would load: no index, one from another
    numba version, or one written for other source. numba's own check (its index's source stamp), not file times:
    numba stamps the source by a hash of its content, so a file touched but unchanged (a checkout) is not cold."""
    try:
        return not dispatcher._cache._cache_file._load_index()
    except Exception:  # noqa: BLE001 -- no cache, another numba's layout or an unreadable index: say it compiles
        return True


# Base rows by the content that builds them (HandModel._row_digests), one pool per vocabulary size and atom count,
# shared by every HandModel of the process: `verify --watch` compiles a new HandModel per edit, and an edit
# rebuilds only the rows whose prior or bigram blocks it changed (fresh memory is ~1 s here for valid.txt's tokens).
_POOLS: dict[tuple[int, int], "_BasePool"] = {}
# The statistics of the last _REF_HELD reference row sets read under a caller's name for them, most recent last
# (HandModel._ref_stats): `verify --watch` reads all rows for an edit that spans everything and a subset for one
# that does not.
_REF_STATS: dict = {}
_REF_HELD = 2


class StatsStore(Protocol):
    """Where a caller keeps the reference statistics of whole-reference passes between processes
    (HandModel.stream_metrics_rows' stats_store; verify keeps them next to its reference cache). The engine
    names what it saves by everything it depends on and checks the shapes and dtypes of what it reads; checking
    the bytes is the store's part."""

    def load(self, name: str, want: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray] | None:
        """The arrays saved under `name` ({field: (shape, dtype str)} says which), or None."""

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Keep `arrays` under `name` (best effort: a store that cannot write just keeps nothing)."""


class NeuronGate(NamedTuple):
    """What a pass after an edit of neurons' numbers needs to keep the old rows where the edit cannot act
    (HandModel.stream_metrics_rows' gate)."""
    rules: list[int]  # the edited neurons, as rule indices of the HandModel's ruleset
    margins: np.ndarray  # [len(rules)] >= 0: a bound on how far the edit moved each one's activation, anywhere
    old_dense: list  # per mask: the old row's `dense` (kernels.run_seqs' out_dense), [N] int8


def _store_name(*parts) -> str:
    """A file-safe name for what `parts` (strings, bytes, tuples of them) identify."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _stored(store: StatsStore | None, name: str, want: dict, compute) -> dict[str, np.ndarray]:
    """The arrays `want` ({field: (shape, dtype str)}) from `store` when it holds them under `name` with those shapes
    and dtypes, else compute() (a dict of them), then saved there."""
    if store is not None:
        got = store.load(name, want)
        if got is not None and all(k in got and np.shape(got[k]) == s and np.asarray(got[k]).dtype == np.dtype(d)
                                   for k, (s, d) in want.items()):
            return {k: np.ascontiguousarray(got[k]) for k in want}
    out = compute()
    if store is not None:
        store.save(name, out)
    return out


class _BasePool:
    """Dense base rows (float32 logits, float64 probabilities, log-sum-exp; per atom its mass and top
    members), each under the digest of what builds it (HandModel._row_digests): tokens with the same blocks share
    a row, and so do HandModels with the same prior and bigram rules."""

    def __init__(self, V: int, n_atoms: int):
        self.V = V
        self.n_atoms = n_atoms
        self.ka = _kernels().atom_top_k(n_atoms)
        self.reset()

    def reset(self) -> None:
        self.index: dict[bytes, int] = {}  # row digest -> row
        self.n = 0
        self.base = np.zeros((0, self.V), dtype=np.float32)
        self.prob = np.zeros((0, self.V))
        self.lse = np.zeros(0)
        self.pat = np.zeros((0, self.n_atoms))
        self.top = np.zeros((0, self.n_atoms, self.ka), dtype=np.int32)

    def rows_for(self, digests: list[bytes]) -> tuple:
        """Views of the next len(digests) rows (base, prob, lse, pat, top) for build_base to fill in place, the
        digests mapped to them. Fresh memory is what a first pass pays for (the pool is ~140 MB for valid.txt's
        tokens, and first-touching a page costs more than computing its row on a VM that backs memory lazily),
        so the rows are built where they stay, not built and then copied in; grown by doubling."""
        n, k = self.n, len(digests)
        if n + k > len(self.base):
            cap = min(max(n + k, 2 * len(self.base), 64), max(self.V, n + k))
            for name in ("base", "prob", "lse", "pat", "top"):
                old = getattr(self, name)
                new = np.empty((cap,) + old.shape[1:], dtype=old.dtype)
                new[:n] = old[:n]
                setattr(self, name, new)
        self.pat[n:n + k] = 0.0  # build_base adds into pat and inserts into top
        self.top[n:n + k] = -1
        self.index.update(zip(digests, range(n, n + k)))
        self.n = n + k
        return tuple(getattr(self, name)[n:n + k] for name in ("base", "prob", "lse", "pat", "top"))


def _attention_arrays(a, V: int, H: int, ho_uncond: np.ndarray) -> AttentionArrays:
    """Arrays for the incremental attention in kernels.run_seqs.

    Score combinations: the current token c selects a set of score groups of head h (hg_ptr/hg_grp);
    tokens selecting the same set share a combination, numbered per head (cb_of[h*V + c]; global id
    cb_ptr[h] + local), represented by one of its tokens (cb_rep). Reader slots: per head, one per
    head_out reading it (kind 0), one per neuron attending to it (kind 1) and one per weighted set
    neurons attend to through it (kind 2, id: the reader, compiled wr_*); re_* lists, per (head, source
    token), the slots it feeds and the weight (1 for a head_out, the attend weight, the set weight)."""
    cb_of = np.zeros(H * V, dtype=np.int64)
    cb_ptr = np.zeros(H + 1, dtype=np.int64)
    reps = []
    for h in range(H):
        lo, hi = a.hg_ptr[h * V], a.hg_ptr[(h + 1) * V]
        grp = a.hg_grp[lo:hi]
        if len(grp) == 0:  # no score entries: one combination (score 0 for every source)
            reps.append(np.zeros(1, dtype=np.int64))
            cb_ptr[h + 1] = cb_ptr[h] + 1
            continue
        ug, gi = np.unique(grp, return_inverse=True)
        member = np.zeros((V, len(ug)), dtype=np.bool_)
        toks = np.repeat(np.arange(V), np.diff(a.hg_ptr[h * V:(h + 1) * V + 1]))
        member[toks, gi] = True
        _, first, inv = np.unique(np.packbits(member, axis=1), axis=0, return_index=True, return_inverse=True)
        cb_of[h * V:(h + 1) * V] = inv.ravel()
        reps.append(first.astype(np.int64))
        cb_ptr[h + 1] = cb_ptr[h] + len(first)
    cb_rep = np.concatenate(reps) if reps else np.zeros(0, np.int64)
    # head_outs with now = @all are routed through kernels.build_uncond's merged outputs, not slots

    ho_head = np.asarray(a.ho_head, dtype=np.int64)
    has_next = np.diff(a.ho_ptr) > 0  # copy-only head_outs need no reader slot
    na_keys = np.repeat(np.arange(H * V, dtype=np.int64), np.diff(a.na_ptr))
    na_head = na_keys // V if V else na_keys
    sl_ptr = np.zeros(H + 1, dtype=np.int64)
    sl_kind, sl_id = [], []
    ho_slot = np.zeros(len(ho_head), dtype=np.int64)
    wr_slot = np.zeros(len(a.wr_head), dtype=np.int64)
    na_neu = np.asarray(a.na_neu, dtype=np.int64)
    n_nr = len(a.nr_rule)
    neu_slot = np.full(H * n_nr, -1, dtype=np.int64)  # (head, neuron) -> slot
    for h in range(H):
        hos = np.flatnonzero((ho_head == h) & ~ho_uncond & has_next)
        ho_slot[hos] = np.arange(len(hos))
        neus = np.unique(na_neu[na_head == h])
        neu_slot[h * n_nr + neus] = len(hos) + np.arange(len(neus))
        wrs = np.flatnonzero(a.wr_head == h)
        wr_slot[wrs] = len(hos) + len(neus) + np.arange(len(wrs))
        sl_kind += [0] * len(hos) + [1] * len(neus) + [2] * len(wrs)
        sl_id += list(hos) + list(neus) + list(wrs)
        sl_ptr[h + 1] = sl_ptr[h] + len(hos) + len(neus) + len(wrs)
    hos_keys = np.repeat(np.arange(H * V, dtype=np.int64), np.diff(a.hos_ptr))
    hos_id = np.asarray(a.hos_id, dtype=np.int64)
    cond = ~ho_uncond[hos_id]
    hos_keys, hos_id = hos_keys[cond], hos_id[cond]
    n_mem = np.diff(a.ws_ptr)[a.wr_set]  # a weighted-set reader is fed by every member of its set
    mem = np.concatenate([np.arange(a.ws_ptr[j], a.ws_ptr[j + 1]) for j in a.wr_set]) if len(n_mem) else np.zeros(0, np.int64)
    keys = np.concatenate([hos_keys, na_keys, np.repeat(a.wr_head * V, n_mem) + a.ws_tok[mem]])
    slots = np.concatenate([ho_slot[hos_id],
                            neu_slot[na_head * n_nr + na_neu],
                            np.repeat(wr_slot, n_mem)])
    ws = np.concatenate([np.ones(len(hos_keys)), np.asarray(a.na_w, dtype=np.float64), a.ws_w[mem]])
    order = np.argsort(keys, kind="stable")
    re_ptr = np.zeros(H * V + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=H * V), out=re_ptr[1:])
    return AttentionArrays(cb_of=cb_of, cb_ptr=cb_ptr, cb_rep=cb_rep, sl_ptr=sl_ptr,
                           sl_kind=np.array(sl_kind, dtype=np.int64), sl_id=np.array(sl_id, dtype=np.int64),
                           re_ptr=re_ptr, re_slot=np.ascontiguousarray(slots[order]),
                           re_w=np.ascontiguousarray(ws[order]))


class HandModel:
    def __init__(self, rules: CompiledRules):
        self.rules = rules
        a = rules.arrays
        V = rules.vocab_size
        H = rules.n_heads
        used = np.zeros(H, dtype=np.bool_)
        used[a.ho_head] = True
        self._neuron_heads: list[set[int]] = [set() for _ in range(len(a.nr_rule))]  # heads each neuron attends to
        na_head = np.repeat(np.arange(H, dtype=np.int64), np.diff(a.na_ptr[::V]))
        n_nr = max(len(a.nr_rule), 1)
        pairs = np.unique(np.concatenate([na_head, np.repeat(a.wr_head, np.diff(a.wrn_ptr))]).astype(np.int64) * n_nr
                          + np.concatenate([a.na_neu, a.wrn_neu]).astype(np.int64))  # (head, neuron) as one key
        for h, n in zip((pairs // n_nr).tolist(), (pairs % n_nr).tolist()):
            used[h] = True  # heads nobody reads need no attention computed
            self._neuron_heads[n].add(h)
        self._base_rules = np.array([k in ("prior", "bigram") for k in rules.rule_kinds], dtype=np.bool_)
        self._blk_digests = None  # per prior/bigram block, of its content (_row_digests), on the first pass
        self._row_digs: dict[bytes, list[bytes]] = {}  # base-mask key -> per token, its base row's digest
        # head_outs with now = @all are merged per (head, source token) for each mask (kernels.build_uncond),
        # their `copy` outputs included; copy outputs of head_outs with a `now` condition: kernels.run_seqs
        self._ho_uncond = np.asarray(a.ho_now, dtype=np.int64) == rules.sets.ALL
        self._ref_held = None  # _ref_stats of the last unnamed reference rows
        self._uo_cache = None
        self._explainer = None
        self.before_first_pass = None  # called (then dropped) before the first engine pass: verify's compile notice
        self._attention = None  # _attention_arrays, built on the first pass (a cached ledger never needs them)
        self._n_atoms = len(a.am_ptr) - 1
        # a position touching at least this many tokens finishes log Z and the argmax with one pass over the
        # vocabulary instead of per touched token (kernels._dense_finish); tests set 0 / V + 1 to force a path
        self.dense_min = max(1, V // DENSE_SHARE)
        self._P = RuleArrays.of(a, V, used)

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

    def _run(self, seqs, mask, ref=None, want_logp=False, row=None, n_rows=1, at=None, ref_rows=None,
             ref_key=None, stats_store=None, gate: "NeuronGate | None" = None):
        """One pass; `row` (per rule: first of the n_rows ledger rows it is on in, -1 = off; rows share the
        base) computes several rows at once (metrics arrays [n_rows, N]); else `mask`: one row (arrays [N]).
        `at` (bool [N], N the positions of `seqs`): only those positions are finished, `ref` holds their rows
        only and every output has one entry per such position (kernels.run_seqs, `fin`). `ref_rows` (int, one per
        output position): `ref` is a larger array (a memory-mapped cache) and output position k reads its row
        ref_rows[k], read in place instead of gathered. `ref_key`: a name for ref's content, `stats_store`: where its
        statistics are kept between processes (_ref_stats). `gate`: stream_metrics_rows'."""
        rules = self.rules
        V = rules.vocab_size
        if self.before_first_pass is not None:
            hook, self.before_first_pass = self.before_first_pass, None
            hook()
        if row is None:
            m = rules.mask_of(mask)
            row = np.where(m, 0, -1).astype(np.int64)
        else:
            m = row >= 0
        R = n_rows
        tok, ptr = self._tokens(seqs)
        fin = np.zeros(0, np.int64)
        tok_out = tok
        if at is not None:
            at = np.asarray(at, np.bool_)
            if at.shape != tok.shape:
                raise UserError(f"`at` has shape {at.shape}, expected ({len(tok)},): one flag per position of the "
                                "concatenated sequences")
            fin = np.full(len(tok), -1, np.int64)
            fin[at] = np.arange(int(at.sum()))
            tok_out = tok[at]  # base rows and reference statistics only where positions finish
        N = len(tok_out)
        pool, slot, rows_key = self._base(np.unique(tok_out), m)
        global _LUT
        if _LUT is None:
            _LUT = _float16_tables()
        ref16 = np.zeros((0, V), np.uint16)
        ref32 = np.zeros((0, V), np.float32)
        use16 = False
        rows = np.zeros(0, np.int64)
        if ref is not None:
            ref = np.asarray(ref)
            if ref_rows is not None:
                rows = np.ascontiguousarray(ref_rows, dtype=np.int64)
                if rows.shape != (N,):
                    raise UserError(f"ref_rows has shape {rows.shape}, expected ({N},): one reference row per "
                                    "position finished")
                if ref.ndim != 2 or ref.shape[1] != V or (N and (rows.min() < 0 or rows.max() >= len(ref))):
                    raise UserError(f"ref_rows must index rows of ref_logp (shape {ref.shape}); reference rows have "
                                    f"{V} entries")
            elif ref.ndim != 2 or ref.shape != (N, V):
                raise UserError(f"ref_logp has shape {ref.shape}, expected ({N}, {V}): one row of reference "
                                "log-probs per position of the concatenated sequences (per position of `at`)")
            if ref.dtype == np.float16:
                ref16 = np.ascontiguousarray(ref).view(np.uint16)
                use16 = True
            else:
                ref32 = np.ascontiguousarray(ref, dtype=np.float32)
        out_logp = np.empty((N, V) if want_logp else (0, V), dtype=np.float32)
        kl = np.zeros((R, N))
        ce = np.empty((R, N))
        agree = np.zeros((R, N), dtype=np.bool_)
        hand_lse = np.empty((R, N))
        argmax = np.empty((R, N), dtype=np.int64)
        dense = np.zeros(N, dtype=np.int8)
        if ref is not None:
            S, A, arg, Bd, Rm = self._ref_stats(ref, ref16, ref32, use16, rows, tok_out, pool, slot, rows_key, ref_key,
                                                stats_store if at is None else None)  # whole passes only
        else:
            S, A, arg, Bd, Rm = np.ones(0), np.ones(0), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, self._n_atoms))
        gate_n, gate_m, old_dense = np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int8)
        kept = np.zeros(N, np.bool_)
        if gate is not None:
            gate_n, gate_m, old_dense = self._gate_arrays(gate, at, want_logp, N)
        args = (tok, ptr, slot, pool.base, pool.prob, pool.lse, pool.pat, pool.top, row, np.int64(R),
                self._P, self._attention_state(), self._uncond(row), ref16, ref32, use16, _LUT[0], S, A, arg, Bd, Rm,
                rows, want_logp, out_logp, kl, ce, agree, hand_lse, argmax, dense, np.int64(self.dense_min), fin,
                gate_n, gate_m, old_dense, kept)
        _run_chunks(ptr, args, fin)
        if kept.any():  # nothing computed there: the caller takes the old row's values (stream_metrics_rows)
            ce[:, kept] = np.nan
            hand_lse[:, kept] = np.nan
            argmax[:, kept] = -1
        # dense: per position, how it stored its outputs (kernels.run_seqs' out_dense): the same in every row
        out = {"kl": kl, "ce": ce, "agree": agree, "hand_lse": hand_lse, "hand_argmax": argmax,
               "dense": np.broadcast_to(dense, (R, N)), "kept": np.broadcast_to(kept, (R, N))}
        return ptr, out_logp, out if n_rows > 1 else {k: v[0] for k, v in out.items()}

    def _gate_arrays(self, gate: "NeuronGate", at, want_logp: bool, N: int):
        """run_seqs' gate_n (neuron indices), gate_m (bounds) and old_dense from a NeuronGate, checked."""
        if at is not None or want_logp:
            raise UserError("a neuron gate needs a pass over every position of the KL path (no `at`, no log-probs)")
        nr_rule = np.asarray(self.rules.arrays.nr_rule)
        where = {int(r): n for n, r in enumerate(nr_rule)}
        if any(int(r) not in where for r in gate.rules):
            raise UserError("a neuron gate names rules that are not neurons of this ruleset")
        old = np.ascontiguousarray(gate.old_dense, dtype=np.int8)
        margin = np.ascontiguousarray(gate.margins, dtype=np.float64)
        if old.shape != (N,) or margin.shape != (len(gate.rules),) or not np.all(margin >= 0):
            raise UserError(f"a neuron gate needs one old storage flag per position ({N}) and one margin >= 0 per rule")
        return np.array([where[int(r)] for r in gate.rules], np.int64), margin, old

    def _attention_state(self) -> AttentionArrays:
        if self._attention is None:
            self._attention = _attention_arrays(self.rules.arrays, self.rules.vocab_size, self.rules.n_heads,
                                                self._ho_uncond)
        return self._attention

    def _uncond(self, row: np.ndarray) -> UncondOutputs:
        a = self.rules.arrays
        key = row[a.ho_rule].tobytes()  # copy rules are head_outs too
        if self._uo_cache is None or self._uo_cache[0] != key:
            ptr, tok, w, cap = _kernels().build_uncond(np.int64(self.rules.n_heads), np.int64(self.rules.vocab_size),
                                                       row, a.ho_rule, a.ho_ptr, a.ho_tok, a.ho_w, a.hos_ptr, a.hos_id,
                                                       self._ho_uncond, a.cp_rule, a.cp_w, a.cps_ptr, a.cps_id)
            self._uo_cache = (key, UncondOutputs(uo_ptr=ptr, uo_tok=tok, uo_w=w, ucap=cap))
        return self._uo_cache[1]

    def _base_key(self, mask: np.ndarray) -> bytes:
        return mask[self._base_rules].tobytes()

    def _row_digests(self, mask: np.ndarray) -> list[bytes]:
        """Per token, a digest of what build_base makes its base row from: the vocabulary size and atoms, the
        switched-on global (prior) blocks and the token's switched-on bigram blocks, each by its content, in the
        order they are summed. Equal digests mean equal rows, whichever token or HandModel asks (the token itself
        is not in it: tokens without bigram rows share one). Kept per prior/bigram mask."""
        key = self._base_key(mask)
        got = self._row_digs.get(key)
        if got is not None:
            return got
        a = self.rules.arrays
        V = self.rules.vocab_size
        sha = hashlib.sha1
        if self._blk_digests is None:
            p, bt, bw = a.blk_ptr, np.ascontiguousarray(a.blk_tok, np.int64), np.ascontiguousarray(a.blk_w, np.float64)
            self._blk_digests = [sha(bt[p[k]:p[k + 1]].tobytes() + bw[p[k]:p[k + 1]].tobytes()).digest()
                                 for k in range(len(p) - 1)]
        d = self._blk_digests
        on = mask[a.blk_rule]
        head = sha(np.array([V, self._n_atoms], np.int64).tobytes()
                   + np.ascontiguousarray(a.atom_of, np.int64).tobytes()
                   + b"".join(d[k] for k in a.glob_blk if on[k])).digest()
        nb_ptr, nb_blk = a.nb_ptr, a.nb_blk
        got = [sha(head + b"".join(d[k] for k in nb_blk[nb_ptr[c]:nb_ptr[c + 1]] if on[k])).digest() for c in range(V)]
        if len(self._row_digs) >= 8:
            self._row_digs.clear()
        self._row_digs[key] = got
        return got

    def _base(self, uniq: np.ndarray, mask: np.ndarray) -> tuple["_BasePool", np.ndarray, bytes]:
        """Base rows (prior + bigram rules for one current token) for the tokens `uniq`, the map token -> row (-1
        elsewhere) and a key of those rows' contents (the digests of uniq's rows, in order). A row depends only on
        the blocks that build it (_row_digests), so rows are kept across calls and across the HandModels of the
        process (_POOLS: ablating or editing a head, neuron, skip or head_out reuses all of them, editing a bigram
        row rebuilds that row's tokens only) and only rows never built before are built."""
        V = self.rules.vocab_size
        digs = self._row_digests(mask)
        pool = _POOLS.get((V, self._n_atoms))
        if pool is None:
            pool = _POOLS[(V, self._n_atoms)] = _BasePool(V, self._n_atoms)
        want = [digs[c] for c in uniq.tolist()]
        every = {}  # each digest -> the first token that needs it
        for c, g in zip(uniq.tolist(), want):
            every.setdefault(g, c)
        first = {g: c for g, c in every.items() if g not in pool.index}  # not built yet
        if first:
            row_bytes = 12 * V + pool.n_atoms * (8 + 4 * pool.ka)
            if pool.n + len(first) > max(_POOL_BYTES // max(row_bytes, 1), len(uniq)):
                pool.reset()  # over the memory budget: keep only this call's rows
                first = every
            need = np.array(list(first.values()), dtype=np.int64)
            a = self.rules.arrays
            rows = pool.rows_for(list(first))  # base, prob, lse, pat, top
            _on_rows(_kernels().build_base, len(need), need, V, mask, a.blk_rule, a.blk_ptr, a.blk_tok, a.blk_w,
                     a.glob_blk, a.nb_ptr, a.nb_blk, a.atom_of, np.int64(pool.n_atoms), np.int64(pool.ka), *rows)
        slot = np.full(V, -1, dtype=np.int64)
        slot[uniq] = [pool.index[g] for g in want]
        return pool, slot, hashlib.sha1(b"".join(want)).digest()

    def _ref_stats(self, ref, ref16, ref32, use16, rows, tok, pool, slot, rows_key, ref_key=None, store=None):
        """sum p, sum p log p and argmax of each reference row: independent of the rules, so kept for the same
        array and the same rows of it (`rows`: kernels.run_seqs' ref_row). The array is identified by `ref_key`
        when the caller names its content (then the statistics serve every HandModel of the process: a new one
        per edit under `verify --watch`), else by buffer address, shape, dtype and a sample of its bytes (then
        only this HandModel's later calls). With them, p_ref mass per atom, kept for the same atoms, and p . base
        row per position, for the same tokens and base rows (rows_key: _base's).

        `store` (with a ref_key; None for a pass at some positions): the caller's StatsStore. A pass over the whole
        reference (no `rows`) then reads each of the three from it when it holds them under their name, and saves
        what it computed there, so a new process does not compute them again (each is a pass over the reference:
        ~0.6 s together for valid.txt's 663 MB)."""
        rkey = hashlib.sha1(rows.tobytes()).digest()
        if ref_key is not None:
            key = ("named", ref_key, ref.shape, ref.dtype.str, rkey)
            held = _REF_STATS.pop(key, None)
        else:
            sample = ref[:: max(1, len(ref) // 16)].tobytes() if len(ref) else b""
            key = (ref.__array_interface__["data"][0], ref.shape, ref.dtype.str, ref.strides, hash(sample), rkey)
            held = self._ref_held if self._ref_held is not None and self._ref_held[0] == key else None
        kernels = _kernels()
        N = len(rows) if len(rows) else len(ref)
        store = store if ref_key is not None and not len(rows) else None  # whole-reference passes only
        name = _store_name(ref_key, ref.shape, ref.dtype.str)
        if held is None:
            def stats():
                got = {"S": np.empty(N), "A": np.empty(N), "arg": np.empty(N, np.int64)}
                _on_rows(kernels.ref_stats, N, ref16, ref32, use16, _LUT[0], _LUT[1], rows,
                         got["S"], got["A"], got["arg"])
                return got

            got = _stored(store, "ref-" + name, {"S": ((N,), "f8"), "A": ((N,), "f8"), "arg": ((N,), "i8")}, stats)
            held = (key, (got["S"], got["A"], got["arg"]), {}, {})
        if ref_key is not None:
            while len(_REF_STATS) >= _REF_HELD:
                _REF_STATS.pop(next(iter(_REF_STATS)))
            _REF_STATS[key] = held
        else:
            self._ref_held = held
        _, (S, A, arg), masses, dots = held
        a = self.rules.arrays
        akey = hashlib.sha1(np.ascontiguousarray(a.atom_of).tobytes()).digest() if len(a.ncl_cls) else b""
        R = masses.get(akey)
        if R is None:
            masses.clear()

            def atom_mass():
                got = np.zeros((N, self._n_atoms))
                if akey:  # else no atom is ever touched: the mass is never read
                    _on_rows(kernels.ref_atom_mass, N, ref16, ref32, use16, _LUT[0], a.atom_of, rows, got)
                return {"R": got}

            R = _stored(store if akey else None, "atoms-" + _store_name(name, akey),
                        {"R": ((N, self._n_atoms), "f8")}, atom_mass)["R"]
            masses[akey] = R
        dkey = (rows_key, tok.tobytes())
        B = dots.get(dkey)
        if B is None:
            dots.clear()

            def base_dot():
                got = np.empty(len(tok))
                _on_rows(kernels.base_dot, len(tok), tok, slot, pool.base, ref16, ref32, use16, _LUT[0], rows, got)
                return {"B": got}

            B = _stored(store, "base-" + _store_name(name, rows_key, hashlib.sha1(tok.tobytes()).digest()),
                        {"B": ((len(tok),), "f8")}, base_dot)["B"]
            dots[dkey] = B
        return S, A, arg, B, R

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
        logits; hand_argmax: the hand model's top token; dense: how the engine stored each position's outputs
        (kernels.run_seqs' out_dense, for verify/ledger/incremental.py). Hand log-probs are never materialised.
        """
        _, _, out = self._run(list(seqs), mask, ref=ref_logp)
        self._check_finite(out["kl"], ref_logp)
        return out

    def row_passes(self, masks: list) -> list[tuple[list[int], np.ndarray | None]]:
        """How stream_metrics_rows computes nested masks: (indices of the masks, per-rule first row) per
        fused pass, or ([k], None) for a mask run alone. Masks fuse when consecutive, nested, with the same
        prior/bigram rules, and when switching on the later ones' rules cannot change the earlier ones'
        contributions: a head_out or copy rule counts from its head's row on (no output before); a neuron
        attending to a head that only switches on in a later row does not fuse (its activation would
        differ between the rows)."""
        a = self.rules.arrays
        ms = [self.rules.mask_of(m) for m in masks]
        runs: list[list[int]] = []
        for k, m in enumerate(ms):
            prev = ms[k - 1] if k else None
            if (runs and len(runs[-1]) < MAX_FUSED_ROWS and (prev & ~m).sum() == 0
                    and self._base_key(prev) == self._base_key(m)):
                runs[-1].append(k)
            else:
                runs.append([k])
        out = []
        for run in runs:
            if len(run) == 1:
                out.append((run, None))
                continue
            row = np.full(len(ms[0]), -1, dtype=np.int64)
            for j, k in reversed(list(enumerate(run))):
                row[ms[k]] = j
            for rules_, heads in ((a.ho_rule, a.ho_head), (a.cp_rule, a.cp_head)):
                hr = row[a.head_rule[heads]]
                on = (row[rules_] >= 0) & (hr >= 0)
                row[rules_[on]] = np.maximum(row[rules_[on]], hr[on])
            ok = all(row[a.nr_rule[n]] < 0 or row[a.head_rule[h]] <= row[a.nr_rule[n]]
                     for n, hs in enumerate(self._neuron_heads) for h in hs)
            out.extend([(run, row)] if ok else [([k], None) for k in run])
        return out

    def stream_metrics_rows(self, seqs: list[np.ndarray], ref_logp: np.ndarray, masks: list, at=None,
                            ref_rows=None, ref_key=None, stats_store=None, gate: "NeuronGate | None" = None) -> list[dict]:
        """stream_metrics under each of several masks (the ledger's rows), in as few engine passes as
        row_passes allows: a fused pass computes the attention and neurons once for all its rows.

        `at` (bool, one per position of the concatenated sequences): the metrics at those positions only, each
        exactly what the same call without `at` gives there; `ref_logp` then holds the reference rows of those
        positions only, unless `ref_rows` (int, one per position in `at`) says which row of ref_logp each reads: a
        large memory-mapped cache is then read in place, not gathered. The other positions cost the attention's
        running sums (and, before a position in `at`, its heads and neurons), not their distributions: a prefix
        that leads up to a few positions is cheap.

        `ref_key` (hashable, optional): a name the caller gives to ref_logp's content (verify: its reference cache's
        content key). The reference rows' statistics are then kept for every HandModel of the process, not only
        this one: a caller that passes the same name for different contents gets wrong metrics. With it,
        `stats_store` (a StatsStore, optional) keeps a whole-reference pass's statistics between processes.

        `gate` (a NeuronGate, optional; every position, no `at`): after an edit of some neurons' numbers, the rows
        as they were (their ledger rows before the edit) stand wherever every edited neuron is certainly off both
        before and after it (kernels.run_seqs, "Gated positions"). Each row then has "kept" (bool per position):
        there it holds no metrics of its own (kl 0, ce and hand_lse NaN, hand_argmax -1, agree False) and "dense" is
        the old one; the caller takes the old row's values. A pass fusing rows whose old rows were stored
        differently (their `dense` differs) is not gated: all False."""
        seqs = list(seqs)
        out: list[dict | None] = [None] * len(masks)
        for run, row in self.row_passes(masks):
            g = None
            if gate is not None and all(np.array_equal(gate.old_dense[k], gate.old_dense[run[0]]) for k in run):
                g = gate._replace(old_dense=gate.old_dense[run[0]])  # one storage per position in a pass
            if row is None:
                _, _, m = self._run(seqs, masks[run[0]], ref=ref_logp, at=at, ref_rows=ref_rows, ref_key=ref_key,
                                    stats_store=stats_store, gate=g)
                self._check_finite(m["kl"], ref_logp, ref_rows)
                out[run[0]] = m
                continue
            _, _, m = self._run(seqs, None, ref=ref_logp, row=row, n_rows=len(run), at=at, ref_rows=ref_rows,
                                ref_key=ref_key, stats_store=stats_store, gate=g)
            self._check_finite(m["kl"], ref_logp, ref_rows)
            for j, k in enumerate(run):
                out[k] = {name: v[j] for name, v in m.items()}
        return out

    @staticmethod
    def _check_finite(kl: np.ndarray, ref_logp=None, ref_rows=None) -> None:
        bad = ~np.isfinite(kl)
        if bad.any():
            i = int(np.flatnonzero(bad.reshape(-1))[0]) % kl.shape[-1]
            q = i if ref_rows is None else int(ref_rows[i])
            r = None if ref_logp is None else np.asarray(ref_logp[q], np.float32)
            if r is not None and not (np.isnan(r).any() or np.isposinf(r).any() or np.isneginf(r).all()):
                raise UserError(f"the hand model's log-probs at eval position {i} are not finite (the reference's are): "
                                "a rule number too large for float32 sums? keep rule numbers small (|w| <= 1e6)")
            raise UserError(f"reference log-probs (ref_logp) row {i} have NaN, +inf or all -inf values; pass finite "
                            "log-probs (log_softmax output), or delete a damaged reference cache entry")

    def explain(self, seq: np.ndarray, pos: int, mask=None) -> list[tuple[str, str]]:
        """(rule id, what it did) for every rule that fired at position `pos` (explain_batch's records)."""
        seq = np.asarray(seq)
        if not 0 <= pos < len(seq):
            raise UserError(f"position {pos} is outside the sequence (length {len(seq)})")
        return [(self.rules.rule_ids[f.rule], f.desc) for f in self.explain_batch([seq[: pos + 1]], mask)[-1]]

    def explain_batch(self, seqs: list[np.ndarray], mask=None) -> list:
        """Per position of the concatenated sequences, the rules that acted there and by how much, in rule
        order (handmodel.explain: one probe pass of the engine plus the attention rows; equal to the twin's
        contributions, tests/test_handmodel_explain.py)."""
        from .explain import Explainer

        if self._explainer is None:
            self._explainer = Explainer(self.rules)
        seqs = [np.asarray(s) for s in seqs]
        self._tokens(seqs)  # token ids checked
        return self._explainer.explain(seqs, self.rules.mask_of(mask))
