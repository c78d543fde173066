"""`handmodel catalog`: generated from the rule files, every rule listed with doc, numbers and ΔKL."""
from __future__ import annotations

import subprocess
import sys

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
    assert "⚠" in text.split("`wrong`")[1].splitlines()[0]  # removal improves KL: flagged
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
