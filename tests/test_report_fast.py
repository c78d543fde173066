"""The report's fast path (issue 22, item 5) equals the direct computation it replaced: per position the
top-5s by a full argsort, and the rules shown picked from HandModel.explain_batch's full records (each one
equal to the twin's: tests/test_handmodel_explain.py)."""
from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handmodel import HandModel
from test_handmodel_engine import cases, compile_text
from verify.reports import report as R


def direct_shown(rules, acted, shown: int) -> list[list[str]]:
    """The page's pick over full Fired records: the `shown` largest acts and the heads, in rule order."""
    keep = sorted(sorted(acted, key=lambda f: -f.size)[:shown], key=lambda f: f.rule)
    heads = [f for f in acted if rules.rule_kinds[f.rule] == "head" and f not in keep]
    out = [[str(rules.rule_ids[f.rule]), str(f.desc)] for f in sorted(keep + heads, key=lambda f: f.rule)]
    if len(acted) > len(out):
        out.append(["…", f"{len(acted) - len(out)} more rules changed the logits less"])
    return out


def direct_positions(ev, seqs, shown: int) -> list[dict]:
    """token_data's per-position records computed the slow, obvious way."""
    hm, rules, ref = ev.hand, ev.rules, ev.ref
    hand = hm.log_probs_batch(seqs)
    acted = hm.explain_batch(seqs)
    kl = np.asarray(ev.last["kl"], np.float64)
    pos, i = [], 0
    for s, hl in zip(seqs, hand):
        for t in range(len(s)):
            r = np.asarray(ref.logp[i], np.float32)
            rt, ht = np.argsort(-r)[:5], np.argsort(-hl[t])[:5]
            pos.append({"tok": int(s[t]), "t": t, "next": int(ref.next_tokens[i]), "kl": round(float(kl[i]), 5),
                        "ref": [[int(v), round(float(np.exp(r[v])), 4)] for v in rt],
                        "hand": [[int(v), round(float(np.exp(hl[t, v])), 4)] for v in ht],
                        "rules": direct_shown(rules, acted[i], shown)})
            i += 1
    return pos


def fake_evaluation(rules, seqs, seed: int):
    """What token_data reads of an Evaluation: reference log-probs (float16, coarse so that ties occur),
    next tokens, the hand model and the last row's KL."""
    rng = np.random.default_rng(seed)
    N, V = sum(len(s) for s in seqs), rules.vocab_size
    x = np.round(rng.normal(size=(N, V)) * 2) / 2  # many equal logits: top-5 ties
    logp = (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(np.float16)
    nxt = np.concatenate([np.append(np.asarray(s[1:], np.int64), -1) for s in seqs])
    ref = types.SimpleNamespace(seqs=seqs, logp=logp, next_tokens=nxt)
    return types.SimpleNamespace(ref=ref, hand=HandModel(rules), rules=rules, vocab=list(rules.vocab),
                                 last={"kl": rng.exponential(size=N)})


@settings(deadline=None, derandomize=True, max_examples=40, suppress_health_check=list(HealthCheck))
@given(cases(), st.integers(0, 3))
def test_token_data_equals_direct_computation(case, shown):
    vocab, files, seqs, seed = case
    rules = compile_text(vocab, files)
    ev = fake_evaluation(rules, seqs, seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R, "RULES_SHOWN", shown)  # few shown: the pick and the "… more rules" line matter
        data, n = R.token_data(ev, 10**9)
        want = direct_positions(ev, seqs, shown)
    assert n == len(want) == len(data["pos"])
    assert data["pos"] == want


@pytest.mark.parametrize("V", [3, 6, 7, 50, 4096])
def test_top5_is_the_full_sort_ties_included(V):
    rng = np.random.default_rng(V)
    m = np.concatenate([
        rng.normal(size=(200, V)).astype(np.float16).astype(np.float32),  # float16: some ties
        rng.integers(0, 4, size=(200, V)).astype(np.float32),  # ties everywhere
        np.zeros((3, V), np.float32),  # one value
        np.where(rng.random((20, V)) < 0.5, -np.inf, rng.normal(size=(20, V))).astype(np.float32),
    ])
    m[5, : min(V, 9)] = 7.0  # tied at the top
    assert np.array_equal(R.top5(m), np.argsort(-m, axis=1)[:, :5])
    assert R.top5(np.zeros((0, V), np.float32)).shape[0] == 0
