"""The engine's arrays, one typed record per rule family: the contract between the compiler
(compiled.py: one builder per family), the engine (engine.py: the per-call records) and the numba
kernels (kernels.py and the phase modules), which read every field by name.

numba takes a NamedTuple of arrays as one argument (a heterogeneous tuple type), so a field added,
removed or reordered here changes every reader at once instead of a 64-entry tuple matched by position.

Conventions: V = vocabulary size, H = heads; "CSR by K" means `X_ptr[k]:X_ptr[k + 1]` slices the entries of
key k in the arrays after it. Keys written h*V + tok index per-head, per-token lists. A *sid* is a token id
(< V) or V + class index. Every rule-carrying entry keeps the rule's index (`rule`) so a per-rule row/mask
switches it off at run time without recompiling.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


# ---------------------------------------------------------------------------------------------
# Compiled from the rule files (compiled.build_arrays): depend only on the rules and the vocabulary

class BigramRows(NamedTuple):
    """prior and bigram rules as blocks of (token, weight) entries added to the base row of a current token."""
    rule: np.ndarray     # [n_blk] int64: the rule of each block
    ptr: np.ndarray      # [n_blk + 1] int64: CSR by block over tok, w
    tok: np.ndarray      # [n_ent] int32: next tokens
    w: np.ndarray        # [n_ent] float64
    glob: np.ndarray     # [n_glob] int64: blocks with now = @all (every base row)
    now_ptr: np.ndarray  # [V + 1] int64: CSR by current token over now_blk
    now_blk: np.ndarray  # [n] int64: blocks whose `now` holds that token


class Heads(NamedTuple):
    """Attention heads: positional scores and source-token score groups selected by the current token."""
    rule: np.ndarray         # [H] int64
    used: np.ndarray         # [H] bool: read by a head_out or a neuron (else its attention is never computed)
    pos_ptr: np.ndarray      # [H + 1] int64: CSR by head over pos_val (D = its position-table length)
    pos_val: np.ndarray      # [sum D] float64: score at distance d (0 = the current position)
    pos_default: np.ndarray  # [H] float64: score at distance >= D
    src_score: np.ndarray    # [n_grp, V] float64: per score group, the score of each source token
    grp_ptr: np.ndarray      # [H*V + 1] int64: CSR by (head, current token) over grp
    grp: np.ndarray          # [n] int64: the score groups that current token selects (they add up)


class HeadOuts(NamedTuple):
    """head_out rules: attention mass of a head on a source token in `src` x `next`, when now holds the token."""
    rule: np.ndarray     # [n_ho] int64
    head: np.ndarray     # [n_ho] int64
    now: np.ndarray      # [n_ho] int64 sid (V + class of @all: unconditional)
    ptr: np.ndarray      # [n_ho + 1] int64: CSR by head_out over tok, w (its `next`, expanded)
    tok: np.ndarray      # [n_ent] int32
    w: np.ndarray        # [n_ent] float64
    src_ptr: np.ndarray  # [H*V + 1] int64: CSR by (head, source token) over src_id (head_outs with a `next`)
    src_id: np.ndarray   # [n] int64: head_out ids


class Copies(NamedTuple):
    """head_out `copy = w`: w x attention on a source position goes to that position's own token."""
    rule: np.ndarray     # [n_cp] int64
    head: np.ndarray     # [n_cp] int64
    now: np.ndarray      # [n_cp] int64 sid
    src: np.ndarray      # [n_cp] int64 sid
    w: np.ndarray        # [n_cp] float64
    all_ptr: np.ndarray  # [H*V + 1] int64: CSR by (head, source token) over all_id: now = @all copies
    all_id: np.ndarray   # [n] int64 (merged into prekernels.build_uncond's per-source outputs)
    now_ptr: np.ndarray  # [H*V + 1] int64: CSR by (head, current token) over now_id: copies with a `now`
    now_id: np.ndarray   # [n] int64
    cond: np.ndarray     # [H] bool: the head has copies with a `now` condition


class Skips(NamedTuple):
    """skip rules (skip-trigrams): `next` when now holds the current token and src held an earlier one."""
    rule: np.ndarray     # [n_sk] int64
    ptr: np.ndarray      # [n_sk + 1] int64: CSR by skip over tok, w
    tok: np.ndarray      # [n_ent] int32
    w: np.ndarray        # [n_ent] float64
    now_ptr: np.ndarray  # [V + 1] int64: CSR by current token over now_id (candidates)
    now_id: np.ndarray   # [n] int64
    src_ptr: np.ndarray  # [V + 1] int64: CSR by earlier token over src_id (arming)
    src_id: np.ndarray   # [n] int64


class Neurons(NamedTuple):
    """neuron rules: act = max(0, inputs - threshold); outputs act x (token, class and weighted-set) weights."""
    rule: np.ndarray      # [n_nr] int64
    thr: np.ndarray       # [n_nr] float64: threshold
    always: np.ndarray    # [n] int64: neurons with threshold < 0 (fire with no input at all)
    ptr: np.ndarray       # [n_nr + 1] int64: CSR by neuron over tok, w (token outputs, expanded)
    tok: np.ndarray       # [n_ent] int32
    w: np.ndarray         # [n_ent] float64
    cls_ptr: np.ndarray   # [n_nr + 1] int64: CSR by neuron over cls, cls_w (class outputs, per class)
    cls: np.ndarray       # [n] int64: class index
    cls_w: np.ndarray     # [n] float64
    ws_ptr: np.ndarray    # [n_nr + 1] int64: CSR by neuron over ws, ws_w (weighted-set outputs)
    ws: np.ndarray        # [n] int64: weighted set (WeightedSets index)
    ws_w: np.ndarray      # [n] float64
    now_ptr: np.ndarray   # [V + 1] int64: CSR by current token over now_neu, now_w (input `now`)
    now_neu: np.ndarray   # [n] int64
    now_w: np.ndarray     # [n] float64 (set weight included)
    pres_neu: np.ndarray  # [n_pe] int64: per presence entry its neuron (input `present`)
    pres_w: np.ndarray    # [n_pe] float64
    pres_ptr: np.ndarray  # [V + 1] int64: CSR by earlier token over pres_ent
    pres_ent: np.ndarray  # [n] int64: presence entries
    att_ptr: np.ndarray   # [H*V + 1] int64: CSR by (head, source token) over att_neu, att_w (input `attend`)
    att_neu: np.ndarray   # [n] int64
    att_w: np.ndarray     # [n] float64


class WeightedSets(NamedTuple):
    """Weighted sets neurons write or attend to, each stored once; readers: one per (head, set) attended."""
    ptr: np.ndarray      # [n_ws + 1] int64: CSR by set over tok, w
    tok: np.ndarray      # [n_ent] int32
    w: np.ndarray        # [n_ent] float64: the set weight of each member
    rd_head: np.ndarray  # [n_wr] int64: reader (head, set) pairs
    rd_set: np.ndarray   # [n_wr] int64
    rd_ptr: np.ndarray   # [n_wr + 1] int64: CSR by reader over rd_neu, rd_w (the neurons reading it)
    rd_neu: np.ndarray   # [n] int64
    rd_w: np.ndarray     # [n] float64: the neuron's attend weight


class Atoms(NamedTuple):
    """Classes and atoms: tokens grouped by which of the neurons' output classes hold them (compiled._atoms)."""
    class_member: np.ndarray  # [n_cls, V] bool: membership of every class (sid V + k)
    atom_of: np.ndarray       # [V] int64
    ca_ptr: np.ndarray        # [n_cls + 1] int64: CSR by class over ca_atom (unused classes: empty)
    ca_atom: np.ndarray       # [n] int64
    am_ptr: np.ndarray        # [n_atoms + 1] int64: CSR by atom over am_tok
    am_tok: np.ndarray        # [V] int64: members, ascending within each atom


class RuleArrays(NamedTuple):
    """Everything the compiler hands the engine: one record per family."""
    bigrams: BigramRows
    heads: Heads
    head_outs: HeadOuts
    copies: Copies
    skips: Skips
    neurons: Neurons
    wsets: WeightedSets
    atoms: Atoms

    def nbytes(self) -> int:
        """Bytes of every array of every family."""
        return int(sum(x.nbytes for fam in self for x in fam if isinstance(x, np.ndarray)))


# ---------------------------------------------------------------------------------------------
# Built by the engine (engine.py): per ruleset, per mask, per call

class Readers(NamedTuple):
    """Incremental attention (engine._attention_arrays): score combinations and reader slots per head."""
    cb_of: np.ndarray    # [H*V] int64: per (head, current token) its score combination (local to the head)
    cb_ptr: np.ndarray   # [H + 1] int64: global combination id = cb_ptr[h] + local
    cb_rep: np.ndarray   # [n_cb] int64: a current token selecting each combination
    sl_ptr: np.ndarray   # [H + 1] int64: CSR by head over sl_kind, sl_id (reader slots)
    sl_kind: np.ndarray  # [n_sl] int64: 0 head_out, 1 neuron attending, 2 weighted-set reader
    sl_id: np.ndarray    # [n_sl] int64: head_out / neuron / reader id
    re_ptr: np.ndarray   # [H*V + 1] int64: CSR by (head, source token) over re_slot, re_w
    re_slot: np.ndarray  # [n] int64: slot local to the head
    re_w: np.ndarray     # [n] float64: 1 (head_out), the attend weight, the set weight


class MergedOuts(NamedTuple):
    """Per (head, source token) the merged outputs of the now = @all head_outs and copies switched on
    (prekernels.build_uncond, per ledger-row assignment); keys row x V + token."""
    ptr: np.ndarray  # [H*V + 1] int64: CSR by (head, source token) over key, w
    key: np.ndarray  # [n] int64
    w: np.ndarray    # [n] float64
    cap: np.ndarray  # [H] int64: distinct keys per head


class BaseRows(NamedTuple):
    """Dense base rows (prior + bigram rows) of the current tokens of this call (engine._BasePool)."""
    slot: np.ndarray       # [V] int64: current token -> row (-1: not built)
    logit: np.ndarray      # [U, V] float32
    prob: np.ndarray       # [U, V] float64
    lse: np.ndarray        # [U] float64: log-sum-exp of the row
    atom_mass: np.ndarray  # [U, n_atoms] float64: probability mass per atom
    atom_top: np.ndarray   # [U, n_atoms, KA] int32: per atom its KA largest members (-1 pads)


class RefRows(NamedTuple):
    """The reference's log-probs at every position and what is precomputed from them (KL path)."""
    p16: np.ndarray        # [N, V] uint16: float16 log-probs as bits (use16), else [0, V]
    p32: np.ndarray        # [N, V] float32 log-probs (not use16), else [0, V]
    use16: bool
    lut_p: np.ndarray      # [65536] float64: exp of every float16
    S: np.ndarray          # [N] float64: sum p_ref
    A: np.ndarray          # [N] float64: sum p_ref log p_ref
    arg: np.ndarray        # [N] int64: argmax p_ref
    B: np.ndarray          # [N] float64: p_ref . base row
    atom_mass: np.ndarray  # [N, n_atoms] float64: p_ref mass per atom


class Outputs(NamedTuple):
    """What a pass writes, per ledger row r and position i."""
    want_logp: bool      # full log-prob rows (logp) instead of KL against RefRows
    logp: np.ndarray     # [N, V] float32 (want_logp; R = 1), else [0, V]
    kl: np.ndarray       # [R, N] float64
    ce: np.ndarray       # [R, N] float64: NaN at a sequence's last position
    agree: np.ndarray    # [R, N] bool: hand argmax == reference argmax
    lse: np.ndarray      # [R, N] float64: hand log Z
    argmax: np.ndarray   # [R, N] int64


class Pass(NamedTuple):
    """One engine pass: the tokens and which ledger rows each rule is on in."""
    tok: np.ndarray      # [N] int64: the concatenated sequences
    seq_ptr: np.ndarray  # [n_seq + 1] int64
    row: np.ndarray      # [n_rules] int64: first ledger row the rule is on in (-1: off)
    R: int               # ledger rows
    V: int
    dense_min: int       # a position touching this many tokens finishes densely (kernels._dense_finish)
