"""The report's page cache (verify/reports/report.py): a warm report reads the positions it computed last
time, only under the same key, and a damaged entry is rebuilt, never used."""
from __future__ import annotations

import json

import pytest

from test_verify_core import BIGRAMS, PRIOR
from test_verify_report import HEADS
from verify.reports import report as R


def _evaluate(ckpt, rules, evalf, train):
    from verify.ledger.evaluate import evaluate

    return evaluate(ckpt, rules, evalf, 4, 0, train, log=lambda m: None)


@pytest.fixture()
def world(tiny_world, tmp_path, monkeypatch):
    ckpt, evalf, train = tiny_world
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in {"10_prior.toml": PRIOR, "20_bigrams.toml": BIGRAMS, "30_heads.toml": HEADS}.items():
        (rules / name).write_text(text, encoding="utf-8")
    monkeypatch.setenv("HANDMODEL_CACHE", str(tmp_path / "cache"))
    ev = _evaluate(ckpt, rules, evalf, train)
    return ev, (ckpt, rules, evalf, train)


def _no_compute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed the positions: the page cache was not used")
    monkeypatch.setattr(R, "_positions", boom)


def test_second_report_reads_the_cached_positions(world, monkeypatch):
    ev, _ = world
    fresh, n = R.token_data(ev, 200)
    first, n1 = R.token_data(ev, 200, cache=True)
    files = list((ev.ref.dir / "report").glob("*.json"))
    assert first == fresh and n1 == n and [f.stem for f in files] == [R.page_key(ev, 200)]
    with monkeypatch.context() as mp:
        _no_compute(mp)
        again, n2 = R.token_data(ev, 200, cache=True)
    assert again == fresh and n2 == n
    # --max-tokens is in the key: another page is computed
    other, _ = R.token_data(ev, 60, cache=True)
    assert len(other["pos"]) < len(fresh["pos"]) and len(list((ev.ref.dir / "report").glob("*.json"))) == 2


def test_verdict_marks_are_not_cached(world, monkeypatch):
    from verify.reports.verdicts import from_verdicts

    ev, _ = world
    R.token_data(ev, 200, cache=True)
    shown = sorted({rid for p in R.token_data(ev, 200)[0]["pos"] for rid, _ in p["rules"]} & set(ev.rules.rule_ids))
    vi = from_verdicts(ev.rules.rule_ids, None, command="handmodel check-components")
    monkeypatch.setattr(type(vi), "of", lambda self, rid: "pass")
    with monkeypatch.context() as mp:
        _no_compute(mp)
        data, _ = R.token_data(ev, 200, vi, cache=True)
    assert data["ver"] == {rid: "pass" for rid in shown} and shown


@pytest.mark.parametrize("damage", ["body", "key", "garbage", "truncated"])
def test_a_damaged_entry_is_rebuilt_never_used(world, damage, capsys):
    ev, _ = world
    fresh, _ = R.token_data(ev, 200, cache=True)
    f = ev.ref.dir / "report" / f"{R.page_key(ev, 200)}.json"
    head, body = f.read_bytes().split(b"\n", 1)
    if damage == "body":  # one position's KL changed, header kept
        data = json.loads(body)
        data["pos"][3]["kl"] += 1.0
        f.write_bytes(head + b"\n" + json.dumps(data).encode())
    elif damage == "key":  # another page's entry (its own checksum intact) under this name
        h = json.loads(head)
        h["key"] = "0" * 24
        f.write_bytes(json.dumps(h).encode() + b"\n" + body)
    elif damage == "garbage":
        f.write_bytes(b"\x00\xff not json")
    else:
        f.write_bytes(head + b"\n" + body[: len(body) // 2])
    capsys.readouterr()
    got, _ = R.token_data(ev, 200, cache=True)
    assert got == fresh
    assert "was damaged" in capsys.readouterr().err
    assert json.loads(f.read_bytes().split(b"\n", 1)[0])["key"] == R.page_key(ev, 200)  # rebuilt


def test_the_key_follows_the_rules(world):
    ev, (ckpt, rules, evalf, train) = world
    key = R.page_key(ev, 200)
    assert R.page_key(_evaluate(ckpt, rules, evalf, train), 200) == key  # same inputs, same key
    (rules / "30_heads.toml").write_text(HEADS.replace('" a" = 2.0', '" a" = 2.5'), encoding="utf-8")
    ev2 = _evaluate(ckpt, rules, evalf, train)
    assert R.page_key(ev2, 200) != key
    assert R.token_data(ev2, 200, cache=True)[0] == R.token_data(ev2, 200)[0]
