"""Incremental ledger rows (verify/ledger/incremental.py): after an edit, a row spliced from its predecessor
with only the changed rules' spans recomputed equals a full recompute of that row, bit for bit, for a
bigram edit, a head_out edit, an added rule and a deleted rule; a neuron edit is a full pass that keeps the old
rows where the edited neuron stays off (incremental.find_gate), equal to a full recompute all the same."""
from __future__ import annotations

import hashlib

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import handmodel
from verify.ledger import core as L
from verify.ledger import incremental as I

from conftest import DOC_RULES as FIXTURE, DOC_VOCAB as VOCAB  # docs/rules.md's worked example
EXTRA = '''vocab = "9:10557a0e"
group = "extra"

[[bigram]]
id = "rare.ice"
doc = "After ' ice' comes ' cream'."
now = " ice"
next = { " cream" = 3.0 }

[[head_out]]
id = "dog.after.ice"
doc = "After a dog, an ice looked at suggests '.'."
head = "head.prev"
src = " ice"
now = " dog"
next = { "." = 1.0 }
'''
TAIL = '''vocab = "9:10557a0e"
group = "tail"

[[bigram]]
id = "tail.cream"
doc = "After ' cream', a full stop."
now = " cream"
next = { "." = 0.7 }
'''
ADDED = '''
[[bigram]]
id = "rare.ice.stop"
doc = "After ' ice', not '.'."
now = " ice"
next = { "." = -1.2 }
'''
# (file, old text, new text): one number of one rule, a rule added, a rule deleted
EDITS = {
    "bigram": ("30_extra.toml", 'next = { " cream" = 3.0 }', 'next = { " cream" = 2.25 }'),
    "head_out": ("30_extra.toml", 'next = { "." = 1.0 }', 'next = { "." = -0.75 }'),
    "added": ("30_extra.toml", "", ADDED),
    "deleted": ("30_extra.toml", EXTRA[EXTRA.index("[[head_out]]"):], ""),
    "neuron": ("20_attention.toml", "threshold = 1.0", "threshold = 0.8"),
    # an edit that lowers an activation somewhere keeps a position only within the edit's bound of it: each input
    # kind is lowered once (a bound without that kind's term fails), and the threshold moves both ways
    "neuron threshold up": ("20_attention.toml", "threshold = 1.0", "threshold = 1.25"),
    "neuron now": ("20_attention.toml", 'now = { " dog" = 1.0 }', 'now = { " dog" = 0.6 }'),
    "neuron present": ("20_attention.toml", '"@animal" = 0.5 }', '"@animal" = -0.25 }'),
    "neuron attend": ("20_attention.toml", '{ " the" = 0.5 }', '{ " the" = 0.1 }'),
    "neuron next": ("20_attention.toml", 'next = { " ran" = 1.0, "." = -0.5 }', 'next = { " ran" = 1.0, "." = 0.25 }'),
}


def _write(d: Path, edit=None) -> Path:
    d.mkdir(exist_ok=True)
    for f in FIXTURE.glob("*.toml"):
        (d / f.name).write_text(f.read_text())
    (d / "30_extra.toml").write_text(EXTRA)
    (d / "40_tail.toml").write_text(TAIL)
    if edit is not None:
        name, old, new = edit
        f = d / name
        text = f.read_text()
        assert old in text
        f.write_text(text + new if old == "" else text.replace(old, new))
    return d


def _ref(tmp: Path, seed: int = 0, name: str = "ref") -> SimpleNamespace:
    """A random eval set where ' ice' and ' dog' are rare late in a sequence (so spans are partial)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(40):
        n = int(rng.integers(5, 40))
        s = rng.choice([0, 1, 2, 3, 5, 6, 7, 8], size=n, p=[.05, .22, .22, .03, .1, .18, .1, .1])
        if rng.random() < 0.5:
            s[rng.integers(0, max(1, n // 3))] = 4  # an ' ice' early on
        seqs.append(s.astype(np.int32))
    tokens = np.concatenate(seqs)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    x = rng.normal(size=(len(tokens), len(VOCAB))) * 2
    logp = (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(np.float16)
    (tmp / name).mkdir()
    # content_key names the log-probs (the engine keeps their statistics under it): unique per content, as a
    # reference cache's key is
    return SimpleNamespace(dir=tmp / name, meta={"key": "test"}, tokens=tokens, offsets=offsets, logp=logp,
                           content_key=hashlib.sha256(logp.tobytes()).hexdigest(),
                           seqs=[tokens[offsets[i]:offsets[i + 1]] for i in range(len(seqs))])


class _Counting(handmodel.HandModel):
    """Records how many positions each engine call covered and how many it finished (`at`)."""

    def stream_metrics_rows(self, seqs, ref_logp, masks, at=None, ref_rows=None, ref_key=None, stats_store=None,
                            gate=None):
        n = sum(len(s) for s in seqs)
        self.positions = getattr(self, "positions", []) + [n]
        self.finished = getattr(self, "finished", []) + [n if at is None else int(np.sum(at))]
        out = super().stream_metrics_rows(seqs, ref_logp, masks, at=at, ref_rows=ref_rows, ref_key=ref_key,
                                          stats_store=stats_store, gate=gate)
        self.kept = getattr(self, "kept", []) + [0 if gate is None else int(np.sum(out[0]["kept"]))]
        return out


def _ledger(d: Path, ref, cache: bool = True, lineage: bool = True):
    rules = handmodel.load_rules(d, VOCAB)
    hm = _Counting(rules)
    masks = L.group_masks(rules)
    labels = ["all:" + label + L.lineage_scope(rules) for label, _ in masks] if lineage else None
    return hm, L.cached_metrics(hm, rules, ref, [m for _, m in masks], cache=cache, labels=labels)


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k], equal_nan=True) and a[k].dtype == b[k].dtype for k in L.ROW_FIELDS)


@pytest.mark.parametrize("kind", list(EDITS))
def test_spliced_rows_equal_a_full_recompute(tmp_path, kind):
    """Bit for bit against the same rows computed by a full pass (the rows missing after the edit, in one
    stream_metrics_rows call, as without lineage). Rows fused into one engine pass with other rows differ
    from rows computed alone by float64 rounding (~1e-15 in kl): against the whole ledger recomputed in one
    call, the spliced rows agree to 1e-12."""
    ref, ref_full = _ref(tmp_path), _ref(tmp_path, name="ref_full")
    before, after = _write(tmp_path / "before"), _write(tmp_path / "after", EDITS[kind])
    _ledger(before, ref)  # every row computed and stored
    _ledger(before, ref_full)
    hm, got = _ledger(after, ref)
    _, full = _ledger(after, ref_full, lineage=False)
    N = len(ref.tokens)
    assert len(got) == len(full)
    for g, f in zip(got, full):
        assert _same(g, f)
    _, whole = _ledger(after, ref, cache=False)
    for g, f in zip(got, whole):
        assert np.allclose(g["kl"], f["kl"], rtol=0, atol=1e-12) and np.array_equal(g["agree"], f["agree"])
    if kind.startswith("neuron"):  # spans everything: one full pass, keeping the old rows where it stays off
        assert hm.positions == [N] and 0 < hm.kept[0] < N, hm.kept
    elif kind in ("bigram", "head_out"):  # a number: every write count stays, one pass
        assert len(hm.positions) == 1 and 0 < hm.positions[0] < N, hm.positions
    else:  # a rule added or deleted: a second pass for positions whose storage changed, if any
        assert 1 <= len(hm.positions) <= 2 and all(0 < n < N for n in hm.positions), hm.positions
    # and the new rows are stored: a second run computes nothing
    hm2, again = _ledger(after, ref)
    assert not hasattr(hm2, "positions") and all(_same(a, b) for a, b in zip(again, got))


def test_splice_recomputes_exactly_the_changed_spans(tmp_path):
    """The prefixes run are the changed rule's span (+1 position for the next token), the positions finished
    are those where it acts (its current token; for a head_out also at or after its first `src`), and only
    the rows that hold the edited rule were missing."""
    ref = _ref(tmp_path)
    _ledger(_write(tmp_path / "before"), ref)
    hm, _ = _ledger(_write(tmp_path / "after", EDITS["bigram"]), ref)
    lens = np.diff(ref.offsets)
    last_ice = [max((t for t, x in enumerate(s) if x == 4), default=-1) for s in ref.seqs]
    want = sum(min(e + 2, n) for e, n in zip(last_ice, lens) if e >= 0)
    assert hm.positions == [want]
    assert hm.finished == [int(np.sum(ref.tokens == 4))]
    ref = _ref(tmp_path, name="ref2")  # its own row cache: the predecessors are the rows before any edit
    _ledger(tmp_path / "before", ref)
    hm, _ = _ledger(_write(tmp_path / "after2", EDITS["head_out"]), ref)  # ' dog' at or after the first ' ice'
    first_ice = [min((t for t, x in enumerate(s) if x == 4), default=len(s)) for s in ref.seqs]
    acts = [(s == 3) & (np.arange(len(s)) >= f) for s, f in zip(ref.seqs, first_ice)]
    # only those: a number edit keeps the write counts, so the positions after them store their outputs as before
    assert hm.finished == [sum(int(np.sum(a)) for a in acts)]


WIDE = '''vocab = "9:10557a0e"
group = "wide"

[[bigram]]
id = "sat.stop"
doc = "A bigram of its own: this last row never fuses with the one before (its base rows differ)."
now = " sat"
next = { "." = 0.25 }

[[neuron]]
id = "always"
doc = "Fires everywhere, writes one token (fewer than dense_min = 4)."
threshold = -1.0
next = { "." = 0.917 }

[[head_out]]
id = "wide.ran"
doc = "A ' ran' with an ice before: five tokens, so the next position stores its outputs densely."
head = "head.prev"
src = " ice"
now = " ran"
next = { " the" = 0.5, " cat" = 0.25, " cream" = -0.5, " ran" = 0.75, "." = 0.125 }
'''


@pytest.mark.parametrize("edit", ["deleted", "number"])
def test_splice_after_a_position_whose_write_count_changed(tmp_path, edit):
    """Deleting a head_out that writes five tokens changes, at the position after each of its positions, how
    that position stores its outputs (dense or not: its float64 rounding), though the head_out never acts
    there: the splice recomputes those positions too, in a second pass, and still equals a full recompute bit
    for bit; a number edit leaves the counts alone, so one pass over the head_out's positions. The group is the
    last row and computed alone, before and after: the same engine pass grouping."""
    ref, ref_full = _ref(tmp_path), _ref(tmp_path, name="ref_full")
    before = _write(tmp_path / "before")
    (before / "50_wide.toml").write_text(WIDE)
    after = _write(tmp_path / "after")
    (after / "50_wide.toml").write_text(WIDE[:WIDE.index("[[head_out]]")] if edit == "deleted"
                                        else WIDE.replace('" ran" = 0.75', '" ran" = -0.375'))
    _ledger(before, ref)
    _ledger(before, ref_full)  # so that the full recompute computes the same rows in one pass (same fusion)
    hm, got = _ledger(after, ref)
    # ' ran' at or after the first ' ice': the head_out's positions; the ones after them stored densely before
    first_ice = [min((t for t, x in enumerate(s) if x == 4), default=len(s)) for s in ref.seqs]
    acts = np.concatenate([(s == 7) & (np.arange(len(s)) >= f) for s, f in zip(ref.seqs, first_ice)])
    nxt = np.zeros_like(acts)
    nxt[1:] = acts[:-1]
    nxt[ref.offsets[:-1]] = False
    assert hm.finished[0] == int(acts.sum()) > 0
    if edit == "number":
        assert len(hm.finished) == 1
    else:  # the write count of each ' ran' fell from 6 (>= dense_min = 4) to 1: every next position flips
        assert hm.finished[1:] == [int((nxt & ~acts).sum())] and hm.finished[1] > 0
    _, full = _ledger(after, ref_full, lineage=False)
    for g, f in zip(got, full):
        assert _same(g, f)


def test_two_rules_folders_on_one_eval_set_keep_their_own_lineage(tmp_path):
    """Rows are spliced onto the last rows of the same rules folder (core.lineage_scope): verifying another
    folder in between (here one whose neuron differs: nothing of it can be spliced onto) leaves the first
    folder's next edit incremental, and equal to a full recompute. (A folder never seen before splices onto the
    last rows of any folder: the other tests edit a copy.)"""
    ref = _ref(tmp_path)
    a = _write(tmp_path / "a")
    _ledger(a, ref)
    _ledger(_write(tmp_path / "b", EDITS["neuron"]), ref)
    name, old, new = EDITS["head_out"]
    (a / name).write_text((a / name).read_text().replace(old, new))
    hm, got = _ledger(a, ref)
    assert len(hm.positions) == 1 and 0 < hm.positions[0] < len(ref.tokens), hm.positions
    _, full = _ledger(a, ref, cache=False)
    assert all(np.allclose(g["kl"], f["kl"], rtol=0, atol=1e-12) for g, f in zip(got, full))


@pytest.mark.parametrize("case", ["class", "damaged"])
def test_a_changed_context_or_a_damaged_predecessor_means_a_full_pass(tmp_path, case):
    ref = _ref(tmp_path)
    _ledger(_write(tmp_path / "before"), ref)
    if case == "class":  # every row's token sets change: no predecessor is in the same context
        edit = ("00_classes.toml", 'tokens = [" cat", " dog"]', 'tokens = [" cat", " dog", " cream"]')
    else:  # a bigram edit, but every stored row is damaged
        edit = EDITS["bigram"]
        for f in (ref.dir / "ledger").glob("*.npz"):
            f.write_bytes(f.read_bytes()[:-7])
    hm, got = _ledger(_write(tmp_path / "after", edit), ref)
    assert hm.positions == [len(ref.tokens)]
    _, full = _ledger(tmp_path / "after", ref, cache=False)
    assert all(_same(a, b) for a, b in zip(got, full))


def test_spans_match_touched_spans(tmp_path):
    """incremental's per-set span (from stored records) and core.touched_spans (from the rules) agree, and a
    rule's positions end where its span ends."""
    ref = _ref(tmp_path)
    rules = handmodel.load_rules(_write(tmp_path / "r"), VOCAB)
    specs = I.specs_of(rules, L.rule_digests(rules))
    pos = I._Positions(rules.sets, ref.tokens, ref.offsets)
    for i, (idx, end) in enumerate(L.touched_spans(rules, ref.seqs)):
        want = np.zeros(len(ref.seqs), np.int64)
        want[idx] = end
        if specs.kind[i] != I.SPAN_ALL:
            assert np.array_equal(pos.span(specs, i), want), rules.rule_ids[i]
            at = pos.at(specs, i)
            last = np.zeros(len(ref.seqs), np.int64)  # one past the last position in `at`, per sequence
            np.maximum.at(last, pos.seq[at], pos.pos[at] + 1)
            assert np.array_equal(last, want), rules.rule_ids[i]


NEAR_ZERO = '''vocab = "9:10557a0e"
group = "near zero"

[[neuron]]
id = "near.zero"
doc = "Attention-driven, so its activation takes many values around its threshold."
threshold = 0.45
now = { " dog" = 0.3, "@animal" = 0.2 }
present = { " cat" = 0.25 }
attend = { "head.prev" = { " the" = 1.0, "@animal" = 0.5 } }
next = { "." = 0.5, " sat" = -0.25 }
'''
# (old, new) text of near.zero: each input kind lowered once, the threshold both ways, and `next` alone
GATED_EDITS = {
    "threshold up": ("threshold = 0.45", "threshold = 0.6"),
    "threshold down": ("threshold = 0.45", "threshold = 0.3"),
    "now down": ('" dog" = 0.3', '" dog" = 0.1'),
    "present down": ('{ " cat" = 0.25 }', '{ " cat" = -0.1 }'),
    "attend down": ('{ " the" = 1.0,', '{ " the" = 0.7,'),
    "next": ('"." = 0.5', '"." = 0.9'),
}


def _near_zero(d: Path, edit=None) -> handmodel.CompiledRules:
    _write(d)
    text = NEAR_ZERO if edit is None else NEAR_ZERO.replace(*edit)
    (d / "50_near_zero.toml").write_text(text)
    return handmodel.load_rules(d, VOCAB)


def _activations(rules, seqs) -> np.ndarray:
    """near.zero's activation at every position (the twin)."""
    from handmodel import twin

    (r,) = [r for r in rules.rules if r.id == "near.zero"]
    out = []
    for s in seqs:
        for t in range(len(s)):
            out.append(twin.neuron_activation(twin.neuron_preactivation(rules, r, s, t, twin.head_attentions(rules, s, t))))
    return np.array(out)


@pytest.mark.parametrize("kind", list(GATED_EDITS))
def test_a_gate_keeps_only_positions_where_the_neuron_is_off_before_and_after(tmp_path, kind):
    """HandModel.stream_metrics_rows(gate=) after an edit of a neuron's numbers, with incremental.neuron_margin's
    bound: every position it keeps has the neuron off before and after the edit (the twin's activations), the
    merged rows equal a full pass bit for bit, and it keeps some. Without the bound (margin 0) an edit that lowers
    the activation keeps positions where the neuron was on: the bound is what makes it right."""
    from handmodel.engine import NeuronGate

    ref = _ref(tmp_path)
    old = _near_zero(tmp_path / "old")
    new = _near_zero(tmp_path / "new", GATED_EDITS[kind])
    masks = [m for _, m in L.group_masks(new)]
    (want_old,) = [m for _, m in L.group_masks(old)][-1:]
    before = handmodel.HandModel(old).stream_metrics_rows(ref.seqs, ref.logp, [want_old])[0]
    j = new.rule_ids.index("near.zero")
    (r_old,) = [r for r in old.rules if r.id == "near.zero"]
    margin = I.neuron_margin(new.sets, r_old, new.rules[j])
    hm = handmodel.HandModel(new)
    full = hm.stream_metrics_rows(ref.seqs, ref.logp, masks[-1:])[0]
    gated = hm.stream_metrics_rows(ref.seqs, ref.logp, masks[-1:], gate=NeuronGate([j], np.array([margin]),
                                                                                   [np.asarray(before["dense"])]))[0]
    kept = np.asarray(gated["kept"])
    merged = I.merge_kept(gated, before, L.ROW_FIELDS)
    assert 0 < kept.sum() < len(kept)
    a_old, a_new = _activations(old, ref.seqs), _activations(new, ref.seqs)
    assert np.all(a_old[kept] == 0) and np.all(a_new[kept] == 0)
    for k in L.ROW_FIELDS:
        assert np.array_equal(merged[k], full[k], equal_nan=True), k
    assert np.array_equal(gated["dense"], full["dense"])
    lowered = a_old > a_new
    if kind != "next":  # the bound matters: without it, positions where the neuron fired before would be kept
        unsafe = hm.stream_metrics_rows(ref.seqs, ref.logp, masks[-1:], gate=NeuronGate([j], np.zeros(1),
                                                                                       [np.asarray(before["dense"])]))[0]
        wrongly = np.asarray(unsafe["kept"]) & (a_old > 0)
        assert wrongly.any() == bool((lowered & (a_new == 0)).any()), kind
        if wrongly.any():
            bad = I.merge_kept(unsafe, before, L.ROW_FIELDS)
            assert not np.array_equal(bad["kl"], full["kl"])
