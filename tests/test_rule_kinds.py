"""Every rule kind of the rule-file grammar is written in each place docs/architecture.md lists: the
twin (the numpy semantics), the compiler, the torch module, the claims and docs/rules.md. Cheap (reads
source text and tables), so a new kind that skips one of them fails here, not in a user's run."""
from __future__ import annotations

import inspect
import re

from conftest import ROOT


def _kinds() -> set[str]:
    from handmodel.rulefile import KEYS, NOT_RULES

    return set(KEYS) - set(NOT_RULES)


def _branches(fn) -> set[str]:
    """The kinds a function branches on (`kind == "x"`)."""
    return set(re.findall(r'kind == "(\w+)"', inspect.getsource(fn)))


def test_the_rule_kinds_are_known():
    assert _kinds() == {"prior", "bigram", "head", "head_out", "skip", "neuron"}


def test_every_kind_has_twin_semantics():
    from handmodel import twin

    assert _branches(twin.contributions) == _kinds()


def test_every_kind_has_a_torch_implementation():
    from verify.discover.torchrules import TorchRules

    assert _branches(TorchRules._build) == _kinds()


def test_every_kind_is_compiled():
    from handmodel.compiled import build_arrays

    src = inspect.getsource(build_arrays)
    missing = [k for k in _kinds() if f'"{k}"' not in src]
    assert not missing, f"handmodel/compiled.py build_arrays never mentions {missing}"


def test_every_kind_has_a_claim_and_a_documented_section():
    from verify.claims import PLANS

    assert set(PLANS) == _kinds()
    rules_md = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    claims_md = (ROOT / "docs" / "claims.md").read_text(encoding="utf-8")
    for k in _kinds():
        assert f"## [[{k}]]" in rules_md, f"docs/rules.md has no section for [[{k}]]"
        assert f"[[{k}]]" in claims_md, f"docs/claims.md never states the claim of [[{k}]]"
