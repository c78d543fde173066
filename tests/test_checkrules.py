"""`handmodel check-rules` on a tiny reference trained on text with a planted skip-trigram
(tests/planted.py: after ' blue' comes ' moon' when 'zap' occurred earlier)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from handmodel.errors import UserError
from planted import PLANTED_TARGET

EXAMPLES = 30


def _ids(o, *toks):
    return [o.vocab.index(t) for t in toks]


def _last_lp(o, toks):
    return o.log_probs([np.array(_ids(o, *toks))])[0][-1]


@pytest.fixture(scope="module")
def facts(oracle, planted):
    """Numbers read off this particular trained reference, so the rules below are true/false by construction."""
    from verify.discover.common import run_pass, sample_windows

    w = sample_windows(oracle, planted[1], 4096, window=32)
    p = run_pass(oracle, w, lambda c, b: {"post": c["mlp.post"]})
    post = p.data["post"].reshape(-1, oracle.cfg.d_mlp)
    is_the = w.reshape(-1) == oracle.vocab.index(" the")
    sel = (post[is_the] > 0).mean(0) - (post[~is_the] > 0).mean(0)  # fires on ' the', rarely elsewhere
    neuron = int(np.argmax(sel))
    # the neuron set by hand (tests/planted.py), asserted here before any claim about it is checked
    assert neuron == oracle.cfg.d_mlp - 1 and sel[neuron] > 0.95, (neuron, sel[neuron])
    up = oracle.vocab.index(PLANTED_TARGET)
    seq = np.array(_ids(oracle, "zap", " the", " big", " cat", " sat", " on", " the"))
    c = oracle.run_with_cache(seq)
    assert c["mlp.post"][-1, neuron] > 1.0
    import torch

    with torch.inference_mode():
        x2 = torch.as_tensor(c["resid_post"][-1])
        ablated = x2 - float(c["mlp.post"][-1, neuron]) * oracle.model.W_out[neuron]
        lp = [torch.log_softmax(oracle.model.unembed(x).double(), -1)[up].item() for x in (x2, ablated)]
    assert lp[0] - lp[1] > 0.5, f"the planted neuron should raise {PLANTED_TARGET!r} by about a nat, not {lp[0] - lp[1]:.2f}"
    # which head moves 'zap' to ' blue'
    seq = np.array(_ids(oracle, "zap", " the", " big", " cat", " blue"))
    pat = oracle.run_with_cache(seq)["attn.pattern"]  # [H, T, T]
    zap_head = int(np.argmax(pat[:, -1, 0]))
    assert pat[zap_head, -1, 0] > 0.5
    moon = oracle.vocab.index(" moon")
    with_zap = _last_lp(oracle, ["zap", " the", " big", " cat", " blue"])[moon]
    without = _last_lp(oracle, [" the", " big", " cat", " blue"])[moon]
    assert with_zap - without > 0.3, "the planted skip-trigram should be learnt"
    return {"neuron": neuron, "zap_head": zap_head, "other_head": 1 - zap_head, "moon_with": float(with_zap),
            "moon_without": float(without)}


RULES = """
[[bigram]]
id = "bigram.the_dog"
doc = "After ' the' comes ' dog' (planted bigram, p = 0.75)."
now = " the"
next = {{ " dog" = 1.0 }}

[[bigram]]
id = "bigram.wrong_sign"
doc = "Wrong sign: claims ' dog' is unlikely after ' the'."
now = " the"
next = {{ " dog" = -1.0 }}

[[bigram]]
id = "bigram.wrong_token"
doc = "Wrong token: ' moon' never follows ' the'."
now = " the"
next = {{ " moon" = 1.0 }}

[[bigram]]
id = "bigram.blue_moon_sharp"
doc = "' moon' after ' blue', as sharply as after 'zap ... blue': true only when zap came earlier."
now = " blue"
next = {{ " moon" = 1.0 }}
check = {{ margin = {sharp_margin}, fraction = 1.0 }}

[[bigram]]
id = "bigram.known_false"
doc = "Known false, marked so."
now = " the"
next = {{ " dog" = -1.0 }}
check = {{ expect = "fail", why = "kept for the ledger" }}

[[bigram]]
id = "bigram.not_false"
doc = "Marked known-false but true."
now = " the"
next = {{ " dog" = 1.0 }}
check = {{ expect = "fail", why = "stale mark" }}

[[bigram]]
id = "bigram.the_pool"
doc = "After ' the' the mass moves to ' dog' and ' moon' together (' moon' alone: false)."
now = " the"
next = {{ " dog" = 1.0, " moon" = 0.5 }}
check = {{ together = 1 }}

[[bigram]]
id = "bigram.the_pool_one_by_one"
doc = "The same row claimed entry by entry: ' moon' after ' the' is false."
now = " the"
next = {{ " dog" = 1.0, " moon" = 0.5 }}

[[bigram]]
id = "bigram.the_pool_wrong"
doc = "Pooled but wrong: ' dog' does not lose mass after ' the'."
now = " the"
next = {{ " dog" = -1.0, " moon" = 1.0 }}
check = {{ together = 1 }}

[[bigram]]
id = "bigram.nothing"
doc = "Writes only zeros: claims nothing."
now = " the"
next = {{ " dog" = 0.0 }}

[[prior]]
id = "prior.the"
doc = "' the' is a common token."
next = {{ " the" = 1.0 }}

[[skip]]
id = "skip.zap_blue_moon"
doc = "The planted skip-trigram: zap earlier, ' blue' now => ' moon'."
earlier = "zap"
now = " blue"
next = {{ " moon" = 2.0 }}

[[skip]]
id = "skip.wrong_sign"
doc = "The planted skip-trigram with the wrong sign."
earlier = "zap"
now = " blue"
next = {{ " moon" = -2.0 }}

[[head]]
id = "head.zap"
doc = "' blue' attends to 'zap'."
score = [{{ now = " blue", src = "zap", w = 5.0 }}]
check = {{ ref_head = {zap_head} }}

[[head]]
id = "head{other_head}.zap"
doc = "The same claim, mapped by its id to the other head: false."
score = [{{ now = " blue", src = "zap", w = 5.0 }}]

[[head]]
id = "head.unmapped"
doc = "No reference head named: cannot be checked."
position = {{ 1 = 4.0 }}

[[head_out]]
id = "head.zap.moon"
doc = "What head.zap writes: ' moon'."
head = "head.zap"
src = "zap"
now = " blue"
next = {{ " moon" = 2.0 }}

[[head_out]]
id = "head.zap.copy_up"
doc = "Copy claim: after ' blue', an earlier 'zap' makes 'zap' itself likelier."
head = "head.zap"
src = "zap"
now = " blue"
copy = 1.0
check = {{ fraction = 1.0 }}

[[head_out]]
id = "head.zap.copy_down"
doc = "The opposite copy claim: an earlier 'zap' makes 'zap' less likely after ' blue'."
head = "head.zap"
src = "zap"
now = " blue"
copy = -1.0
check = {{ fraction = 1.0 }}

[[neuron]]
id = "neuron.{neuron}.the"
doc = "A neuron that fires on ' the' (and on 'the' at a story start: same word) and raises ' up'."
now = {{ " the" = 1.0, "the" = 1.0 }}
next = {{ " up" = 0.1 }}
check = {{ level = 0.5 }}

[[neuron]]
id = "neuron.blue"
doc = "Claims the ' the' neuron fires on ' blue': false."
now = {{ " blue" = 1.0 }}
next = {{ " moon" = 0.1 }}
check = {{ ref_neuron = {neuron}, level = 0.5 }}
"""


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory, facts, oracle, planted):
    from verify.claims import unigram_logp, context_pool

    pool, _ = context_pool(oracle, planted[1])
    uni = unigram_logp(oracle, pool)[oracle.vocab.index(" moon")]
    # between the lift after a bare ' blue' and the lift after 'zap ... blue'
    sharp = round(((facts["moon_with"] - uni) + (facts["moon_without"] - uni)) / 2, 3)
    d = tmp_path_factory.mktemp("checkrules")
    f = d / "rules.toml"
    f.write_text(RULES.format(sharp_margin=sharp, **facts), encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def checker(rules_file, planted):
    from verify.claims import Checker

    return Checker.from_paths(rules_file, planted[0], planted[1], examples=EXAMPLES)


@pytest.fixture(scope="module")
def results(checker):
    return {r.id: r for r in checker.check_all()}


def test_true_rules_pass(results, facts):
    for rid in ("bigram.the_dog", "prior.the", "skip.zap_blue_moon", "head.zap", "head.zap.moon", f"neuron.{facts['neuron']}.the"):
        r = results[rid]
        assert r.status == "pass", (rid, r.measured, r.counterexample, r.counter_detail)
        assert r.examples == EXAMPLES and r.share >= 0.8 and r.counterexample is None


@pytest.mark.parametrize("rid", ["bigram.wrong_sign", "bigram.wrong_token"])
def test_false_bigram_fails_with_minimal_counterexample(results, rid):
    r = results[rid]
    assert r.status == "fail" and not r.ok and r.share < 0.8
    assert r.shrunk and r.counterexample == "[ the]"  # shrunk all the way: the row token alone
    assert "vs unigram" in r.counter_detail and ("' dog'" if rid == "bigram.wrong_sign" else "' moon'") in r.counter_detail


def test_together_claims_pools_not_entries(results):
    assert results["bigram.the_pool"].status == "pass", results["bigram.the_pool"].measured
    assert results["bigram.the_pool_one_by_one"].status == "fail"
    bad = results["bigram.the_pool_wrong"]
    assert bad.status == "fail" and "raised token" in (bad.counter_detail or "")  # pooled ( moon) drops


def test_wrong_sign_skip_fails_with_the_insertion_shown(results):
    r = results["skip.wrong_sign"]
    assert r.status == "fail" and r.shrunk
    assert r.counterexample.startswith("«zap»") and "[ blue]" in r.counterexample and "neutral" in r.counterexample
    assert "with 'zap' vs" in r.counter_detail


def test_rule_true_only_in_some_contexts_fails_outside_them(results):
    r = results["bigram.blue_moon_sharp"]
    assert r.status == "fail" and 0.0 < r.share < 1.0, (r.measured,)  # some generated contexts do hold ' zap'
    assert r.shrunk and r.counterexample.endswith("[ blue]") and "zap" not in r.counterexample


def test_attention_and_neuron_claims_can_fail(results, facts):
    other = results[f"head{facts['other_head']}.zap"]
    assert other.status == "fail" and f"reference head {facts['other_head']}" in other.counter_detail
    n = results["neuron.blue"]
    assert n.status == "fail" and n.counterexample.startswith("[ blue]") and "without trigger" in n.counterexample


def test_unmappable_rule_is_an_error_and_no_claim_is_reported(results):
    u = results["head.unmapped"]
    assert u.status == "error" and not u.ok and "ref_head" in u.measured and "head<K>" in u.measured
    z = results["bigram.nothing"]
    assert z.status == "no claim" and z.ok


def test_expect_fail(results):
    assert results["bigram.known_false"].status == "xfail" and results["bigram.known_false"].ok
    assert results["bigram.known_false"].why == "kept for the ledger"
    assert results["bigram.not_false"].status == "xpass" and not results["bigram.not_false"].ok


def test_deterministic(checker, results):
    again = checker.check(next(r for r in checker.rules.rules if r.id == "bigram.blue_moon_sharp"))
    first = results["bigram.blue_moon_sharp"]
    assert (again.measured, again.counterexample, again.counter_detail) == (first.measured, first.counterexample, first.counter_detail)


def test_check_table_is_validated(tmp_path, oracle, planted):
    from handmodel import load_rules
    from verify.claims import Checker

    f = tmp_path / "r.toml"
    f.write_text('[[bigram]]\nid = "b"\ndoc = "d"\nnow = " the"\nnext = { " dog" = 1.0 }\ncheck = { margn = 0.5 }\n')
    assert load_rules(f, oracle.vocab).rule_ids == ["b"]  # the engine accepts and ignores it
    c = Checker.from_paths(f, planted[0], planted[1], examples=5)
    with pytest.raises(UserError, match="unknown check key 'margn'; did you mean 'margin'"):
        c.check(c.rules.rules[0])
    for bad, msg in (("check = 3", "'check' must be a table"), ("check = { margin = true }", "check.margin must be a finite number"),
                     ("check = { why = [1] }", "check.why must be")):
        f.write_text(f'[[bigram]]\nid = "b"\ndoc = "d"\nnow = " the"\nnext = {{ " dog" = 1.0 }}\n{bad}\n')
        with pytest.raises(UserError, match=msg):
            load_rules(f, oracle.vocab)
    f.write_text('[[bigram]]\nid = "b"\ndoc = "d"\nnow = " the"\nnext = { " dog" = 1.0 }\ncheck = { fraction = 2 }\n')
    c = Checker.from_paths(f, planted[0], planted[1], examples=5)
    with pytest.raises(UserError, match=r"r.toml:\d+: rule 'b': check.fraction must be in \(0, 1\]"):
        c.check(c.rules.rules[0])


def test_cli_json_only_and_exit_codes(rules_file, planted, capsys):
    from verify.cli import main

    base = ["check-rules", "--rules", str(rules_file), "--checkpoint", str(planted[0]), "--train-corpus", str(planted[1]), "-n", "10"]
    assert main(base + ["--json", "--only", "bigram.the_dog,skip.zap_blue_moon"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in d["results"]] == ["bigram.the_dog", "skip.zap_blue_moon"] and d["ok"]
    assert main(base + ["--only", "bigram.wrong_sign"]) == 1
    out = capsys.readouterr().out
    assert "minimal counterexample" in out and "[ the]" in out and "fail" in out
    assert main(base + ["--only", "bigram.the_dgo"]) == 2
    assert "did you mean 'bigram.the_dog'" in capsys.readouterr().err


def test_copy_claims_are_tested_on_the_inserted_token(results):
    """A head_out `copy = w` claims the inserted source token itself; opposite signs cannot both hold in
    every context (that would need a zero effect everywhere)."""
    up, down = results["head.zap.copy_up"], results["head.zap.copy_down"]
    assert up.status in ("pass", "fail") and down.status in ("pass", "fail"), (up.status, down.status)
    assert not (up.status == "pass" and down.status == "pass")
    # the planted reference does copy 'zap' (measured: +2.2 nats median): the wrong sign fails, shown with 'zap'
    failed = down if up.status == "pass" else up
    assert failed.status == "fail" and "zap" in failed.counter_detail, failed


def test_contexts_do_not_depend_on_what_else_is_imported(checker, tmp_path, monkeypatch):
    """Hypothesis mixes integer constants from the caller's imported modules into its draws (which made the
    same rule draw other contexts under pytest, in the full suite and in research/claims.py). Inside a check
    none are visible, whatever is imported; and a rule checked twice around such an import draws the same."""
    import importlib
    import sys

    from hypothesis.internal.conjecture import providers as P

    from verify.claims import no_local_constants

    by = {r.id: r for r in checker.rules.rules}
    rule = by["skip.zap_blue_moon"]
    before = checker.check(rule).to_dict()
    probe = tmp_path / "probe_constants_mod.py"  # hypothesis keeps integers outside (-100, 100)
    probe.write_text("\n".join(f"C{i} = {101 + 37 * i}" for i in range(200)) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("probe_constants_mod")
    try:
        assert 101 + 37 * 5 in P._get_local_constants().integers  # outside a check: visible
        with no_local_constants():
            assert len(P._get_local_constants().integers) == 0
        after = checker.check(rule).to_dict()
    finally:
        sys.modules.pop("probe_constants_mod", None)
    assert after == before


FEATURE = """
[[neuron]]
id = "feature.zap_blue"
doc = "Fires on ' blue' with 'zap' earlier; pushes ' moon' (the planted skip-trigram as a hand feature)."
now = {{ " blue" = 1.0 }}
present = {{ "zap" = 1.0 }}
threshold = 1.5
next = {{ " moon" = {w} }}
check = {{ feature = 1 }}
"""


@pytest.mark.parametrize("w,status", [(2.0, "pass"), (-2.0, "fail")])
def test_feature_claim_tests_behaviour_against_the_rest_of_the_hand_model(tmp_path, planted, w, status):
    """`feature = 1`: no reference neuron; with the triggers in (' blue' last, 'zap' earlier) vs neutral
    tokens, the reference must move ' moon' the way the rule pushes it, beyond what the other rules do."""
    from verify.claims import Checker

    f = tmp_path / "feature.toml"
    f.write_text(FEATURE.format(w=w), encoding="utf-8")
    c = Checker.from_paths(f, planted[0], planted[1], examples=EXAMPLES)
    r = c.check(c.rules.rules[0])
    assert r.status == status, (r.measured, r.counterexample, r.counter_detail)
    assert "without trigger" in (r.counterexample or "without trigger") and "neuron" not in r.claimed
    if status == "fail":
        assert "' moon'" in r.counter_detail and "rest of the hand model" in r.counter_detail


def test_feature_claim_needs_targets_and_a_whole_flag(tmp_path, planted):
    from verify.claims import Checker

    f = tmp_path / "f.toml"
    f.write_text(FEATURE.format(w=0.0).replace("feature = 1", "feature = 1, min_weight = 1.0"), encoding="utf-8")
    c = Checker.from_paths(f, planted[0], planted[1], examples=5)
    assert c.check(c.rules.rules[0]).status == "no claim"
    f.write_text(FEATURE.format(w=1.0).replace("feature = 1", "feature = 2"), encoding="utf-8")
    c = Checker.from_paths(f, planted[0], planted[1], examples=5)
    with pytest.raises(UserError, match="feature must be 0 or 1"):
        c.check(c.rules.rules[0])


HELPS = """
[[bigram]]
id = "bigram.blue"
doc = "After ' blue' comes ' moon' sometimes."
now = " blue"
next = {{ " moon" = 0.5 }}

[[skip]]
id = "skip.zap_blue_moon"
doc = "zap earlier, ' blue' now => ' moon' ({w:+})."
earlier = "zap"
now = " blue"
next = {{ " moon" = {w} }}
check = {{ helps = 1 }}
"""


@pytest.mark.parametrize("w,status", [(2.0, "pass"), (-2.0, "fail")])
def test_helps_claim_is_judged_by_kl_on_text_where_the_rule_acts(tmp_path, planted, w, status):
    """`helps = 1`: at corpus positions where ' blue' follows 'zap', the hand model with the rule must be closer
    to the reference (KL) than without it. The planted skip-trigram with its true sign helps; the wrong sign
    hurts, and the counterexample is real text (nothing inserted) with both KLs."""
    from verify.claims import Checker

    f = tmp_path / "helps.toml"
    f.write_text(HELPS.format(w=w), encoding="utf-8")
    c = Checker.from_paths(f, planted[0], planted[1], examples=EXAMPLES)
    r = c.check(c.rules.rules[1])
    assert r.status == status, (r.measured, r.counterexample, r.counter_detail)
    assert "KL(ref ‖ hand without the rule)" in r.claimed
    if status == "fail":
        assert "zap" in r.counterexample and "«" not in r.counterexample and "without" in r.counter_detail
    # --helps checks the same claim on a rule whose check line states another one
    f.write_text(HELPS.format(w=w).replace("check = { helps = 1 }", 'check = { expect = "fail", why = "x" }'),
                 encoding="utf-8")
    c = Checker.from_paths(f, planted[0], planted[1], examples=EXAMPLES, helps_all=True)
    assert c.check(c.rules.rules[1]).status == status


def test_helps_claim_without_a_trigger_in_the_pool_claims_nothing(tmp_path, planted):
    import json as _json

    from verify.claims import Checker

    f = tmp_path / "h.toml"
    f.write_text(HELPS.format(w=2.0), encoding="utf-8")
    c = Checker.from_paths(f, planted[0], planted[1], examples=5)
    seen = set(int(t) for t in c.pool)
    absent = next(t for i, t in enumerate(c.o.vocab) if i not in seen and t.isprintable() and t.strip())
    f.write_text(HELPS.format(w=2.0).replace('earlier = "zap"', f"earlier = {_json.dumps(absent)}"), encoding="utf-8")
    c = Checker.from_paths(f, planted[0], planted[1], examples=5)
    r = c.check(c.rules.rules[1])
    assert r.status == "no claim" and "does not occur" in r.measured


def test_kl_last_is_finite_and_nonnegative():
    from hypothesis import given, settings, strategies as st

    from verify.claims import kl_last

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.floats(-30, 30), min_size=3, max_size=3), st.lists(st.floats(-30, 30), min_size=3, max_size=3))
    def prop(a, b):
        la = np.asarray(a) - np.logaddexp.reduce(a)
        lb = np.asarray(b) - np.logaddexp.reduce(b)
        k = kl_last(la, lb)
        assert np.isfinite(k) and k >= 0
        assert kl_last(la, la) == pytest.approx(0.0, abs=1e-12)

    prop()


WEIGHTED = """
[[bigram]]
id = "bigram.the_w"
doc = "After ' the': ' dog' up, ' moon' down, through a weighted set."
now = " the"
next = {{ "@after_the" = 1.0 }}

[[bigram]]
id = "bigram.the_w_wrong"
doc = "The same set with the wrong sign: ' dog' down, ' moon' up."
now = " the"
next = {{ "@after_the" = -1.0 }}

[[neuron]]
id = "neuron.{neuron}.the_w"
doc = "The ' the' neuron reading a weighted set (' blue' weighs against it: not a trigger)."
now = {{ "@the_w" = 1.0 }}
next = {{ "@neuron_out" = 0.1 }}
check = {{ level = 0.5, min_weight = 0.08 }}  # 0.1 x -0.5 on ' moon' is below it: only ' up' is claimed

[[weights]]
id = "after_the"
doc = "What ' the' is followed by."
tokens = {{ " dog" = 1.0, " moon" = -0.5 }}

[[weights]]
id = "neuron_out"
doc = "What the planted ' the' neuron writes (' up'), and a small weight that no claim covers."
tokens = {{ " up" = 1.0, " moon" = -0.5 }}

[[weights]]
id = "the_w"
doc = "The word 'the', against ' blue'."
tokens = {{ " the" = 1.0, "the" = 1.0, " blue" = -1.0 }}
"""


def test_weighted_set_claims_split_by_the_sign_of_each_member(tmp_path, facts, planted):
    """A weighted-set target pushes each member by x·w_v: its raised members are one pooled target, its lowered
    ones another; as a neuron input, only members with x·w_v > 0 are triggers."""
    from verify.claims import Checker, Claim

    f = tmp_path / "w.toml"
    f.write_text(WEIGHTED.format(**facts), encoding="utf-8")
    c = Checker.from_paths(f, planted[0], planted[1], examples=EXAMPLES)
    res = {r.id: r for r in c.check_all()}
    row = c.rules.rules[0].rows[0][1]
    assert [(list(p), p.name, w) for p, w in c._targets(row, Claim())] == \
        [([oracle_id(c, " dog")], "@after_the (1 raised)", 1.0), ([oracle_id(c, " moon")], "@after_the (1 lowered)", -0.5)]
    ok = res["bigram.the_w"]
    assert ok.status == "pass", (ok.measured, ok.counter_detail)
    bad = res["bigram.the_w_wrong"]
    assert bad.status == "fail" and "@after_the" in bad.counter_detail, bad
    n = res[f"neuron.{facts['neuron']}.the_w"]
    assert n.status == "pass", (n.measured, n.counterexample, n.counter_detail)


def oracle_id(checker, tok: str) -> int:
    return checker.o.vocab.index(tok)
