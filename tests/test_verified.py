"""The verified ledger (verify/claims/verified.py): verdict cache keyed by rule-file content and checkpoint,
verified on read; unverified rules switched off; `handmodel check-components` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from verify.claims.component import CheckResult, ComponentVerdict


def _verdicts():
    c = CheckResult("readout", "cosine", 0.5, 0.9, 0.8, 0.95, 12, 100, "pass")
    return [ComponentVerdict("a", "bigram", "the current token's direct path", "pass", [c]),
            ComponentVerdict("b", "neuron", "neuron 3", "fail", [c]),
            ComponentVerdict("c", "skip", None, "no component")]


def test_cache_round_trip_and_tamper():
    from verify.claims import verified as VF

    key = VF.claims_key("r" * 24, "ckpt", {"kind": "corpus", "windows": 4})
    assert VF.load_verdicts(key) is None
    f = VF.store_verdicts(key, _verdicts(), {"rules": "x"})
    got = VF.load_verdicts(key)
    assert [v.to_dict() for v in got] == [v.to_dict() for v in _verdicts()]
    d = json.loads(f.read_text())
    d["verdicts"][1]["verdict"] = "pass"  # an edited verdict no longer matches its digest
    f.write_text(json.dumps(d))
    assert VF.load_verdicts(key) is None
    VF.store_verdicts(key, _verdicts(), {})
    other = VF.claims_key("s" * 24, "ckpt", {"kind": "corpus", "windows": 4})
    VF.cache_path(other).write_text(VF.cache_path(key).read_text())  # an entry under the wrong name
    assert VF.load_verdicts(other) is None
    assert VF.counts(_verdicts())["all"] == {"pass": 1, "fail": 1, "undecided": 0, "no component": 1}


def test_rules_hash_follows_content(tmp_path):
    from verify.claims.verified import rules_hash

    (tmp_path / "a.toml").write_text('[[prior]]\nid = "p"\ndoc = "d"\nnext = { "a" = 1.0 }\n')
    h = rules_hash(tmp_path)
    (tmp_path / "a.toml").write_text('[[prior]]\nid = "p"\ndoc = "d"\nnext = { "a" = 2.0 }\n')
    assert rules_hash(tmp_path) != h


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


def test_check_components_e2e(e2e, tmp_path):
    from verify.cli import main
    from verify.cli.components import run_verified

    ckpt, rules, valid, train = e2e
    out = tmp_path / "v.json"
    assert main(["check-components", "--checkpoint", str(ckpt), "--rules", str(rules), "--corpus", str(valid),
                 "--train-corpus", str(train), "--windows", "24", "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    ver = res["verified"]
    assert ver["status"] == "computed"
    by = {v["id"]: v["verdict"] for v in res["component_verdicts"]}
    assert len(by) == ver["n_rules"] == 18  # 6 true rows, 12 wrong; a verdict for every rule (power: test_claims_power)
    assert ver["n_verified"] == sum(v == "pass" for v in by.values())
    assert ver["final"]["rules"] == ver["n_verified"]
    # verified rules carry part of the all-rules KL reduction; the rate is that share
    kl0, klv, kla = ver["kl_none"], ver["final"]["kl"], res["final"]["kl"]
    assert ver["kl_all"] == pytest.approx(kla)
    assert ver["kl_weighted_pass_rate"] == pytest.approx((kl0 - klv) / (kl0 - kla))
    assert klv < kl0
    # a second run reads the cache; an edited rule file leaves every rule unverified unless recomputed
    again = run_verified(ckpt, rules, valid, 24, train, compute=False, log=lambda *_: None)
    assert again["verified"]["status"] == "cached" and again["verified"]["n_verified"] == ver["n_verified"]
    f = rules / "rules.toml"
    f.write_text(f.read_text() + "\n# edited\n")
    stale = run_verified(ckpt, rules, valid, 24, train, compute=False, log=lambda *_: None)
    assert stale["verified"]["status"] == "missing" and stale["verified"]["n_verified"] == 0
    assert stale["verified"]["final"]["kl"] == pytest.approx(kl0)
    assert np.isfinite(stale["final"]["kl"])


def test_train_text_is_refused(e2e):
    from handmodel.errors import UserError
    from verify.ledger.data import checkpoint_info
    from verify.claims.verified import valid_contexts

    ckpt, _, _, train = e2e
    with pytest.raises(UserError, match="training text"):
        valid_contexts(checkpoint_info(ckpt), train, 4)
