"""`handmodel catalog`: generated from the rule files, every rule listed with doc, numbers and ΔKL."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from test_verify_core import BIGRAMS, PRIOR, write_rules


def test_catalog_lists_every_rule_with_its_ablation(tiny_world, tmp_path):
    from verify.ledger.evaluate import evaluate

    ckpt, evalf, train = tiny_world
    bad = BIGRAMS + '\n[[bigram]]\nid = "wrong"\ndoc = "deliberately | wrong"\nnow = " the"\nnext = { "!" = 9.0 }\n'
    rules = write_rules(tmp_path / "r", {"10_prior.toml": PRIOR, "20_bigrams.toml": bad})
    out = tmp_path / "CATALOG.md"
    r = subprocess.run([sys.executable, "-m", "verify.cli", "catalog", "--rules", str(rules), "--checkpoint", str(ckpt),
                        "--corpus", str(evalf), "--train-corpus", str(train), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    res = evaluate(ckpt, rules, evalf, 4, 0, train, ablate=True, log=lambda m: None)
    for a in res.ablation:
        assert f"`{a['rule']}`" in text
        assert f"{a['delta']:+.5f}" in text
    assert "deliberately \\| wrong" in text  # table cells are escaped
    assert "⚠" in text.split("\n| `wrong` |")[1].splitlines()[0]  # removal improves KL: flagged
    assert text.index("## prior") < text.index("## bigrams")
    assert f"{res.final['kl']:.4f}" in text


def test_catalog_bad_rules_folder(tiny_world, tmp_path):
    ckpt, evalf, train = tiny_world
    r = subprocess.run([sys.executable, "-m", "verify.cli", "catalog", "--rules", str(tmp_path / "none"),
                        "--checkpoint", str(ckpt), "--corpus", str(evalf), "--train-corpus", str(train)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "rules folder not found" in r.stderr and "Traceback" not in r.stderr


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_catalog_lists_weighted_sets_apart_from_classes(tmp_path):
    """Weighted sets ([[weights]]) get their own table: size and the largest weights; the header counts both kinds."""
    from handmodel import load_rules
    from verify.reports.catalog import catalog_markdown

    (tmp_path / "r.toml").write_text('[[class]]\nid = "ab"\ndoc = "a and b"\ntokens = ["a", "b"]\n'
                                     '[[weights]]\nid = "w"\ndoc = "mostly c"\ntokens = { "c" = -3.0, "@ab" = 0.5, "b" = 1.0 }\n'
                                     '[[prior]]\nid = "p"\ndoc = "d"\nnext = { "@w" = 1.0 }\n')
    rules = load_rules(tmp_path, ["a", "b", "c", "d"])
    res = {"header": {"eval_set": "e", "n_tokens": 1, "checkpoint_hash": "h", "n_rules": 1, "n_groups": 1},
           "final": {"kl": 0.5, "explained": 0.1, "top1": 0.2}, "ledger": [],
           "ablation": [{"rule": "p", "delta": 0.1, "doc": "d"}]}
    text = catalog_markdown(res, rules, tmp_path, "handmodel catalog")
    assert "4 explicit numbers, 1 token classes, 1 weighted token sets" in text
    assert "| `@ab` | 2 | a and b |" in text
    assert "## Weighted token sets" in text and "| `@w` | 3 | 'c' -3.00, 'b' +1.50, 'a' +0.50 | mostly c |" in text
    assert "`@w` |" not in text.split("## Weighted token sets")[0]  # not listed as a class


# -- the long tail (issue 20): explained against the first n rules switched on, largest ΔKL first ----------
WRONG = '\n[[bigram]]\nid = "wrong"\ndoc = "deliberately wrong"\nnow = " the"\nnext = { "!" = 9.0 }\n'


def _tail_rules(d, ref, vocab):
    """A small ruleset that explains part of the tiny reference (read off its eval log-probs: a test
    fixture, not a reported number): a prior, 12 bigram rows of decreasing weight, one rule that hurts."""
    import json

    def q(t):
        return json.dumps("@" + t if t.startswith("@") else t)

    lp, tok = np.asarray(ref.logp, np.float64), np.asarray(ref.tokens)
    mean = np.log(np.exp(lp).mean(0))
    prior = 'group = "prior"\n[[prior]]\nid = "mean"\ndoc = "the mean"\nnext = {' + \
        ", ".join(f"{q(vocab[v])} = {mean[v] - mean.min():.3f}" for v in range(len(vocab))) + "}\n"
    rows = []
    for c in np.argsort(-np.bincount(tok, minlength=len(vocab)), kind="stable")[:12]:
        m = np.log(np.exp(lp[tok == c]).mean(0)) - mean
        rows.append(f'[[bigram]]\nid = "after{c}"\ndoc = "after {c}"\nnow = {q(vocab[c])}\nnext = {{'
                    + ", ".join(f"{q(vocab[v])} = {m[v]:.3f}" for v in np.argsort(-m)[:40]) + "}\n")
    return write_rules(d, {"10_prior.toml": prior, "20_bigrams.toml": 'group = "bigrams"\n' + "".join(rows) + WRONG})


@pytest.fixture(scope="module")
def tail_world(tiny_world, tmp_path_factory):
    """The tiny reference, 14 rules (one that hurts), evaluated with the ablation; a private cache."""
    ckpt, evalf, train = tiny_world
    d = tmp_path_factory.mktemp("tail")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HANDMODEL_CACHE", str(d / "cache"))
        from verify.ledger.evaluate import evaluate

        ev = evaluate(ckpt, write_rules(d / "r0", {"10_prior.toml": PRIOR}), evalf, 4, 0, train, log=lambda m: None)
        rules = _tail_rules(d / "r", ev.ref, ev.vocab)
        ev = evaluate(ckpt, rules, evalf, 4, 0, train, ablate=True, log=lambda m: None)
    kl_uni = next(b["kl"] for b in ev.baselines if b["name"] == "unigram")
    assert ev.final["explained"] > 0.1  # the levels are defined (a positive all-rules figure)
    return ev, kl_uni, rules, d


def _direct(ev, mask) -> float:
    return float(np.mean(ev.hand.stream_metrics(ev.ref.seqs, ev.ref.logp, mask)["kl"]))


def test_prefix_sizes_are_log_spaced_and_end_at_n():
    from verify.reports.longtail import prefix_sizes

    s = prefix_sizes(1428)
    assert s[0] == 1 and s[-1] == 1428 and s == sorted(set(s)) and 16 <= len(s) <= 24
    ratios = np.diff(np.log(s))[3:]  # past the rounding at the small end: even steps in log n
    assert ratios.max() / ratios.min() < 1.6
    assert prefix_sizes(4) == [1, 2, 3, 4] and prefix_sizes(1) == [1] and prefix_sizes(0) == []


def test_rule_order_is_by_delta_then_file_order():
    from types import SimpleNamespace

    from verify.reports.longtail import rule_order

    rules = SimpleNamespace(rule_ids=["a", "b", "c", "d", "e"])
    ab = [{"rule": "c", "delta": 0.5}, {"rule": "a", "delta": 0.1}, {"rule": "d", "delta": 0.1}, {"rule": "b", "delta": -0.2}]
    assert rule_order(rules, ab) == [2, 0, 3, 1, 4]  # e: no ablation, last


def test_level_counts_take_the_first_measured_crossing():
    """Not monotone: the count is the first measured prefix at or above the level, a later dip aside."""
    from verify.reports.longtail import LongTailPoint, level_counts

    pts = [LongTailPoint("all", n, 10 * n, 1.0, e, 0.5, f"r{n}") for n, e in ((1, 0.55), (2, 0.3), (4, 0.8), (8, 0.7), (16, 1.0))]
    got = {c.level: (c.n_rules, c.n_numbers, c.after) for c in level_counts("all", pts[::-1], 1.0)}
    assert got == {0.5: (1, 10, 0), 0.8: (4, 40, 2), 0.9: (16, 160, 8)}
    low = level_counts("verified", pts[:2], 1.0)
    assert [(c.n_rules, c.best, c.target) for c in low] == [(1, 0.55, 0.5), (None, 0.55, 0.8), (None, 0.55, 0.9)]
    assert all(c.n_rules is None for c in level_counts("all", pts, -0.2))  # no positive final figure: undefined


def test_long_tail_points_are_real_engine_passes(tail_world):
    from verify.reports.longtail import LEVELS, long_tail, rule_order

    ev, kl_uni, _, _ = tail_world
    ids = list(ev.rules.rule_ids)
    order = rule_order(ev.rules, ev.ablation)
    assert ids[order[0]] == "mean" and ids[order[-1]] == "wrong"  # the prior removes most; the rule that hurts: last
    assert [ids[i] for i in order] == [a["rule"] for a in sorted(ev.ablation, key=lambda a: -a["delta"])]
    ver = np.array([r in ("mean", ids[order[5]], ids[order[9]], "wrong") for r in ids])
    lt = long_tail(ev.hand, ev.rules, ev.ref, kl_uni, ev.ablation, ver, k=8, cache=False)
    assert lt.order == [ids[i] for i in order] and lt.n_verified == 4
    allc, verc = lt.curve("all"), lt.curve("verified")
    assert [p.n_rules for p in allc] == [1, 2, 3, 5, 7, 10, 14] and [p.n_rules for p in verc] == [1, 2, 3, 4]
    assert lt.passes == len(allc) + len(verc)
    # the full point is the ledger's all-rules row; the verified full point a pass with the verified mask
    assert allc[-1].kl == pytest.approx(ev.final["kl"], rel=1e-9, abs=1e-12)
    assert lt.final_explained == pytest.approx(ev.final["explained"], rel=1e-6)  # KL_unigram: float64 vs float32 mean
    assert verc[-1].kl == pytest.approx(_direct(ev, ver), rel=1e-9, abs=1e-12)
    # every point: a pass with exactly the curve's first n rules on
    vorder = [i for i in order if ver[i]]
    nums = np.asarray(ev.rules.rule_numbers)
    for pts, seq in ((allc, order), (verc, vorder)):
        for p in pts:
            m = np.zeros(len(ids), bool)
            m[seq[: p.n_rules]] = True
            assert p.kl == pytest.approx(_direct(ev, m), rel=1e-9, abs=1e-12)
            assert p.explained == pytest.approx(1 - p.kl / kl_uni)
            assert p.n_numbers == int(nums[m].sum()) and p.last_rule == ids[seq[p.n_rules - 1]]
    # 50/80/90%: the first measured point at or above level × final, never an earlier one
    for c in lt.levels:
        pts = lt.curve(c.curve)
        assert c.target == pytest.approx(c.level * lt.final_explained)
        if c.n_rules is None:
            assert all(p.explained < c.target for p in pts) and c.best == max(p.explained for p in pts)
            continue
        k = [p.n_rules for p in pts].index(c.n_rules)
        assert pts[k].explained >= c.target and all(p.explained < c.target for p in pts[:k])
        assert c.n_numbers == pts[k].n_numbers and c.after == (pts[k - 1].n_rules if k else 0)
    assert {(c.curve, c.level) for c in lt.levels} == {(cv, lv) for cv in ("all", "verified") for lv in LEVELS}
    assert lt.level("all", 0.5).n_rules > 1 and lt.level("all", 0.9).n_rules is not None  # the prior alone: < 50%
    # the verified rules never get to 90% of the all-rules figure: said, not guessed
    assert lt.level("verified", 0.9).n_rules is None and lt.level("verified", 0.9).best == max(p.explained for p in verc)


def test_long_tail_cache_and_no_verdicts(tail_world, monkeypatch):
    """Rows come back from the ledger's row cache unchanged; no verdicts: an empty verified curve."""
    from verify.reports.longtail import long_tail

    ev, kl_uni, _, d = tail_world
    monkeypatch.setenv("HANDMODEL_CACHE", str(d / "cache"))
    a = long_tail(ev.hand, ev.rules, ev.ref, kl_uni, ev.ablation, None)
    b = long_tail(ev.hand, ev.rules, ev.ref, kl_uni, ev.ablation, None)
    # the prior alone and all rules are the ledger's own rows ("+ prior", "+ bigrams"): cached; then every row is
    assert a.passes == len(a.points) - 2 and b.passes == 0
    assert [(p.kl, p.n_rules) for p in a.points] == [(p.kl, p.n_rules) for p in b.points]
    assert b.curve("verified") == [] and all(c.n_rules is None for c in b.levels if c.curve == "verified")


def test_long_tail_svg_and_markdown(tail_world):
    import xml.etree.ElementTree as ET

    from verify.reports.catalog import catalog_markdown
    from verify.reports.longtail import long_tail, long_tail_svg

    ev, kl_uni, rules, _ = tail_world
    ver = np.array([r in ("mean", "wrong") for r in ev.rules.rule_ids])
    lt = long_tail(ev.hand, ev.rules, ev.ref, kl_uni, ev.ablation, ver, k=6, cache=False, verdicts_note="test verdicts")
    svg = long_tail_svg(lt, "eval.txt")
    root = ET.fromstring(svg)  # well-formed, standalone
    ns = "{http://www.w3.org/2000/svg}"
    panels = root.findall(f"{ns}g")
    assert [p.get("data-x") for p in panels] == ["n_rules", "n_numbers"]
    for p in panels:
        assert len([e for e in p.iter(f"{ns}line") if e.get("class") == "level"]) == 3
        for curve in ("all", "verified"):
            assert len([e for e in p.iter(f"{ns}circle") if e.get("class") == f"point-{curve}"]) == len(lt.curve(curve))
            assert len([e for e in p.iter(f"{ns}polyline") if e.get("class") == f"curve-{curve}"]) == 1
    texts = " ".join(t.text or "" for t in root.iter(f"{ns}text"))
    for want in ("rules switched on (log scale)", "explicit numbers of those rules (log scale)", "KL explained",
                 "50% of all rules", "80% of all rules", "90% of all rules", "not measured"):
        assert want in texts
    text = catalog_markdown(ev.to_json(), ev.rules, rules, "handmodel catalog", long_tail=lt)
    sec = text.split("## Long tail")[1].split("\n## ")[0]
    assert "![long tail](long_tail.svg)" in sec and "not measured" in sec and "test verdicts" in sec
    for c in lt.levels:
        cells = f"| {c.curve} | {int(100 * c.level)}% | {100 * c.target:.1f}% | "
        want = "not reached | not reached" if c.n_rules is None else f"{c.n_rules:,} | {c.n_numbers:,}"
        assert cells + want in sec
    for p in lt.points:
        assert f"| {p.curve} | {p.n_rules:,} | {p.n_numbers:,} | {p.kl:.4f} |" in sec
    assert text.index("## Long tail") < text.index("## prior")
    assert "not reached" in sec and "best measured" in sec  # two verified rules do not reach 90%


def test_catalog_cli_writes_long_tail(tail_world, tiny_world, tmp_path):
    import json

    ckpt, evalf, train = tiny_world
    ev, _, rules, d = tail_world
    out = tmp_path / "CATALOG.md"
    r = subprocess.run([sys.executable, "-m", "verify.cli", "catalog", "--rules", str(rules), "--checkpoint", str(ckpt),
                        "--corpus", str(evalf), "--train-corpus", str(train), "--out", str(out),
                        "--json-out", str(tmp_path / "c.json")], capture_output=True, text=True,
                       env={**__import__("os").environ, "HANDMODEL_CACHE": str(d / "cache")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "long_tail.svg").read_text().startswith("<svg")
    lt = json.loads((tmp_path / "c.json").read_text())["long_tail"]
    assert lt["n_rules"] == 14 and lt["n_verified"] == 0  # no verdicts cached for this world
    assert "check-components" in lt["verdicts"]
    full = [p for p in lt["points"] if p["curve"] == "all" and p["n_rules"] == 14]
    assert full[0]["kl"] == pytest.approx(ev.final["kl"], rel=1e-9)
    text = out.read_text()
    assert "| verified | 50% |" in text and "not reached" in text and "long tail" in " ".join(r.stderr.split())
    r = subprocess.run([sys.executable, "-m", "verify.cli", "catalog", "--rules", str(rules), "--out", str(out),
                        "--long-tail-points", "-1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--long-tail-points" in r.stderr and "Traceback" not in r.stderr
