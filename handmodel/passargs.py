"""The arrays an engine pass reads, by name.

`kernels.run_seqs` takes the compiled rules (`RuleArrays`), the attention's routing tables (`AttentionArrays`)
and the per-source-token outputs of unconditional head_outs (`UncondOutputs`). numba sees a NamedTuple as a
tuple, so the kernel unpacks each one positionally. These classes fix the order once:
- the engine builds them by keyword;
- tests/test_handmodel_engine.py checks that the kernel unpacks the same field names in the same order.
A field added, removed or moved in one place fails there instead of silently shifting every array after it.

CSR layout throughout: `x_ptr[k] .. x_ptr[k + 1]` indexes the entries of item k. A set id (`sid`) below V is one
token. From V on, it is a class: row `sid - V` of `class_member`. No numba import here: the engine builds
these before its first pass imports the kernels.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class RuleArrays(NamedTuple):
    """compiled.build_arrays' arrays as run_seqs reads them (`*_rule`: the rule's index in ledger order)."""
    V: np.int64  # vocabulary size
    class_member: np.ndarray  # [n_classes, V] bool
    # [[head]]: position tables, per-source-token scores of each score group, and the groups a current token selects
    head_rule: np.ndarray
    head_used: np.ndarray  # [H] bool: some rule reads the head (its attention is computed)
    pos_ptr: np.ndarray
    pos_val: np.ndarray
    pos_default: np.ndarray
    src_by_tok: np.ndarray  # [V, n_groups]: source score of token x in score group g at [x, g]
    hg_ptr: np.ndarray  # per head x current token: its score groups (hg_grp)
    hg_grp: np.ndarray
    # [[head_out]] `next` tables, and per head x source token the head_outs reading it
    ho_rule: np.ndarray
    ho_now: np.ndarray  # sid
    ho_ptr: np.ndarray
    ho_tok: np.ndarray
    ho_w: np.ndarray
    hos_ptr: np.ndarray
    hos_id: np.ndarray
    # [[skip]]: tables, and per token the skips it can fire (now) or arm (earlier)
    sk_rule: np.ndarray
    sk_ptr: np.ndarray
    sk_tok: np.ndarray
    sk_w: np.ndarray
    skn_ptr: np.ndarray
    skn_id: np.ndarray
    ske_ptr: np.ndarray
    ske_id: np.ndarray
    # [[neuron]]: threshold, token outputs, class outputs (summed per atom: atom_of, ca_*, am_*)
    nr_rule: np.ndarray
    nr_thr: np.ndarray
    nr_always: np.ndarray  # neurons with a negative threshold: they fire with no input
    nr_ptr: np.ndarray
    nr_tok: np.ndarray
    nr_w: np.ndarray
    ncl_ptr: np.ndarray
    ncl_cls: np.ndarray
    ncl_w: np.ndarray
    atom_of: np.ndarray
    ca_ptr: np.ndarray
    ca_atom: np.ndarray
    am_ptr: np.ndarray
    am_tok: np.ndarray
    # neuron inputs: the current token (nn_*), presence of earlier tokens (npe_*, np_*), attention mass (na_*)
    nn_ptr: np.ndarray
    nn_neu: np.ndarray
    nn_w: np.ndarray
    npe_neu: np.ndarray
    npe_w: np.ndarray
    np_ptr: np.ndarray
    np_ent: np.ndarray
    na_ptr: np.ndarray
    na_neu: np.ndarray
    na_w: np.ndarray
    # head_out `copy` rules
    cp_rule: np.ndarray
    cp_src: np.ndarray
    cp_w: np.ndarray
    cp_cond: np.ndarray  # [H] bool: the head has copy rules with a `now` condition
    cpn_ptr: np.ndarray
    cpn_id: np.ndarray
    # weighted sets: the neurons writing each (nws_*), their members (ws_*), the neurons reading one through a head
    nws_ptr: np.ndarray
    nws_set: np.ndarray
    nws_w: np.ndarray
    ws_ptr: np.ndarray
    ws_tok: np.ndarray
    ws_w: np.ndarray
    wrn_ptr: np.ndarray
    wrn_neu: np.ndarray
    wrn_w: np.ndarray

    @classmethod
    def of(cls, arrays, V: int, head_used: np.ndarray) -> "RuleArrays":
        """From compiled.build_arrays' namespace, whose names the fields share."""
        return cls(V=np.int64(V), head_used=head_used,
                   **{f: getattr(arrays, f) for f in cls._fields if f not in ("V", "head_used")})


class AttentionArrays(NamedTuple):
    """engine._attention_arrays: score combinations and reader slots (head_outs, neurons, weighted sets)."""
    cb_of: np.ndarray  # per head x current token: its score combination
    cb_ptr: np.ndarray
    cb_rep: np.ndarray  # a token that selects each combination
    sl_ptr: np.ndarray  # per head: its reader slots
    sl_kind: np.ndarray  # 0 head_out, 1 neuron, 2 weighted set read by neurons
    sl_id: np.ndarray
    re_ptr: np.ndarray  # per head x source token: the slots it feeds, with weights
    re_slot: np.ndarray
    re_w: np.ndarray


class UncondOutputs(NamedTuple):
    """kernels.build_uncond: per head x source token, the merged outputs of its `now = @all` head_outs and copies."""
    uo_ptr: np.ndarray  # [H * V + 1]
    uo_tok: np.ndarray  # output keys: ledger row x V + token
    uo_w: np.ndarray
    ucap: np.ndarray  # [H]: distinct keys over all of the head's source tokens (its far-sum buffer's size)
