"""research/pockets.py's analyses on the small fixture ruleset with a made-up reference: the numbers it prints are
the ones computed directly here (no torch, no ../shared)."""
from __future__ import annotations

import re

import numpy as np

from handmodel import HandModel, load_rules
from research import pockets

from conftest import SMALL_RULES as FIXTURE, SMALL_VOCAB as VOCAB


def _world(seed=0):
    rng = np.random.default_rng(seed)
    hm = HandModel(load_rules(FIXTURE, VOCAB))
    seqs = [rng.integers(0, len(VOCAB), size=n).astype(np.int64) for n in (12, 30, 7)]
    seqs[1][5:9] = [2, 1, 4, 5]  # ' cat' ' the' ' ice' ' cream': the skip rule, the head_out and the neuron act
    logits = rng.normal(size=(sum(map(len, seqs)), len(VOCAB))) * 2
    ref = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)
    return hm, seqs, ref


def test_top1_misses_counts_what_stream_metrics_says(capsys):
    hm, seqs, ref = _world()
    met = hm.stream_metrics(seqs, ref)
    pockets.top1_misses(seqs, ref, met, VOCAB)
    out = capsys.readouterr().out
    assert f"top-1 agreement {met['agree'].mean():.3f}" in out
    assert f"the {(~met['agree']).sum():,} disagreements" in out
    shares = [float(x) for x in re.findall(r"([\d.]+)% of the disagreements", out)]
    assert len(shares) == 6 and abs(sum(shares[:4]) - 100) < 0.2 and abs(sum(shares[4:]) - 100) < 0.2
    miss = ~met["agree"]
    pair = (VOCAB[int(ref[miss][0].argmax())], VOCAB[int(met["hand_argmax"][miss][0])])
    assert f"{pair[0]!r}/{pair[1]!r}" in out


def test_rule_gains_reads_each_rule_ablation(capsys):
    hm, seqs, ref = _world()
    kl = hm.stream_metrics(seqs, ref)["kl"]
    pockets.rule_gains(hm, seqs, ref, kl, 5, n_first=2)
    out = capsys.readouterr().out
    rules = hm.rules.rules
    M = len(seqs[0]) + len(seqs[1])
    on = np.concatenate(hm.log_probs_batch(seqs[:2])).astype(np.float64)
    p_ref = np.exp(ref[:M].astype(np.float64))
    p_ref /= p_ref.sum(1, keepdims=True)
    checked = 0
    for i, r in enumerate(rules):
        fam = pockets.family(r)
        if fam not in ("bigram", "head_out", "copying", "neuron"):
            continue
        line = next(ln for ln in out.splitlines() if f" {r.id} " in ln)
        mask = np.ones(len(rules), dtype=bool)
        mask[i] = False
        d = hm.stream_metrics(seqs, ref, mask=mask)["kl"] - kl
        acts = np.abs(d) > 1e-7
        if not acts.any():
            assert "never acts" in line
            continue
        assert f"{acts.mean():.1%}" in line and f"{d[acts].sum() / len(d):+.5f}" in line
        # first order on the first two sequences: the rule's logit change against the reference minus the rest
        a = acts[:M]
        if not a.any():
            assert "n/a (does not act there)" in line
            continue
        off = np.concatenate(hm.log_probs_batch(seqs[:2], mask=mask)).astype(np.float64)
        dl = on - off
        right = ((p_ref - np.exp(off)) * (dl - dl.mean(1, keepdims=True))).sum(1)[a] > 0
        assert line.endswith(f"{right.mean():.0%} of {int(a.sum()):,}")
        checked += 1
    assert checked >= 2  # the fixture's sequences make several rules act in the first two


def test_tails_switch_off_the_end_of_each_family(capsys):
    hm, seqs, ref = _world()
    kl = hm.stream_metrics(seqs, ref)["kl"]
    pockets.tails(hm, seqs, ref, kl, 1)  # one number: each family's last rule alone
    out = capsys.readouterr().out
    rules = hm.rules.rules
    last_neuron = max(i for i, r in enumerate(rules) if r.kind == "neuron")
    mask = np.ones(len(rules), dtype=bool)
    mask[last_neuron] = False
    d = hm.stream_metrics(seqs, ref, mask=mask)["kl"].mean() - kl.mean()
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("neurons"))
    assert f"1 rules, {rules[last_neuron].numbers:6,} numbers: {d:+.4f} nats/token" in line


def test_census_counts_classes_and_weighted_sets_apart(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('''
[[class]]
id = "animals"
doc = "Animals."
tokens = [" cat", " dog"]

[[weights]]
id = "ends"
doc = "Sentence ends, weighted."
tokens = { "." = 1.0, " sat" = 0.5 }

[[head]]
id = "h"
doc = "Uniform head."

[[neuron]]
id = "n1"
doc = "Reads animals and ends."
now = { "@animals" = 1.0, "@ends" = 0.5 }
attend = { "h" = { "@ends" = 2.0 } }
next = { "@ends" = 1.0, " the" = 0.3 }

[[neuron]]
id = "n2"
doc = "Writes animals."
now = { " the" = 1.0 }
next = { "@animals" = 1.0 }
''', encoding="utf-8")
    pockets.census(load_rules(tmp_path, VOCAB))
    out = capsys.readouterr().out
    classes, weighted = out.split("weighted set entry")
    assert "now:    @animals 1" in classes and "next:   @animals 1" in classes and "@ends" not in classes
    assert "now:    @ends 1" in weighted and "attend: h → @ends 1" in weighted and "next:   @ends 1" in weighted
