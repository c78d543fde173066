"""Engine == twin on random vocabularies, rule sets (written as TOML text), sequences and masks."""
from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import DOC_RULES, DOC_VOCAB
from handmodel import HandModel, engine, load_rules, twin
from handmodel.errors import UserError

SETTINGS = settings(deadline=None, derandomize=True, max_examples=60, suppress_health_check=list(HealthCheck))


def q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def tok_ref(tok: str) -> str:
    return "@" + tok if tok.startswith("@") else tok  # '@@x' spells the token '@x'


@st.composite
def rulesets(draw, shared=False):
    """(vocab, {file name: TOML text}) for a random, valid rule set. `shared`: mostly neurons, attending to
    and writing the same few weighted sets (the kernel's per-set paths)."""
    vocab = draw(st.lists(st.text(alphabet=" ab@\nZ", min_size=1, max_size=3), min_size=3, max_size=14, unique=True))
    V = len(vocab)
    num = st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 3))
    classes = []
    files: dict[str, list[str]] = {"10_classes.toml": [], "00_rules.toml": [], "20_more.toml": []}
    for k in range(draw(st.integers(0, 3))):
        members = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=V, unique=True))
        lines = [f'[[class]]\nid = "c{k}"\ndoc = "class {k}"', "tokens = [" + ", ".join(q(tok_ref(vocab[i])) for i in members) + "]"]
        if draw(st.booleans()):
            pat = "^" + re.escape(vocab[draw(st.integers(0, V - 1))][0])
            lines.append(f"pattern = {q(pat)}")
        if classes and draw(st.booleans()):
            lines[1] = lines[1][:-1] + ', "@' + draw(st.sampled_from(classes)) + '"]'
        outside = [i for i in range(V) if i not in members]
        if outside and draw(st.booleans()):
            lines.append(f"except = [{q(tok_ref(vocab[draw(st.sampled_from(outside))]))}]")
        classes.append(f"c{k}")
        files["10_classes.toml"].append("\n".join(lines))
    ref = st.one_of(st.integers(0, V - 1).map(lambda i: tok_ref(vocab[i])),
                    st.sampled_from(["@" + c for c in classes] + ["@all"]))

    def weights(max_size=3, min_size=1, value=True):
        """A { reference = number } table; `value`: a value table (next/now/attend/rows), where weighted sets may go."""
        d = draw(st.dictionaries(vref if value else ref, num, min_size=min_size, max_size=max_size))
        return "{ " + ", ".join(f"{q(k)} = {v}" for k, v in d.items()) + " }"

    wsets = []  # weighted sets, in any file (users may come before them)
    vref = ref
    for k in range(draw(st.integers(1 if shared else 0, 2))):
        files[draw(st.sampled_from(sorted(files)))].append(f'[[weights]]\nid = "w{k}"\ndoc = "weighted set {k}"\n'
                                                           f"tokens = {weights(max_size=4, value=False)}")
        wsets.append(f"@w{k}")
    if wsets:  # a value reference is a weighted set about 1 time in 3 (shared: 2 in 3)
        vref = st.one_of(ref, st.sampled_from(wsets), st.sampled_from(wsets)) if shared else st.one_of(ref, ref, st.sampled_from(wsets))

    rid = iter(range(1000))
    heads = []
    for h in range(draw(st.integers(1 if shared else 0, 2))):
        pos = draw(st.dictionaries(st.sampled_from(["0", "1", "2", "3", "default"]), num, max_size=4))
        scores = [f"{{ now = {q(draw(ref))}, src = {q(draw(ref))}, w = {draw(num)} }}" for _ in range(draw(st.integers(0, 3)))]
        text = f'[[head]]\nid = "h{h}"\ndoc = "head {h}"\nposition = {{ ' + ", ".join(f"{k} = {v}" for k, v in pos.items()) + " }"
        if scores or draw(st.booleans()):
            text += "\nscore = [" + ", ".join(scores) + "]"
        heads.append(f"h{h}")
        files["00_rules.toml"].append(text)
    kinds = ["prior", "bigram", "bigram_rows", "skip", "neuron"] + (["head_out"] if heads else [])
    if shared:
        kinds += ["neuron"] * 6
    for _ in range(draw(st.integers(3, 8) if shared else st.integers(0, 7))):
        kind = draw(st.sampled_from(kinds))
        i = next(rid)
        head = f'[[{kind.split("_rows")[0]}]]\nid = "r{i}"\ndoc = "rule {i}"\n'
        if kind == "prior":
            body = f"next = {weights()}"
        elif kind == "bigram":
            body = f"now = {q(draw(ref))}\nnext = {weights()}"
        elif kind == "bigram_rows":
            rows = draw(st.lists(ref, min_size=1, max_size=3, unique=True))
            body = "rows = { " + ", ".join(f"{q(r)} = {weights()}" for r in rows) + " }"
        elif kind == "skip":
            body = f"earlier = {q(draw(ref))}\n" + (f"now = {q(draw(ref))}\n" if draw(st.booleans()) else "") + f"next = {weights()}"
        elif kind == "head_out":
            out = draw(st.sampled_from(["next", "copy", "both"]))  # `copy = w`: the attended token itself
            body = f"head = {q(draw(st.sampled_from(heads)))}\nsrc = {q(draw(ref))}\n" + \
                (f"now = {q(draw(ref))}\n" if draw(st.booleans()) else "") + \
                (f"copy = {draw(num)}\n" if out != "next" else "") + (f"next = {weights()}" if out != "copy" else "")
        else:
            body = f"threshold = {draw(st.sampled_from([-0.5, 0.0, 0.7, 100.0]))}\n"  # 100: never fires
            if draw(st.booleans()):
                body += f"now = {weights()}\n"
            if draw(st.booleans()):
                body += f"present = {weights(value=False)}\n"
            if heads and (shared or draw(st.booleans())):
                body += "attend = { " + ", ".join(f"{h} = {weights()}" for h in draw(st.lists(st.sampled_from(heads), min_size=1, unique=True))) + " }\n"
            body += f"next = {weights()}"
        files[draw(st.sampled_from(["00_rules.toml", "20_more.toml"]))].append(head + body)
    return vocab, {k: "\n\n".join(v) + "\n" for k, v in files.items()}


def compile_text(vocab, files):
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            Path(d, name).write_text(text, encoding="utf-8")
        return load_rules(d, vocab)


@st.composite
def cases(draw, shared=False):
    vocab, files = draw(rulesets(shared))
    V = len(vocab)
    seqs = draw(st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=12), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    return vocab, files, [np.array(s, dtype=np.int32) for s in seqs], seed


def logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


# How a position finishes log Z and the argmax: per touched token, by one dense pass over the vocabulary
# (kernels._dense_finish), or the engine's own choice by the touched count. Every property below draws it.
FINISH = st.sampled_from(["engine's choice", "dense", "per touched token"])


def _model(rules, finish: str) -> HandModel:
    hm = HandModel(rules)
    if finish == "dense":
        hm.dense_min = 0
    elif finish == "per touched token":
        hm.dense_min = rules.vocab_size + 1  # positions writing a weighted set still finish densely
    return hm


@SETTINGS
@given(cases(), FINISH)
def test_engine_matches_twin(case, finish):
    _check_engine_matches_twin(case, finish)


@SETTINGS
@given(cases(shared=True), FINISH)
def test_neurons_sharing_weighted_sets_match_twin(case, finish):
    _check_engine_matches_twin(case, finish)


def _check_engine_matches_twin(case, finish):
    vocab, files, seqs, seed = case
    rules = compile_text(vocab, files)
    rng = np.random.default_rng(seed)
    n = len(rules.rule_ids)
    masks = [None, rng.random(n) < 0.6]
    hm = _model(rules, finish)
    for mask in masks:
        got = hm.log_probs_batch(seqs, mask)
        want = [twin.log_probs(rules, s, mask) for s in seqs]
        for g, w in zip(got, want):
            assert g.dtype == np.float32 and g.shape == w.shape
            assert np.isfinite(g).all()
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
            np.testing.assert_allclose(logsumexp(g.astype(np.float64)), 0.0, atol=1e-5)
        # metrics against a random reference (float32 and float16) and against itself
        N = sum(len(s) for s in seqs)
        z = rng.normal(0, 2, size=(N, len(vocab)))
        ref = (z - logsumexp(z)[:, None]).astype(np.float32)
        tw = twin.metrics(rules, seqs, ref, mask)
        for dtype in (np.float32, np.float16):
            r = ref.astype(dtype)
            m = hm.stream_metrics(seqs, r, mask)
            tw = twin.metrics(rules, seqs, r, mask)
            assert set(m) >= {"kl", "ce", "agree"}
            assert all(len(v) == N for v in m.values())
            assert (m["kl"] >= 0).all() and np.isfinite(m["kl"]).all()
            np.testing.assert_allclose(m["kl"], tw["kl"], atol=2e-5, rtol=1e-5)
            np.testing.assert_allclose(m["ce"], tw["ce"], atol=1e-5, rtol=0)
            last = np.cumsum([len(s) for s in seqs]) - 1
            assert np.isnan(m["ce"][last]).all() and np.isfinite(np.delete(m["ce"], last)).all()
            hand = np.concatenate(want)
            srt = np.sort(hand, axis=1)
            clear = (srt[:, -1] - srt[:, -2] > 1e-4) if len(vocab) > 1 else np.ones(N, bool)
            assert (m["agree"][clear] == tw["agree"][clear]).all()
        own = hm.stream_metrics(seqs, np.concatenate(got), mask)
        assert np.abs(own["kl"]).max() < 1e-5
        assert own["agree"][clear].all()


@settings(deadline=None, derandomize=True, max_examples=40, suppress_health_check=list(HealthCheck))
@given(cases())
def test_argmax_and_metrics_when_atom_top_lists_run_out(case):
    """The hand argmax reads each atom's top members (tokens in the same neuron output classes); with
    one-entry lists it must fall back to scanning the atom's members and still agree with the twin."""
    from unittest import mock

    from handmodel import kernels

    vocab, files, seqs, seed = case
    rules = compile_text(vocab, files)
    with mock.patch.object(kernels, "atom_top_k", lambda n_atoms: 1):
        hm = _model(rules, "per touched token")  # the atom top lists serve that path only
        mask = np.random.default_rng(seed).random(len(rules.rule_ids)) < 0.8
        for msk in (None, mask):
            want = [twin.log_probs(rules, s, msk) for s in seqs]
            hand = np.concatenate(want)
            m = hm.stream_metrics(seqs, hand.astype(np.float32), msk)  # the reference is the hand model itself
            srt = np.sort(hand, axis=1)
            clear = (srt[:, -1] - srt[:, -2] > 1e-4) if len(vocab) > 1 else np.ones(len(hand), bool)
            assert m["agree"][clear].all()
            np.testing.assert_array_equal(m["hand_argmax"][clear], hand.argmax(1)[clear])
            assert np.abs(m["kl"]).max() < 1e-5


def test_argmax_skips_a_touched_atom_top_member():
    """Neuron writes +1 to class c0 and -5 to its top member 'a': the best token is c0's second member
    'b', found by the atom top list, or by scanning c0 when the list holds one entry."""
    from unittest import mock

    from handmodel import kernels

    vocab = ["a", "b", "c", "d", "e", "f"]
    text = ('[[class]]\nid = "c0"\ndoc = "four"\ntokens = ["a", "b", "c", "d"]\n'
            '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "a" = 3.0, "b" = 2.0, "c" = 1.0 }\n'
            '[[neuron]]\nid = "n"\ndoc = "always on"\nthreshold = -0.5\nnext = { "@c0" = 2.0, "a" = -10.0 }\n')
    rules = compile_text(vocab, {"r.toml": text})
    seq = np.array([4, 5, 0], dtype=np.int32)
    want = np.array([-1.0, 3.0, 2.0, 1.0, 0.0, 0.0])
    want = want - logsumexp(want)
    for ka in (None, 1):
        with mock.patch.object(kernels, "atom_top_k", (lambda n: ka) if ka else kernels.atom_top_k):
            hm = _model(rules, "per touched token")  # the atom top lists serve that path only
            np.testing.assert_allclose(hm.log_probs(seq), np.tile(want, (3, 1)), atol=1e-6)
            m = hm.stream_metrics([seq], np.tile(want, (3, 1)).astype(np.float32))
            assert (m["hand_argmax"] == 1).all() and m["agree"].all() and np.abs(m["kl"]).max() < 1e-6


@SETTINGS
@given(cases(), st.integers(1, 4), FINISH)
def test_ledger_rows_in_one_pass_match_separate_runs(case, n_rows, finish):
    """stream_metrics_rows (rules switched on row by row, one engine pass where row_passes fuses them)
    == stream_metrics under each row's mask; rows are nested masks as in the ledger, with rules put in
    random rows (prior/bigram rules and most heads in the first, so that passes fuse) and heads after
    their readers."""
    _check_rows(case, n_rows, finish)


@SETTINGS
@given(cases(shared=True), st.integers(2, 4), FINISH)
def test_ledger_rows_with_shared_weighted_sets_match_separate_runs(case, n_rows, finish):
    _check_rows(case, n_rows, finish)


def _check_rows(case, n_rows, finish):
    vocab, files, seqs, seed = case
    rules = compile_text(vocab, files)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n_rows, len(rules.rule_ids))
    base = np.isin(np.asarray(rules.rule_kinds), ["prior", "bigram"])
    first[base & (rng.random(len(first)) < 0.8)] = 0
    first[(np.asarray(rules.rule_kinds) == "head") & (rng.random(len(first)) < 0.5)] = 0
    masks = [first <= k for k in range(n_rows)]
    hm = _model(rules, finish)
    N = sum(len(s) for s in seqs)
    z = rng.normal(0, 2, size=(N, len(vocab)))
    ref = (z - logsumexp(z)[:, None]).astype(np.float32)
    got = hm.stream_metrics_rows(seqs, ref, masks)
    passes = hm.row_passes(masks)
    assert sorted(k for run, _ in passes for k in run) == list(range(n_rows))
    if n_rows > 1 and not base[first > 0].any() and "attend" not in "".join(files.values()):
        assert len(passes) == 1 and passes[0][1] is not None  # nothing stops these rows from fusing
    for k, mask in enumerate(masks):
        want = hm.stream_metrics(seqs, ref, mask)
        np.testing.assert_allclose(got[k]["kl"], want["kl"], atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(got[k]["ce"], want["ce"], atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(got[k]["hand_lse"], want["hand_lse"], atol=1e-9, rtol=1e-9)
        hand = np.concatenate([twin.log_probs(rules, s, mask) for s in seqs])
        srt = np.sort(hand, axis=1)
        clear = (srt[:, -1] - srt[:, -2] > 1e-6) if len(vocab) > 1 else np.ones(N, bool)
        assert (got[k]["agree"][clear] == want["agree"][clear]).all()
        assert (got[k]["hand_argmax"][clear] == want["hand_argmax"][clear]).all()


@SETTINGS
@given(cases(), st.integers(1, 3), FINISH, st.floats(0.05, 0.6))
def test_metrics_at_chosen_positions_equal_the_full_pass_there(case, n_rows, finish, share):
    """stream_metrics_rows(..., at=positions) (verify/ledger/incremental.py's splices) == the same call without
    `at`, at those positions, bit for bit: whatever the rows, the finish, and the positions skipped before them
    (their attention sums, armed skips and presence inputs, and the write count that decides how the next
    position stores its outputs, all as in the full pass)."""
    vocab, files, seqs, seed = case
    rules = compile_text(vocab, files)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n_rows, len(rules.rule_ids))
    first[np.isin(np.asarray(rules.rule_kinds), ["prior", "bigram"])] = 0
    masks = [first <= k for k in range(n_rows)]
    N = sum(len(s) for s in seqs)
    z = rng.normal(0, 2, size=(N, len(vocab)))
    ref = (z - logsumexp(z)[:, None]).astype(np.float16)
    full = _model(rules, finish).stream_metrics_rows(seqs, ref, masks)
    at = rng.random(N) < share
    hm = _model(rules, finish)
    got = hm.stream_metrics_rows(seqs, ref[at], masks, at=at)
    for g, f in zip(got, full):
        for key in ("kl", "ce", "agree", "hand_lse", "hand_argmax", "dense"):
            assert np.array_equal(g[key], f[key][at], equal_nan=True), key
    again = hm.stream_metrics_rows(seqs, ref[at], masks, at=at)  # base rows and reference statistics cached
    assert all(np.array_equal(a["kl"], g["kl"]) for a, g in zip(again, got))
    # the same reference rows read in place out of a larger array, in another order (ref_rows): the same bits
    n_at = int(at.sum())
    big = (rng.normal(0, 1, size=(n_at + 5, len(vocab))) - np.log(len(vocab))).astype(np.float16)
    where = rng.permutation(n_at + 5)[:n_at]
    big[where] = ref[at]
    inplace = hm.stream_metrics_rows(seqs, big, masks, at=at, ref_rows=where)
    for g, f in zip(inplace, full):
        for key in ("kl", "ce", "agree", "hand_lse", "hand_argmax"):
            assert np.array_equal(g[key], f[key][at], equal_nan=True), key


@pytest.mark.parametrize("n_rows", [1, 2])
def test_metrics_at_chosen_positions_after_positions_that_write_much(n_rows):
    """The same bit for bit equality where it is delicate: neurons write about dense_min tokens per position, so
    whether a position stores its outputs densely (decided by the previous position's write count) flips along
    each sequence and changes the float64 rounding of its KL; a position finished after one that is not must
    still store its outputs as the full pass does."""
    rng = np.random.default_rng(7)
    V = 48
    vocab = [f"t{k}" for k in range(V)]

    def table(n):
        ks = rng.choice(V, n, replace=False)
        return "{ " + ", ".join(f'"t{k}" = {rng.normal():.6f}' for k in ks) + " }"

    text = '[[head]]\nid = "h"\ndoc = "d"\nposition = { 0 = 0.5, 1 = 1.0, default = -0.5 }\n'
    for n in range(10):
        text += (f'\n[[neuron]]\nid = "n{n}"\ndoc = "d"\nthreshold = 0.2\nnow = {table(14)}\n'
                 + (f'attend = {{ h = {table(8)} }}\n' if n % 3 == 0 else "") + f"next = {table(int(rng.integers(6, 16)))}\n")
    rules = compile_text(vocab, {"00_r.toml": text})
    seqs = [rng.integers(0, V, int(rng.integers(20, 80))).astype(np.int32) for _ in range(12)]
    N = sum(len(x) for x in seqs)
    z = rng.normal(0, 2, size=(N, V))
    ref = (z - logsumexp(z)[:, None]).astype(np.float16)
    first = np.arange(len(rules.rule_ids)) % n_rows
    first[np.asarray(rules.rule_kinds) == "head"] = 0
    masks = [first <= k for k in range(n_rows)]
    full = HandModel(rules).stream_metrics_rows(seqs, ref, masks)
    # how each position stored its outputs (bit 0) is what the write count before it said (bit 1 there), in
    # every row alike; both ways occur
    dense = full[0]["dense"]
    start = np.zeros(N, bool)
    start[np.cumsum([0] + [len(x) for x in seqs[:-1]])] = True
    assert not (dense[start] & 1).any() and np.array_equal(dense[1:][~start[1:]] & 1, (dense[:-1] >> 1 & 1)[~start[1:]])
    assert 0 < (dense & 1).sum() < N - len(seqs) and all(np.array_equal(f["dense"], dense) for f in full)
    for share in (0.1, 0.3):
        at = rng.random(N) < share
        got = HandModel(rules).stream_metrics_rows(seqs, ref[at], masks, at=at)
        for g, f in zip(got, full):
            for key in ("kl", "ce", "agree", "hand_lse", "hand_argmax", "dense"):
                assert np.array_equal(g[key], f[key][at], equal_nan=True), key


def test_reference_rows_read_in_place_are_keyed_by_their_rows():
    """ref_rows picks each finished position's row out of one array: the reference statistics cached for that
    array are per set of rows (two calls on the same array with other rows give each its own answer), for
    float16 and float32 references; rows outside the array or of the wrong count are refused."""
    rng = np.random.default_rng(3)
    vocab = [f"t{k}" for k in range(9)]
    text = ('[[head]]\nid = "h"\ndoc = "d"\nposition = { 0 = 0.5, 1 = 1.0, default = -0.5 }\n'
            '[[head_out]]\nid = "o"\ndoc = "d"\nhead = "h"\nnow = "@all"\nsrc = "t1"\nnext = { "t2" = 1.5 }\n'
            '[[bigram]]\nid = "b"\ndoc = "d"\nnow = "t3"\nnext = { "t4" = 2.0 }\n')
    rules = compile_text(vocab, {"00_r.toml": text})
    seqs = [rng.integers(0, 9, 30).astype(np.int32) for _ in range(3)]
    N = sum(len(x) for x in seqs)
    at = rng.random(N) < 0.5
    n_at = int(at.sum())
    z = rng.normal(0, 2, size=(3 * N, 9))
    for dtype in (np.float16, np.float32):
        big = (z - logsumexp(z)[:, None]).astype(dtype)
        hm = HandModel(rules)
        for _ in range(2):
            rows = rng.choice(len(big), n_at, replace=False)
            got = hm.stream_metrics_rows(seqs, big, [None], at=at, ref_rows=rows)[0]
            want = HandModel(rules).stream_metrics_rows(seqs, big[rows], [None], at=at)[0]
            for key in ("kl", "ce", "agree", "hand_lse", "hand_argmax"):
                assert np.array_equal(got[key], want[key], equal_nan=True), (dtype, key)
        with pytest.raises(UserError, match="ref_rows must index rows"):
            hm.stream_metrics_rows(seqs, big, [None], at=at, ref_rows=np.full(n_at, len(big)))
        with pytest.raises(UserError, match="ref_rows has shape"):
            hm.stream_metrics_rows(seqs, big, [None], at=at, ref_rows=np.zeros(n_at + 1, np.int64))


_CLASS_VOCAB = [f"t{k}" for k in range(12)]


def _class_rules(members: str, big: str):
    """A class of `members` that a neuron writes to (so atoms), a head the neuron reads, a bigram row of weight `big`."""
    return compile_text(_CLASS_VOCAB, {"00_r.toml": (
        f'[[class]]\nid = "c0"\ndoc = "d"\ntokens = [{members}]\n'
        '[[head]]\nid = "h"\ndoc = "d"\nposition = { 0 = 0.5, 1 = 1.0, default = -0.5 }\n'
        f'[[bigram]]\nid = "b"\ndoc = "d"\nnow = "t3"\nnext = {{ "t4" = {big} }}\n'
        '[[neuron]]\nid = "n"\ndoc = "d"\nthreshold = 0.1\nnow = { "t1" = 1.0, "t2" = 0.5 }\n'
        'attend = { h = { "t5" = 1.0 } }\nnext = { "@c0" = 1.5, "t7" = -1.0 }\n')})


def _class_world(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Three random sequences over _CLASS_VOCAB and float16 reference log-probs for their positions."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 12, 25).astype(np.int32) for _ in range(3)]
    z = rng.normal(0, 2, size=(sum(len(x) for x in seqs), 12))
    return seqs, (z - logsumexp(z)[:, None]).astype(np.float16)


def test_named_reference_rows_share_their_statistics_across_models():
    """ref_key names the reference's content: every HandModel of the process then reuses one computation of its
    statistics (sum p, sum p log p, argmax), and recomputes what depends on its own rules (mass per atom of its
    classes, p . base row). Each model's metrics equal an unnamed call's; another name recomputes."""
    seqs, ref = _class_world(5)
    engine._REF_STATS.clear()
    held = None
    for name, members, big in (("a", '"t1", "t2"', "2.0"), ("a", '"t1", "t2"', "2.5"), ("a", '"t2", "t6", "t9"', "2.0"),
                               ("b", '"t2", "t6", "t9"', "2.0")):
        rules = _class_rules(members, big)
        got = HandModel(rules).stream_metrics_rows(seqs, ref, [None], ref_key=name)[0]
        want = HandModel(rules).stream_metrics_rows(seqs, ref, [None])[0]
        for key in ("kl", "ce", "agree", "hand_lse", "hand_argmax"):
            assert np.array_equal(got[key], want[key], equal_nan=True), (name, members, big, key)
        (entry,) = [v for k, v in engine._REF_STATS.items() if k[1] == name]
        stats = entry[1]
        assert (stats is held) == (name == "a" and held is not None), name  # reused for the same name only
        held = stats


class _DictStore:
    """A StatsStore in memory that counts what the engine asks of it; `corrupt` hands back misshapen arrays."""

    def __init__(self, corrupt=False):
        self.files, self.loads, self.saves, self.corrupt = {}, [], [], corrupt

    def load(self, name, want):
        self.loads.append(name)
        got = self.files.get(name)
        if got is not None and self.corrupt:
            return {k: v[:-1] for k, v in got.items()}
        return got

    def save(self, name, arrays):
        self.saves.append(name)
        self.files[name] = {k: np.array(v) for k, v in arrays.items()}


def test_a_stats_store_keeps_whole_reference_statistics_between_processes():
    """stats_store: a whole-reference pass saves the reference statistics (sum p, sum p log p, argmax; mass per atom;
    p . base row) under names of what they depend on, and a later model with the in-process cache gone reads them
    from the store instead of computing them, with the same metrics bit for bit. Other rules for the classes or
    the bigram rows name other entries; misshapen arrays are computed again; a pass at some positions (`at`)
    leaves the store alone."""
    seqs, ref = _class_world(11)
    N = len(ref)
    fields = ("kl", "ce", "agree", "hand_lse", "hand_argmax")
    store = _DictStore()
    rules = _class_rules('"t1", "t2"', "2.0")
    want = HandModel(rules).stream_metrics_rows(seqs, ref, [None])[0]
    engine._REF_STATS.clear()
    first = HandModel(rules).stream_metrics_rows(seqs, ref, [None], ref_key="r", stats_store=store)[0]
    kinds = sorted(n.split("-")[0] for n in store.saves)
    assert kinds == ["atoms", "base", "ref"] and set(store.files) == set(store.saves)
    saved = {n: {k: v.copy() for k, v in a.items()} for n, a in store.files.items()}
    engine._REF_STATS.clear()  # a new process
    store.loads.clear()
    store.saves.clear()
    again = HandModel(rules).stream_metrics_rows(seqs, ref, [None], ref_key="r", stats_store=store)[0]
    assert sorted(store.loads) == sorted(saved) and store.saves == []
    for key in fields:
        assert np.array_equal(first[key], want[key], equal_nan=True), key
        assert np.array_equal(again[key], want[key], equal_nan=True), key
    # the stored statistics are what the metrics read: a stored argmax moved moves the top-1 flags
    (ref_name,) = [n for n in saved if n.startswith("ref-")]
    store.files[ref_name] = dict(saved[ref_name], arg=(saved[ref_name]["arg"] + 1) % 12)
    engine._REF_STATS.clear()
    moved = HandModel(rules).stream_metrics_rows(seqs, ref, [None], ref_key="r", stats_store=store)[0]
    assert not np.array_equal(moved["agree"], want["agree"])
    store.files[ref_name] = saved[ref_name]
    # other classes and other bigram rows: new atom-mass and base-dot entries, the same reference entry
    engine._REF_STATS.clear()
    store.saves.clear()
    other = _class_rules('"t2", "t6", "t9"', "2.5")
    got = HandModel(other).stream_metrics_rows(seqs, ref, [None], ref_key="r", stats_store=store)[0]
    assert sorted(n.split("-")[0] for n in store.saves) == ["atoms", "base"]
    ref_other = HandModel(other).stream_metrics_rows(seqs, ref, [None])[0]
    for key in fields:
        assert np.array_equal(got[key], ref_other[key], equal_nan=True), key
    # misshapen arrays from a store are not used
    bad = _DictStore(corrupt=True)
    bad.files = {n: dict(a) for n, a in saved.items()}
    engine._REF_STATS.clear()
    got = HandModel(rules).stream_metrics_rows(seqs, ref, [None], ref_key="r", stats_store=bad)[0]
    assert sorted(n.split("-")[0] for n in bad.saves) == ["atoms", "base", "ref"]
    for key in fields:
        assert np.array_equal(got[key], want[key], equal_nan=True), key
    # a pass at some positions (a splice) computes its own: the store is not asked
    at = np.zeros(N, np.bool_)
    at[[3, 30, 60]] = True
    engine._REF_STATS.clear()
    quiet = _DictStore()
    HandModel(rules).stream_metrics_rows(seqs, ref[at], [None], at=at, ref_key="r", stats_store=quiet)
    assert quiet.loads == [] and quiet.saves == []


def test_metrics_at_positions_checks_its_mask():
    rules = compile_text(["a", "b"], {"00_r.toml": '[[bigram]]\nid = "x"\ndoc = "d"\nnow = "a"\nnext = { "b" = 1.0 }\n'})
    hm = HandModel(rules)
    with pytest.raises(UserError, match="`at` has shape"):
        hm.stream_metrics_rows([np.array([0, 1, 0])], np.zeros((1, 2), np.float32), [None], at=np.array([True, False]))
    with pytest.raises(UserError, match="per position of `at`"):
        hm.stream_metrics_rows([np.array([0, 1, 0])], np.zeros((3, 2), np.float32), [None], at=np.array([True, False, False]))


def test_long_row_runs_are_split_into_passes_of_at_most_max_fused_rows():
    from unittest import mock

    from handmodel import engine

    vocab = ["a", "b", "c"]
    text = "".join(f'[[bigram]]\nid = "b{i}"\ndoc = "d"\nnow = "{t}"\nnext = {{ "c" = {i + 1}.0 }}\n'
                   for i, t in enumerate(["a", "b"])) + \
        '[[head]]\nid = "h"\ndoc = "d"\nposition = { 1 = 2.0 }\n' + \
        "".join(f'[[head_out]]\nid = "o{i}"\ndoc = "d"\nhead = "h"\nsrc = "{t}"\nnext = {{ "{u}" = 1.5 }}\n'
                for i, (t, u) in enumerate([("a", "b"), ("b", "c"), ("c", "a"), ("a", "c")]))
    rules = compile_text(vocab, {"r.toml": text})
    hm = HandModel(rules)
    n = len(rules.rule_ids)
    masks = [np.arange(n) < k for k in range(3, n + 1)]  # bigrams and the head always on, then one head_out per row
    with mock.patch.object(engine, "MAX_FUSED_ROWS", 2):
        passes = hm.row_passes(masks)
        assert [run for run, _ in passes] == [[0, 1], [2, 3], [4]]
        seq = np.array([0, 1, 2, 0, 0, 1], dtype=np.int32)
        ref = np.log(np.full((6, 3), 1 / 3, dtype=np.float32))
        for got, m in zip(hm.stream_metrics_rows([seq], ref, masks), masks):
            np.testing.assert_allclose(got["kl"], twin.metrics(rules, [seq], ref, m)["kl"], atol=1e-6)


@pytest.mark.parametrize("src", ['"a"', '"@w"'])  # a token, or a weighted set (its own reader slot)
def test_rows_do_not_fuse_when_a_neuron_reads_a_later_head(src):
    vocab = ["a", "b", "c"]
    text = ('[[head]]\nid = "h"\ndoc = "d"\nposition = { 1 = 2.0 }\n'
            f'[[neuron]]\nid = "n"\ndoc = "d"\nthreshold = 0.1\nattend = {{ h = {{ {src} = 1.0 }} }}\nnext = {{ "b" = 1.0 }}\n'
            '[[head_out]]\nid = "o"\ndoc = "d"\nhead = "h"\nsrc = "a"\nnext = { "c" = 1.0 }\n'
            '[[weights]]\nid = "w"\ndoc = "mostly a"\ntokens = { "a" = 1.0, "c" = 0.25 }\n')
    rules = compile_text(vocab, {"r.toml": text})
    hm = HandModel(rules)
    # head_out before its head: fuses (it counts from the head's row); neuron before its head: two passes
    assert [p[1] is not None for p in hm.row_passes([np.array([0, 0, 1], bool), np.ones(3, bool)])] == [True]
    fused = hm.row_passes([np.array([0, 0, 1], bool), np.ones(3, bool)])[0][1]
    assert list(fused) == [1, 1, 1]  # the head_out (row 0) waits for its head (row 1)
    assert hm.row_passes([np.array([0, 1, 0], bool), np.ones(3, bool)]) == [([0], None), ([1], None)]
    seq = np.array([0, 0, 1, 0, 2], dtype=np.int32)
    ref = np.log(np.full((5, 3), 1 / 3, dtype=np.float32))
    for masks in ([np.array([0, 0, 1], bool), np.ones(3, bool)], [np.array([0, 1, 0], bool), np.ones(3, bool)]):
        got = hm.stream_metrics_rows([seq], ref, masks)
        for g, m in zip(got, masks):
            np.testing.assert_allclose(g["kl"], twin.metrics(rules, [seq], ref, m)["kl"], atol=1e-6)


def test_kl_equals_direct_numpy():
    vocab = ["a", "b", "c"]
    rules = compile_text(vocab, {"r.toml": '[[prior]]\nid = "p"\ndoc = "b is common"\nnext = { "b" = 1.0 }\n'})
    hm = HandModel(rules)
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    q_ = np.exp([0, 1, 0]) / np.exp([0, 1, 0]).sum()
    m = hm.stream_metrics([np.array([0, 2])], ref.astype(np.float32))
    want = [(np.exp(r) * (r - np.log(q_))).sum() for r in ref]
    np.testing.assert_allclose(m["kl"], want, atol=1e-6)
    np.testing.assert_allclose(m["ce"][0], -np.log(q_[2]), atol=1e-6)
    assert list(m["agree"]) == [False, False]


def test_empty_rule_set_is_uniform():
    vocab = ["x", "y", "z", "w"]
    rules = compile_text(vocab, {"empty.toml": "# nothing yet\n"})
    assert rules.rule_ids == [] and rules.groups == []
    lp = HandModel(rules).log_probs(np.array([1], dtype=np.int32))
    np.testing.assert_allclose(lp, np.log(0.25), atol=1e-6)


def test_mask_switches_rules_off_without_recompiling():
    vocab = ["a", "b", "c"]
    rules = compile_text(vocab, {"r.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "b" = 2.0 }\n'
                                           '[[bigram]]\nid = "q"\ndoc = "d"\nnow = "a"\nnext = { "c" = 3.0 }\n'})
    hm = HandModel(rules)
    seq = np.array([0, 1], dtype=np.int32)
    on = hm.log_probs(seq)
    off = hm.log_probs(seq, np.array([True, False]))
    assert on[0].argmax() == 2 and off[0].argmax() == 1
    np.testing.assert_allclose(off, twin.log_probs(rules, seq, np.array([True, False])), atol=1e-6)


@st.composite
def long_attention_cases(draw, with_copy=False, min_len=1):
    """Heads with large position/score values read by head_outs (now = @all and conditional) and neurons,
    on sequences up to 256 tokens: the incremental attention (running sums beyond the position table,
    rescaled when the running max grows) must match the twin's direct softmax."""
    vocab = ["a", "b", "c", " d", "e", "@f"]
    V = len(vocab)
    big = st.floats(-40, 40, allow_nan=False).map(lambda x: round(x, 2))
    ref = st.sampled_from([tok_ref(t) for t in vocab] + ["@c0", "@all"])
    vref = st.sampled_from([tok_ref(t) for t in vocab] + ["@c0", "@all", "@w0", "@w0"])  # value places: weighted sets too
    lines = ['[[class]]\nid = "c0"\ndoc = "class"\ntokens = ["a", " d", "@@f"]',
             '[[weights]]\nid = "w0"\ndoc = "weighted"\ntokens = { "a" = 1.0, "@c0" = 0.5, "e" = -0.75, "b" = 2.0 }']
    heads = []
    for h in range(draw(st.integers(1, 2))):
        pos = draw(st.dictionaries(st.sampled_from(["0", "1", "2", "5", "default"]), big, max_size=4))
        scores = [f"{{ now = {q(draw(ref))}, src = {q(draw(ref))}, w = {draw(big)} }}" for _ in range(draw(st.integers(0, 3)))]
        lines.append(f'[[head]]\nid = "h{h}"\ndoc = "head"\nposition = {{ ' + ", ".join(f"{k} = {v}" for k, v in pos.items())
                     + " }\nscore = [" + ", ".join(scores) + "]")
        heads.append(f"h{h}")
    for i in range(draw(st.integers(0 if with_copy else 1, 4))):
        now = f"now = {q(draw(ref))}\n" if draw(st.booleans()) else ""
        t1, t2 = draw(st.lists(ref, min_size=2, max_size=2, unique=True))
        lines.append(f'[[head_out]]\nid = "o{i}"\ndoc = "out"\nhead = {q(draw(st.sampled_from(heads)))}\nsrc = {q(draw(ref))}\n'
                     f'{now}next = {{ {q(t1)} = {draw(big) / 4}, {q(t2)} = 1.5 }}')
    for i in range(draw(st.integers(0, 3)) if with_copy else 0):  # copy rules, several may read one head
        now = f"now = {q(draw(ref))}\n" if draw(st.booleans()) else ""
        nxt = f'next = {{ {q(draw(ref))} = {draw(big) / 4} }}\n' if draw(st.booleans()) else ""
        lines.append(f'[[head_out]]\nid = "cp{i}"\ndoc = "copy"\nhead = {q(draw(st.sampled_from(heads)))}\n'
                     f'src = {q(draw(ref))}\n{now}{nxt}copy = {draw(big) / 8}')
    for i in range(draw(st.integers(0, 2))):
        h = draw(st.sampled_from(heads))
        lines.append(f'[[neuron]]\nid = "n{i}"\ndoc = "neuron"\nthreshold = {draw(st.sampled_from([-0.5, 0.2]))}\n'
                     f'attend = {{ {h} = {{ {q(draw(vref))} = {draw(big) / 8} }} }}\n'
                     f'present = {{ {q(draw(ref))} = {draw(big) / 20} }}\nnext = {{ {q(draw(vref))} = 2.0 }}')
    n = draw(st.integers(min_len, 256 if min_len < 256 else min_len + 60))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(V, 0.5))  # skewed: long runs of one token, rare tokens late
    seq = rng.choice(V, size=n, p=probs).astype(np.int32)
    return vocab, {"r.toml": "\n\n".join(lines) + "\n"}, seq, seed


def _check_long(case):
    vocab, files, seq, seed = case
    rules = compile_text(vocab, files)
    hm = HandModel(rules)
    rng = np.random.default_rng(seed)
    for mask in (None, rng.random(len(rules.rule_ids)) < 0.7):
        got = hm.log_probs(seq, mask)
        want = twin.log_probs(rules, seq, mask)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        ref = want[::-1].astype(np.float16)  # some other distribution per row
        m = hm.stream_metrics([seq], ref, mask)
        tw = twin.metrics(rules, [seq], ref, mask)
        assert (m["kl"] >= 0).all() and np.isfinite(m["kl"]).all()
        np.testing.assert_allclose(m["kl"], tw["kl"], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(m["ce"], tw["ce"], atol=1e-5, rtol=0)


@settings(deadline=None, derandomize=True, max_examples=25, suppress_health_check=list(HealthCheck))
@given(long_attention_cases())
def test_long_sequences_large_scores_match_twin(case):
    _check_long(case)


@settings(deadline=None, derandomize=True, max_examples=20, suppress_health_check=list(HealthCheck))
@given(long_attention_cases(with_copy=True, min_len=200))
def test_long_sequences_with_copy_rules_match_twin(case):
    """`copy` rules (src token/class/@all, with and without `now`, alone or with `next`, several per head) on
    200+ token sequences with large scores and repeated tokens: the far positions' attention per source token
    is kept in running sums (merged outputs for now = @all, per-token mass for conditional copies)."""
    _check_long(case)


def test_copy_far_sums_rescaled_when_a_higher_score_arrives():
    """Far positions (beyond the position table) enter the running sums in order; a later source with a higher
    score rescales every earlier sum, the per-token copy masses included (now = @all and conditional)."""
    vocab = ["a", "b", "c", "d"]
    text = ('[[head]]\nid = "h"\ndoc = "d"\nposition = { 0 = 1.0, 1 = 0.5, default = -2.0 }\n'
            'score = [{ src = "b", w = 6.0 }, { src = "c", w = 12.0 }, { now = "d", src = "a", w = 3.0 }]\n'
            '[[head_out]]\nid = "all"\ndoc = "d"\nhead = "h"\nsrc = "@all"\ncopy = 1.5\n'
            '[[head_out]]\nid = "cond"\ndoc = "d"\nhead = "h"\nsrc = "@all"\nnow = "a"\ncopy = 2.0\n'
            '[[head_out]]\nid = "cond_d"\ndoc = "d"\nhead = "h"\nsrc = "a"\nnow = "d"\ncopy = -3.0\nnext = { "b" = 1.0 }\n')
    rules = compile_text(vocab, {"r.toml": text})
    hm = HandModel(rules)
    seq = np.array([0] * 30 + [1] * 3 + [0] * 20 + [2] + [0, 3] * 20 + [1, 2, 3], dtype=np.int32)
    for mask in (None, np.array([True, False, True, True]), np.array([True, True, True, False])):
        np.testing.assert_allclose(hm.log_probs(seq, mask), twin.log_probs(rules, seq, mask), atol=1e-5, rtol=0)


def test_copy_hand_computed():
    """seq = a b a c, uniform head (no position/score): a(s) = 1/4 at t = 3.
    cp_all (src @all, copy 2): a at s = 0, 2 -> 2 x (1/4 + 1/4) = 1.0; b, c -> 2 x 1/4 = 0.5 each; d 0.
    cp_a (src "a", now "c", copy -1, next d = 1): c is now -> a -= 0.5; d += A(a) x 1 = 0.5.
    cp_v (src @v = {a, b}, now "b", copy 3): c is not in now -> nothing at t = 3.
    At t = 1 (c = b, a(s) = 1/2): cp_all: a +1, b +1; cp_v: a +1.5, b +1.5; cp_a: nothing."""
    vocab = ["a", "b", "c", "d"]
    text = ('[[class]]\nid = "v"\ndoc = "a and b"\ntokens = ["a", "b"]\n'
            '[[head]]\nid = "h"\ndoc = "uniform"\n'
            '[[head_out]]\nid = "cp_all"\ndoc = "copy anything"\nhead = "h"\nsrc = "@all"\ncopy = 2.0\n'
            '[[head_out]]\nid = "cp_a"\ndoc = "d"\nhead = "h"\nsrc = "a"\nnow = "c"\ncopy = -1.0\nnext = { "d" = 1.0 }\n'
            '[[head_out]]\nid = "cp_v"\ndoc = "d"\nhead = "h"\nsrc = "@v"\nnow = "b"\ncopy = 3\n')
    rules = compile_text(vocab, {"r.toml": text})
    assert list(rules.rule_numbers) == [0, 1, 2, 1]
    seq = np.array([0, 1, 0, 2], dtype=np.int32)
    z = twin.logits(rules, seq)
    np.testing.assert_allclose(z[3], [1.0 - 0.5, 0.5, 0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(z[1], [1.0 + 1.5, 1.0 + 1.5, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(z[0], [2.0, 0.0, 0.0, 0.0], atol=1e-12)  # t = 0 attends to itself only
    d = {rules.rule_ids[i]: x for i, x, _ in twin.contributions(rules, seq, 3)}
    np.testing.assert_allclose(d["cp_all"], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(d["cp_a"], [-0.5, 0.0, 0.0, 0.5])
    assert "cp_v" not in d
    hm = HandModel(rules)
    want = z - logsumexp(z)[:, None]
    np.testing.assert_allclose(hm.log_probs(seq), want, atol=1e-6)
    # masks: switching off the head silences every copy; switching off one copy rule removes exactly its part
    off_head = np.array([False, True, True, True])
    np.testing.assert_allclose(hm.log_probs(seq, off_head), np.log(0.25), atol=1e-6)
    m = np.array([True, False, True, True])
    z2 = z.copy()
    z2[3] -= [1.0, 0.5, 0.5, 0.0]
    z2[2] -= [2.0 * 2 / 3, 2.0 / 3, 0.0, 0.0]  # t = 2: a at s = 0, 2, b at s = 1, a(s) = 1/3
    z2[1] -= [1.0, 1.0, 0.0, 0.0]
    z2[0] -= [2.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(twin.logits(rules, seq, m), z2, atol=1e-12)
    np.testing.assert_allclose(hm.log_probs(seq, m), z2 - logsumexp(z2)[:, None], atol=1e-6)
    assert any("copies" in desc for _, desc in hm.explain(seq, 3))


def test_base_rows_cached_across_calls_and_masks():
    """Base rows are kept across calls (per prior/bigram mask); ablating a non-base rule reuses them, and
    switching a bigram off builds (and caches) other rows: results stay equal to the twin either way."""
    vocab = ["a", "b", "c", "d"]
    rules = compile_text(vocab, {"r.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "b" = 2.0 }\n'
                                           '[[bigram]]\nid = "q"\ndoc = "d"\nnow = "a"\nnext = { "c" = 3.0 }\n'
                                           '[[skip]]\nid = "s"\ndoc = "d"\nearlier = "a"\nnext = { "d" = 1.0 }\n'})
    hm = HandModel(rules)
    seqs = [np.array([0, 1, 0, 2], dtype=np.int32), np.array([3, 3, 0], dtype=np.int32)]
    masks = [None, np.array([True, True, False]), np.array([True, False, True]), None, np.array([False, False, True])]
    for mask in masks:
        for s, g in zip(seqs, hm.log_probs_batch(seqs, mask)):
            np.testing.assert_allclose(g, twin.log_probs(rules, s, mask), atol=1e-5, rtol=0)
        one = hm.log_probs(np.array([2, 0], dtype=np.int32), mask)  # a subset of the cached tokens
        np.testing.assert_allclose(one, twin.log_probs(rules, np.array([2, 0]), mask), atol=1e-5, rtol=0)


def test_base_rows_built_in_place_as_new_tokens_arrive():
    """Each call builds rows only for tokens whose row it has not built, in place at the end of the pool, which
    grows (its earlier rows copied) past its first capacity of 64: every row stays the twin's, old and new alike.
    Tokens whose rows are built from the same blocks share one (here every token from t60 on: the prior only)."""
    vocab = [f"t{i}" for i in range(90)]
    rows = ", ".join(f'"t{i}" = {{ "t{(7 * i) % 90}" = {1 + i / 8:.3f} }}' for i in range(60))
    rules = compile_text(vocab, {"r.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "t1" = 2.0, "t7" = -1.0 }\n'
                                           f'[[bigram]]\nid = "q"\ndoc = "d"\nrows = {{ {rows} }}\n'})
    engine._POOLS.clear()
    hm = HandModel(rules)
    seen: set[int] = set()
    for lo, hi in [(0, 5), (3, 40), (40, 41), (30, 75), (70, 90), (0, 90)]:
        seq = np.arange(lo, hi, dtype=np.int32)[::-1].copy()
        np.testing.assert_allclose(hm.log_probs(seq), twin.log_probs(rules, seq, None), atol=1e-5, rtol=0)
        seen |= {min(t, 60) for t in range(lo, hi)}  # t60..t89: one row
        (pool,) = engine._POOLS.values()
        assert pool.n == len(pool.index) == len(seen)


def test_base_rows_shared_by_models_with_the_same_prior_and_bigrams():
    """A second HandModel whose prior and bigram rules compile to the same blocks (here: a neuron edited, as in
    `verify --watch`) builds no base row; a changed bigram number rebuilds the row of its token only; a masked
    bigram reuses the rows of tokens built from the prior alone; another vocabulary has a pool of its own. Every
    model stays the twin's."""
    vocab = [f"t{i}" for i in range(40)]
    base = ('[[prior]]\nid = "p"\ndoc = "d"\nnext = { "t1" = 2.0, "t7" = -1.0 }\n'
            '[[bigram]]\nid = "q"\ndoc = "d"\nrows = { "t3" = { "t2" = BIG }, "t5" = { "t9" = 0.5 } }\n'
            '[[head]]\nid = "h"\ndoc = "uniform"\n'
            '[[neuron]]\nid = "n"\ndoc = "d"\nthreshold = THR\nnow = { "t3" = 1.0 }\nattend = { h = { "t5" = 2.0 } }\n'
            'next = { "t9" = 1.5 }\n')
    seq = np.array([3, 5, 3, 0, 5, 3, 9], dtype=np.int32)
    engine._POOLS.clear()

    def built(big: str, thr: str, v=vocab) -> int:
        rules = compile_text(v, {"r.toml": base.replace("BIG", big).replace("THR", thr)})
        hm = HandModel(rules)
        for mask in (None, np.array([True, False, True, True])):
            np.testing.assert_allclose(hm.log_probs(seq, mask), twin.log_probs(rules, seq, mask), atol=1e-5, rtol=0)
        return sum(p.n for p in engine._POOLS.values())

    assert built("3.0", "0.5") == 3  # t3, t5 and the prior-only row (t0, t9; every token with the bigram off)
    assert built("3.0", "0.25") == 3  # the neuron edited: the same rows
    assert built("3.5", "0.25") == 4  # t3's bigram number edited: its row only
    assert built("3.0", "0.25", vocab + ["t40"]) == 7 and len(engine._POOLS) == 2  # another vocabulary


def test_weighted_set_hand_computed():
    """@w = { a = 1.0, @c0 = 0.5, c = 0.25 } with c0 = {b, c}: w_a = 1, w_b = 0.5, w_c = 0.5 + 0.25 = 0.75 (overlaps
    add); d, e are not members. Neuron: threshold 0.5, now {@w = 2}, attend the uniform head {@w = 1} (weighted
    mass: mean of w over positions 0..t), next {@w = 1, e = 0.5}. Bigram row d -> {@w = -2}. seq = a d c b."""
    vocab = ["a", "b", "c", "d", "e"]
    text = ('[[bigram]]\nid = "row"\ndoc = "d"\nrows = { "d" = { "@w" = -2.0 } }\n'
            '[[head]]\nid = "h"\ndoc = "uniform"\n'
            '[[neuron]]\nid = "n"\ndoc = "d"\nthreshold = 0.5\nnow = { "@w" = 2.0 }\nattend = { h = { "@w" = 1.0 } }\n'
            'next = { "@w" = 1.0, "e" = 0.5 }\n'
            '[[class]]\nid = "c0"\ndoc = "b and c"\ntokens = ["b", "c"]\n'
            '[[weights]]\nid = "w"\ndoc = "defined after its users"\ntokens = { "a" = 1.0, "@c0" = 0.5, "c" = 0.25 }\n')
    rules = compile_text(vocab, {"r.toml": text})
    w = np.array([1.0, 0.5, 0.75, 0.0, 0.0])
    seq = np.array([0, 3, 2, 1], dtype=np.int32)
    acts = [-0.5 + 2 * 1.0 + 1.0,  # t = 0, c = a: now w_a, attention on itself
            max(0.0, -0.5 + 0.0 + (1.0 + 0.0) / 2),  # t = 1, c = d (not a member): 0.0, the neuron is silent
            -0.5 + 2 * 0.75 + (1.0 + 0.0 + 0.75) / 3,  # t = 2, c = c
            -0.5 + 2 * 0.5 + (1.0 + 0.0 + 0.75 + 0.5) / 4]  # t = 3, c = b
    assert acts[1] == 0.0
    want = np.array([a * (w + np.array([0, 0, 0, 0, 0.5])) for a in acts])
    want[1] += -2.0 * w  # the bigram row of d
    np.testing.assert_allclose(twin.logits(rules, seq), want, atol=1e-12)
    np.testing.assert_allclose(HandModel(rules).log_probs(seq), want - logsumexp(want)[:, None], atol=1e-6)
    assert rules.sets.name(rules.rules[0].rows[0][1][0][0]) == "@w"
    assert list(rules.rule_numbers) == [1 + 3, 0, 5]  # the bigram, first user, carries the set's 3 entries


def test_run_seqs_unpacks_its_arrays_in_their_field_order():
    """The kernel unpacks P, A and U by position (numba sees a NamedTuple as a tuple), the engine builds them by
    name: each unpacking must name handmodel.passargs' fields, all of them, in order. A field moved on one side
    only would shift every array after it into the wrong variable with no error."""
    import ast
    import inspect

    from handmodel import kernels, passargs

    src = inspect.getsource(kernels.run_seqs.py_func)
    fn = ast.parse(src).body[0]
    unpacked = {st.value.id: [e.id for e in st.targets[0].elts] for st in fn.body
                if isinstance(st, ast.Assign) and isinstance(st.value, ast.Name) and isinstance(st.targets[0], ast.Tuple)}
    assert unpacked == {"P": list(passargs.RuleArrays._fields), "A": list(passargs.AttentionArrays._fields),
                        "U": list(passargs.UncondOutputs._fields)}


def test_rule_arrays_are_taken_by_name_from_the_compiled_namespace():
    """RuleArrays.of reads each field from compiled.build_arrays' namespace by its own name."""
    from handmodel import passargs

    rules = load_rules(DOC_RULES, DOC_VOCAB)
    got = passargs.RuleArrays.of(rules.arrays, rules.vocab_size, np.ones(rules.n_heads, np.bool_))
    for f in passargs.RuleArrays._fields:
        if f not in ("V", "head_used"):
            assert getattr(got, f) is getattr(rules.arrays, f), f
    assert got.V == rules.vocab_size and got.V.dtype == np.int64
    assert got.src_by_tok.shape[0] == rules.vocab_size and got.src_by_tok.flags.c_contiguous


def test_the_kernels_load_without_scipy_linalg_and_leave_it_importable(tmp_path):
    """engine._kernels answers numba's BLAS probe "none" (it would import scipy.linalg: ~0.5 s of every edit's
    verify), so in a fresh process the kernels run without scipy.linalg loaded, and importing it afterwards
    still works when scipy is installed."""
    import os
    import subprocess
    import sys

    code = """
import importlib.util, sys
import numpy as np
from conftest import DOC_RULES, DOC_VOCAB
from handmodel import HandModel, load_rules, twin
rules = load_rules(DOC_RULES, DOC_VOCAB)
seq = np.arange(min(6, len(DOC_VOCAB)), dtype=np.int32)
got = HandModel(rules).log_probs(seq)
assert np.allclose(got, twin.log_probs(rules, seq, None), atol=1e-6)
assert "scipy.linalg" not in sys.modules, "the BLAS probe imported scipy.linalg"
if importlib.util.find_spec("scipy") is not None:
    import scipy.linalg
    assert scipy.linalg.norm(np.ones(4)) == 2.0
print("ok")
"""
    env = {**os.environ, "HANDMODEL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True,
                       text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@pytest.mark.skipif(bool(__import__("os").environ.get("NUMBA_BOUNDSCHECK")), reason="already the bounds-checked run")
def test_the_kernels_stay_in_bounds(tmp_path):
    """The property tests that drive every kernel path (engine == twin, fused ledger rows, positions in `at`) run
    again in a child process with numba's bounds checks compiled in: an index past an array raises there instead
    of silently corrupting memory. (A sequence with no finished position once folded its heads' far sums into
    buffers sized for none: heap corruption, found this way.) The child compiles the kernels afresh (~1 min)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "HANDMODEL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    tests = "match_twin or ledger_rows or chosen_positions or write_much or read_in_place or copy"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", tests],
                       env=env, cwd=Path(__file__).parent, capture_output=True, text=True)
    assert p.returncode == 0 and " passed" in p.stdout, (p.stdout[-3000:], p.stderr[-2000:])


def test_the_kernels_use_no_blas():
    """What lets engine._skip_blas_probe answer "no BLAS": no kernel calls np.dot, np.linalg, np.matmul, np.vdot,
    np.inner, np.outer, np.tensordot or uses the @ operator."""
    import ast

    from handmodel import kernels

    tree = ast.parse(Path(kernels.__file__).read_text())
    blas = {"dot", "vdot", "inner", "outer", "matmul", "tensordot", "linalg", "einsum"}
    bad = [n.lineno for n in ast.walk(tree)
           if (isinstance(n, ast.Attribute) and n.attr in blas)
           or (isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult))]
    assert not bad, f"handmodel/kernels.py uses BLAS at lines {bad}: drop engine._skip_blas_probe"


def test_run_seqs_helpers_are_inlined_by_llvm_without_reference_counts():
    """run_seqs' helpers and phases (every numba function of handmodel/kernels.py whose name starts with "_") are
    compiled with `_inlined`'s options: forceinline (LLVM inlines them, so numba's IR inliner does not type and
    lower every call site again: ~25 s of the cold compile), _nrt=False (with reference counting each inlined
    call keeps an atomic incref/decref pair per array argument in the inner loops: 3.8x slower passes), and no
    cache of their own (their code lives in run_seqs' cache entry). The kernels the engine calls are cached."""
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    from handmodel import engine

    kernels = engine._kernels()
    found = {name: d for name, d in vars(kernels).items() if isinstance(d, CPUDispatcher)}
    helpers = {name: d for name, d in found.items() if name.startswith("_")}
    assert {"_attend", "_head_out_writes", "_neurons", "_finish", "_add", "_route"} <= set(helpers)
    for name, d in helpers.items():
        opts = d.targetoptions
        assert opts.get("forceinline") is True and opts.get("_nrt") is False and "inline" not in opts, (name, opts)
        assert isinstance(d._cache, NullCache), f"{name} has a cache of its own"
    for name, d in found.items():
        if not name.startswith("_"):
            assert not isinstance(d._cache, NullCache), f"kernel {name} is not cached"


@functools.lru_cache(maxsize=None)
def _dense_finish_runner():
    """A jitted caller of kernels._dense_finish and _exp_le0 (they have no Python entry of their own)."""
    from numba import njit

    k = engine._kernels()
    dense_finish, exp_le0 = k._dense_finish, k._exp_le0

    @njit
    def finish(y, atom_of, cuma):
        V = len(y)
        zero = np.zeros(V)
        yb = np.empty(V)
        lse, best = dense_finish(y, zero, zero, cuma, atom_of, V, yb, np.empty(V))
        return lse, best, yb

    @njit
    def exps(x):
        out = np.empty_like(x)
        for i in range(len(x)):
            out[i] = exp_le0(x[i])
        return out
    return finish, exps


def _sequential_finish(y: np.ndarray) -> tuple[float, int]:
    """What _dense_finish computes, one element after another: the first largest logit and log sum exp."""
    import math

    m, best = -np.inf, -1
    for v, x in enumerate(y):
        if x > m:
            m, best = x, v
    if best < 0:  # every logit -inf: -inf - -inf is NaN, as in the kernel
        return math.nan, best
    return m + math.log(sum(math.exp(x - m) for x in y)), best


def test_exp_le0_is_within_an_ulp_of_libm():
    """The dense finish's exp (straight-line, vectorised) against libm's over x <= 0: within one ulp where the
    result is normal, exact at 0, exp(-700) below -700 (the sums it feeds hold a term 1), NaN kept."""
    import math

    _, exps = _dense_finish_runner()
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.uniform(0, 700, 200_000), -rng.uniform(0, 1, 50_000),
                        -np.log(2) / 2 * np.arange(0, 2.0, 1e-4), [0.0, -0.0, -5e-324, -1e-300, -700.0]])
    got = exps(x)
    want = np.array([math.exp(v) for v in x])
    ulp = np.spacing(want)
    assert np.max(np.abs(got - want) / ulp) <= 1.0
    assert exps(np.array([0.0, -0.0]))[0] == 1.0 and exps(np.array([-0.0]))[0] == 1.0
    low = exps(np.array([-700.5, -745.0, -1e300, -np.inf]))
    assert np.all(low == math.exp(-700.0))
    assert np.isnan(exps(np.array([np.nan]))[0])


@settings(deadline=None, derandomize=True, max_examples=200, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from([-np.inf, -3.0, -0.5, 0.0, 0.25, 1.0, 2.0, 2.0, 7.5]), min_size=1, max_size=23),
       st.integers(1, 3))
@example([-np.inf] * 5, 1)
@example([2.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0], 1)  # the maximum in lanes 0, 1 and 2: token 0 wins
@example([0.0, 0.0, 2.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0], 1)  # in lanes 2, 1, 2: token 2
def test_dense_finish_equals_a_sequential_pass_ties_included(vals, n_atoms):
    """Four running maxima and eight partial sums give the sequential pass's argmax exactly (ties: the lowest token,
    whichever lane holds it; -inf logits never win; all -inf: -1) and its log Z to rounding; the logits stay in yb."""
    y = np.array(vals)
    V = len(y)
    atom_of = (np.arange(V) % n_atoms).astype(np.int32)
    cuma = np.linspace(-0.5, 0.5, n_atoms) if n_atoms > 1 else np.zeros(1)
    logits = y + cuma[atom_of]
    finish, _ = _dense_finish_runner()
    lse, best, yb = finish(y, atom_of, cuma)
    want_lse, want_best = _sequential_finish(logits)
    assert best == want_best
    np.testing.assert_array_equal(yb, logits)
    if np.isnan(want_lse):
        assert np.isnan(lse)
    else:
        assert lse == pytest.approx(want_lse, rel=1e-14, abs=1e-14)


@functools.lru_cache(maxsize=None)
def _argmax_after_runner():
    """A jitted caller of kernels._argmax_after: yb holds the previous row's logits `old`, the row changes `chg`."""
    from numba import njit

    k = engine._kernels()
    after, argmax4 = k._argmax_after, k._argmax4

    @njit
    def run(old, cum, chg, nch):
        V = len(old)
        yb = old.copy()
        ymax, ybest = argmax4(yb, V)
        zero = np.zeros(V)
        best, bv = after(yb, ymax, ybest, chg, nch, old, cum, zero, zero[:1], np.zeros(V, np.int32), V)
        return best, bv, yb
    return run


@settings(deadline=None, derandomize=True, max_examples=300, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0, 2.0]), min_size=1, max_size=13), st.data())
def test_argmax_after_a_fused_rows_changes_equals_a_full_argmax(prev, data):
    """_argmax_after (a fused ledger row's argmax from the previous row's logits in yb and the tokens it changes)
    against the first largest logit of the new row: changes that raise, lower (the previous argmax too, which
    needs a rescan), tie or repeat a token."""
    V = len(prev)
    old = np.array(prev)
    changed = data.draw(st.lists(st.integers(0, V - 1), max_size=2 * V))
    new_vals = data.draw(st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0, 3.0]), min_size=len(changed),
                                  max_size=len(changed)))
    cum = np.zeros(V)
    for v, x in zip(changed, new_vals):
        cum[v] = x - old[v] if np.isfinite(old[v]) and np.isfinite(x) else 0.0
    logits = old + cum
    best, bv, yb = _argmax_after_runner()(old, cum, np.array(changed + [0], np.int64), len(changed))
    want = -1 if not np.any(logits > -np.inf) else int(np.argmax(logits))
    assert best == want
    np.testing.assert_array_equal(yb, logits)
    assert bv == (logits[want] if want >= 0 else -np.inf)


def test_cache_cold_follows_numbas_own_check(tmp_path):
    """engine._cache_cold (behind verify's "compiling the hand model's numba kernels" notice): cold before the first
    compile and after the source changes, not after a compile, and not when the file is only touched (numba
    stamps the source by its content: a checkout that rewrites a file unchanged must not announce a compile)."""
    import importlib.util
    import os

    src = tmp_path / "cold_probe_kernels.py"
    src.write_text("from numba import njit\n\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n")

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, src)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.f

    f = load("cold_probe_a")
    assert engine._cache_cold(f)
    assert f(1) == 2  # compiles and saves
    assert not engine._cache_cold(f)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))  # touched, ten seconds newer than its cache
    assert not engine._cache_cold(load("cold_probe_b"))
    src.write_text(src.read_text().replace("x + 1", "x + 2"))
    assert engine._cache_cold(load("cold_probe_c"))
