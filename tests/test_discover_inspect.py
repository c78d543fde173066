"""`handmodel inspect` on a tiny reference trained on text with planted regularities (tests/planted.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from handmodel.errors import UserError


def test_token_tables(oracle, planted):
    from verify.discover.common import resolve_token
    from verify.discover.inspect import inspect_token

    d = inspect_token(oracle, resolve_token(oracle.vocab, " the"), planted[1], k=3, n_tokens=2048)
    dp = d["direct_path"]  # (in this tiny model attention carries much of the bigram, so no claim on the top token)
    assert [r["value"] for r in dp["boosted"]] == sorted([r["value"] for r in dp["boosted"]], reverse=True)
    assert dp["boosted"][0]["value"] > dp["suppressed"][0]["value"] and sum(r["prob"] for r in dp["boosted"]) <= 1.0001
    assert d["occurrences"] > 0 and len(d["heads"]) == oracle.cfg.n_heads
    assert len(d["neurons"]) == 3


def test_head_profile_sums_to_one_and_finds_skip_trigram(oracle, planted):
    from verify.discover.inspect import inspect_head
    from planted import A_TOKEN, B

    found = False
    for h in range(oracle.cfg.n_heads):
        d = inspect_head(oracle, h, planted[1], k=5, n_tokens=4096, max_dist=8)
        assert sum(d["profile"]) + d["profile_rest"] == pytest.approx(1.0, abs=2e-3)  # entries are rounded to 4 decimals
        found |= any(p["dst"] == B and p["src"] == A_TOKEN for p in d["qk_top_pairs"])
        assert all({"src", "dst", "out", "bug"} <= set(r) for r in d["skip_trigrams"])
    assert found, "some head's top QK pair should be the planted ' blue' <- 'zap'"


def test_neuron_ablation_and_json_cli(planted, capsys):
    from verify.cli import main

    rc = main(["inspect", "neuron", "3", "--checkpoint", str(planted[0]), "--train-corpus", str(planted[1]),
               "--tokens", "1024", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    a = d["ablation"]
    assert a["ce_zero_ablated"] - a["ce"] == pytest.approx(a["loss_cost"], abs=1e-4)
    assert a["kl_ref_to_ablated"] >= 0 and 0 <= d["fires_fraction"] <= 1
    assert len(d["output_boosted"]) == 10 and d["top_contexts"][0]["act"] == pytest.approx(d["max_act"], abs=1e-3)


def test_rich_tables_render(planted, capsys):
    from verify.cli import main

    assert main(["inspect", "token", " blue", "--checkpoint", str(planted[0]), "--train-corpus", str(planted[1]),
                 "--tokens", "1024", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "direct path" in out and "neurons it drives" in out


@pytest.mark.parametrize("args, needle", [
    (["token", " bluee"], "did you mean ' blue'"),
    (["token", "#99999"], "out of range"),
    (["head", "7"], "head 7 does not exist"),
    (["neuron", "100000"], "neuron 100000 does not exist"),
])
def test_bad_input_is_a_clear_error(planted, capsys, args, needle):
    from verify.cli import main

    rc = main(["inspect", args[0], args[1], "--checkpoint", str(planted[0]), "--train-corpus", str(planted[1]), "--tokens", "512"])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_resolve_token_accepts_escapes_and_ids(oracle):
    from verify.discover.common import resolve_token

    assert resolve_token(oracle.vocab, "#5") == 5
    assert resolve_token(oracle.vocab, "\\n") == oracle.vocab.index("\n") if "\n" in oracle.vocab else True
    with pytest.raises(UserError, match="not in the vocabulary"):
        resolve_token(oracle.vocab, "qqqqqq")
    assert np.isfinite(oracle.direct_path([0])).all()
