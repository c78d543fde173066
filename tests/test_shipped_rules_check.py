"""Every rule of the shipped ruleset (rules/) is a claim about the shipped reference (reference/default/):
one test per rule id, checked by `handmodel check-rules` logic (verify/claims/, docs/claims.md).

Needs ../shared's train.txt (the contexts the claims were recorded on): without it the file skips with the
reason (CI's HANDMODEL_REQUIRE_SHARED=1 makes that a failure). Budget: HANDMODEL_CHECK_EXAMPLES contexts per rule (default 10: the file stays fast); set it higher for
a deeper run. Rules marked `check = { expect = "fail", why = "..." }` are expected failures (strict: a
rule that starts to hold fails the test until the mark is removed); `expect = "none"` or a rule with no
testable claim is skipped with the reason. HANDMODEL_CHECK_RULES / HANDMODEL_CHECK_CHECKPOINT point the
file at another ruleset / checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_CORPUS, require

RULES = Path(os.environ.get("HANDMODEL_CHECK_RULES", ROOT / "rules"))
CHECKPOINT = Path(os.environ.get("HANDMODEL_CHECK_CHECKPOINT", ROOT / "reference" / "default"))
EXAMPLES = int(os.environ.get("HANDMODEL_CHECK_EXAMPLES", "10"))


def _rule_ids() -> tuple[list[str] | None, str]:
    """Rule ids in file order (read without the vocabulary, so collection needs no torch), or the reason there are none."""
    if not (CHECKPOINT / "model.safetensors").exists():
        return None, f"shipped model not trained yet ({CHECKPOINT}/model.safetensors is absent)"
    if not RULES.exists():
        return None, f"shipped ruleset not written yet ({RULES} is absent)"
    if not (SHARED_CORPUS / "train.txt").exists():
        # without the corpus the checker would draw its contexts from stories sampled from the reference, and
        # a behavioural claim's verdict depends on where its contexts come from (127 of the shipped verdicts
        # flip): the claims are recorded against train.txt contexts, so they are checked against those only
        return None, f"needs the shared corpus at {SHARED_CORPUS} (the claims were recorded on its train.txt contexts)"
    from handmodel.compiled import rule_file_paths
    from handmodel.errors import UserError
    from handmodel.rulefile import NOT_RULES, read_rule_file

    try:
        ids = [e.id for f in rule_file_paths(RULES) for e in read_rule_file(f)[1] if e.kind not in NOT_RULES]
    except UserError as e:
        return [], f"cannot read the shipped ruleset: {e}"
    return ids, "" if ids else f"{RULES} holds no rules"


IDS, REASON = _rule_ids()

if not IDS:
    if IDS is None:
        def test_shipped_rules_check():
            require(False, REASON)
    else:
        def test_shipped_rules_check():
            pytest.fail(REASON)
else:
    @pytest.fixture(scope="module")
    def checker():
        from verify.claims import Checker

        return Checker.from_paths(RULES, CHECKPOINT, SHARED_CORPUS / "train.txt", examples=EXAMPLES,
                                  shrink_calls=max(100, 5 * EXAMPLES))

    @pytest.fixture(scope="module")
    def rules_by_id(checker):
        return {r.id: r for r in checker.rules.rules}

    def _first_failure(plan, failing):
        """Checker._shrink without the shrinking: the first failing context drawn, as _shrink gives when no smaller one is found."""
        return (failing[0] if failing else None), False

    @pytest.mark.parametrize("rule_id", IDS)
    def test_shipped_rule(checker, rules_by_id, rule_id, monkeypatch):
        rule = rules_by_id[rule_id]
        if checker.checks.get(rule_id, {}).get("expect") == "fail":
            # A known-false rule's verdict (xfail, or xpass when it holds) is settled before any shrinking, and
            # its report below shows no counterexample: shrinking one (up to shrink_calls forward passes, a third
            # of this file's time) would be thrown away. A rule expected to pass still gets a minimal counterexample.
            monkeypatch.setattr(checker, "_shrink", _first_failure)
        res = checker.check(rule)
        report = (f"{res.where}: {res.kind} '{res.id}' {res.status}: claimed {res.claimed}; measured {res.measured}"
                  + (f"\n  counterexample: {res.counterexample}\n  {res.counter_detail}" if res.counterexample else ""))
        if res.status == "no claim":
            pytest.skip(f"no claim: {res.measured}")
        if res.status == "xfail":
            pytest.xfail(f"known false ({res.why or 'no reason given'}): {res.measured}")
        if res.status == "xpass":
            pytest.fail(f"{report}\n  marked expect = \"fail\" ({res.why}) but the claim holds: remove the mark")
        if res.status == "error":
            pytest.fail(f"{res.where}: {res.kind} '{res.id}' cannot be checked: {res.measured}")
        assert res.status == "pass", report
