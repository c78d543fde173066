"""The verified ledger (verify/claims/verified.py): verdicts cached per rule (keyed by what its checks read),
verified on read; unverified rules switched off; `verify` and `check-components` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from verify.claims.component import CheckResult, ComponentVerdict


def _verdicts():
    c = CheckResult("readout", "cosine", 0.5, 0.9, 0.8, 0.95, 12, 100, "pass")
    return [ComponentVerdict("a", "bigram", "the current token's direct path", "pass", [c]),
            ComponentVerdict("b", "neuron", "neuron 3", "fail", [c]),
            ComponentVerdict("c", "skip", None, "no component")]


def test_store_round_trip_merge_and_tamper():
    from verify.claims import verified as VF

    skey = VF.store_key("ckpt", {"kind": "corpus", "windows": 4})
    assert VF.load_store(skey) == {}
    vs = {f"k{i}": v.to_dict() for i, v in enumerate(_verdicts())}
    VF.save_store(skey, {"k0": vs["k0"]}, {})
    f = VF.save_store(skey, {"k1": vs["k1"], "k2": vs["k2"]}, {"checkpoint_hash": "ckpt"})  # merged, not replaced
    got = VF.load_store(skey)
    assert got == vs
    assert [ComponentVerdict.from_dict(got[k]).to_dict() for k in sorted(got)] == [v.to_dict() for v in _verdicts()]
    d = json.loads(f.read_text())
    d["entries"]["k1"]["verdict"] = "pass"  # an edited verdict no longer matches the store's digest
    f.write_text(json.dumps(d))
    assert VF.load_store(skey) == {}
    VF.save_store(skey, vs, {})
    other = VF.store_key("ckpt2", {"kind": "corpus", "windows": 4})
    VF.cache_path(other).write_text(VF.cache_path(skey).read_text())  # a store under the wrong name
    assert VF.load_store(other) == {}
    assert VF.counts(_verdicts())["all"] == {"pass": 1, "fail": 1, "undecided": 0, "no component": 1}


RULES = '''
[[head]]
id = "head0"
doc = "d"
position = { 0 = 1.0, 1 = 0.5 }
score = [{ now = "@all", src = " the", w = 1.0 }]

[[head_out]]
id = "head0.the"
doc = "d"
head = "head0"
src = " the"
next = { " cat" = 0.5 }

[[bigram]]
id = "after.the"
doc = "d"
now = " the"
next = { " cat" = 1.0, " dog" = 0.5 }

[[bigram]]
id = "after.cat"
doc = "d"
now = " cat"
next = { " sat" = 1.0 }
'''


def test_rule_keys_follow_what_each_check_reads(tmp_path):
    from handmodel import load_rules
    from verify.claims.verified import rule_keys
    from conftest import SMALL_VOCAB

    def keys(text, checks=None):
        (tmp_path / "r.toml").write_text(text, encoding="utf-8")
        return dict(zip(("head0", "head0.the", "after.the", "after.cat"),
                        rule_keys(load_rules(tmp_path, SMALL_VOCAB), checks or {})))

    k0 = keys(RULES)
    assert len(set(k0.values())) == 4
    # a comment, a doc or a rule moved down by a line changes no verdict
    assert keys("# note\n" + RULES.replace('doc = "d"', 'doc = "other words"', 1)) == k0
    # a number of one bigram row: only that row's verdict is stale
    k1 = keys(RULES.replace('" sat" = 1.0', '" sat" = 2.0'))
    assert [k for k in k0 if k0[k] != k1[k]] == ["after.cat"]
    # the head's attention: the head and the head_out reading it
    k2 = keys(RULES.replace("position = { 0 = 1.0, 1 = 0.5 }", "position = { 0 = 1.0, 1 = 0.7 }"))
    assert sorted(k for k in k0 if k0[k] != k2[k]) == ["head0", "head0.the"]
    # a head_out row: the row and the head (whose intervention reads what its readers write)
    k3 = keys(RULES.replace('next = { " cat" = 0.5 }', 'next = { " cat" = 0.6 }'))
    assert sorted(k for k in k0 if k0[k] != k3[k]) == ["head0", "head0.the"]
    # a rule's check table (it can name another component)
    k4 = keys(RULES, {"after.the": {"margin": 0.1}})
    assert [k for k in k0 if k0[k] != k4[k]] == ["after.the"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    import claims_world as CW
    from conftest import make_stories, write_corpus
    from reference.corpus import token_stream
    from reference.oracle import Oracle
    from verify.claims.measure import windows_of

    d = tmp_path_factory.mktemp("verified_world")
    ckpt = CW.build_reference(d / "ckpt", make_stories(200, 1))
    oracle = Oracle.load(ckpt)
    valid = write_corpus(d / "valid.txt", make_stories(40, 2))
    train = write_corpus(d / "train.txt", make_stories(40, 3))
    windows = windows_of(token_stream(oracle.tokenizer, make_stories(40, 2)), CW.N_CTX, 24)
    _, wrong = CW.derive(oracle, windows, n_src=2, n_rows=6)
    true, _ = CW.derive(oracle, windows, n_src=2, n_rows=6)
    rules = d / "rules"
    rules.mkdir()
    # a mixed ruleset: true bigram rows and the wrong ones (rows on another token), all in one group
    blocks = [b for b in true.split("\n[[") if b.startswith("bigram")] + \
             [b.replace('id = "bigram.', 'id = "wrong.bigram.') for b in wrong.split("\n[[") if b.startswith("bigram")]
    (rules / "rules.toml").write_text("\n".join("[[" + b for b in blocks), encoding="utf-8")
    return ckpt, rules, valid, train


def test_check_components_e2e(e2e, tmp_path, capsys):
    import re

    from verify.cli import main
    from verify.cli.components import run_verified

    from verify.claims.verified import DEFAULT_WINDOWS
    from verify.cli.ledger import DEFAULT_WINDOWS as CLI_WINDOWS

    assert CLI_WINDOWS == DEFAULT_WINDOWS
    ckpt, rules, valid, train = e2e
    common = ["--checkpoint", str(ckpt), "--rules", str(rules), "--train-corpus", str(train)]
    # verify before any check: every rule unverified, and it says so
    assert main(["verify", *common, "--corpus", str(valid), "--final-only", "--windows", "24"]) == 0
    out = capsys.readouterr().out
    assert "no current component verdict for any rule" in out and re.search(r"verified .* 0 of 18 rules", out)
    out_json = tmp_path / "v.json"
    assert main(["check-components", *common, "--corpus", str(valid), "--windows", "24", "--json-out", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    ver = res["verified"]
    assert ver["status"] == "computed"
    by = {v["id"]: v["verdict"] for v in res["component_verdicts"]}
    assert len(by) == ver["n_rules"] == 18  # 6 true rows, 12 wrong; a verdict for every rule (power: test_claims_power)
    assert ver["n_verified"] == sum(v == "pass" for v in by.values()) > 0
    assert ver["final"]["rules"] == ver["n_verified"]
    # verified rules carry part of the all-rules KL reduction; the rate is that share
    kl0, klv, kla = ver["kl_none"], ver["final"]["kl"], res["final"]["kl"]
    assert ver["kl_all"] == pytest.approx(kla)
    if kl0 > kla:
        assert ver["kl_weighted_pass_rate"] == pytest.approx((kl0 - klv) / (kl0 - kla))
    else:  # the wrong rows make all rules worse than none: no reduction to share out
        assert ver["kl_weighted_pass_rate"] is None
    assert klv != pytest.approx(kl0)  # the verified rows are on (alone, without a prior, they need not help here)
    # a second run reads the cache; a comment changes no verdict
    again = run_verified(ckpt, rules, valid, 24, train, compute=False, log=lambda *_: None)
    assert again["verified"]["status"] == "cached" and again["verified"]["n_verified"] == ver["n_verified"]
    f = rules / "rules.toml"
    text = f.read_text()
    f.write_text(text + "\n# edited\n")
    assert run_verified(ckpt, rules, valid, 24, train, compute=False, log=lambda *_: None)["verified"]["status"] == "cached"
    # one verified rule's numbers edited: that rule alone has no current verdict and is switched off
    first = next(i for i, v in by.items() if v == "pass")
    start = text.index(f'id = "{first}"')
    nxt = text.index("next = {", start)
    body_end = text.index("}", nxt)
    row = text[nxt:body_end]
    nums = re.findall(r"= (-?[0-9.]+)", row)
    edited = text[:nxt] + row.replace(f"= {nums[0]}", f"= {float(nums[0]) + 0.25}", 1) + text[body_end:]
    f.write_text(edited)
    stale = run_verified(ckpt, rules, valid, 24, train, compute=False, log=lambda *_: None)
    sv = stale["verified"]
    assert sv["status"] == "partial" and sv["missing"] == [first] and sv["n_verified"] == ver["n_verified"] - 1
    assert first in sv["unverified"]
    # verify --json carries the same section (rows from the row cache)
    capsys.readouterr()
    assert main(["verify", *common, "--corpus", str(valid), "--json", "--windows", "24"]) == 0
    vj = json.loads(capsys.readouterr().out)["verified"]
    assert vj["status"] == "partial" and vj["n_verified"] == sv["n_verified"]
    assert vj["final"]["kl"] == pytest.approx(sv["final"]["kl"])
    assert [r["name"] for r in vj["ledger"]] == ["(no rules)", "+ rules"]
    # check-components checks only the stale rule
    logs = []
    fresh = run_verified(ckpt, rules, valid, 24, train, compute=True, log=logs.append)
    assert fresh["verified"]["status"] == "computed" and fresh["verified"]["missing"] == []
    assert any("1 of 18 rules have no current verdict" in m for m in logs)
    f.write_text(text)
    assert np.isfinite(stale["final"]["kl"])


def test_train_text_is_refused(e2e):
    from handmodel.errors import UserError
    from verify.ledger.data import checkpoint_info
    from verify.claims.verified import valid_contexts

    ckpt, _, _, train = e2e
    with pytest.raises(UserError, match="training text"):
        valid_contexts(checkpoint_info(ckpt), train, 4)


def test_verdict_store_key_reads_the_check_sources(tmp_path, monkeypatch):
    """The store key hashes every file that computes a verdict (a glob matching nothing once let a changed check
    reuse old verdicts): each named source exists, and editing any of them, or the twin, changes the key."""
    import shutil

    from verify.claims import verified as VF

    here = Path(VF.__file__).parent
    root = here.parent.parent
    sources = [here / n for n in VF.CHECK_SOURCES] + [root / "handmodel" / "twin.py", root / "reference" / "model.py"]
    assert all(f.is_file() for f in sources)
    base = VF._code_hash()
    fake = tmp_path / "verify" / "claims"
    shutil.copytree(here, fake)
    shutil.copytree(root / "handmodel", tmp_path / "handmodel")
    shutil.copytree(root / "reference", tmp_path / "reference")
    monkeypatch.setattr(VF, "__file__", str(fake / "verified.py"))
    assert VF._code_hash() == base
    for f in [fake / n for n in VF.CHECK_SOURCES] + [tmp_path / "handmodel" / "twin.py"]:
        old = f.read_bytes()
        f.write_bytes(old + b"\n# changed\n")
        assert VF._code_hash() != base, f.name
        f.write_bytes(old)
    (tmp_path / "handmodel" / "kernels.py").write_bytes(b"# a speed change\n")  # the engine is held to the twin by tests
    assert VF._code_hash() == base
