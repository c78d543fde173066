"""`handmodel fit` (verify/discover/fit.py, slots.py, torchrules.py) on a tiny reference trained for seconds on
text with planted regularities (tests/planted.py; the same reference as test_discover_inspect)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from handmodel.errors import UserError

# Rule files written the way people write them: comments, blank lines, inline tables, a multi-line array,
# a [kind.key] sub-table, integers and exponents, one file with Windows line endings, one file of classes only.
CLASSES = """# token classes only: fit never touches this file
[[class]]
id = "animals"
doc = "animal nouns"
tokens = [" dog", " cat"]
"""
BASE = """# Base rates and bigrams for the planted text.
group = "base"

[[prior]]
id = "common"   # the most frequent words
doc = "frequent tokens"
next = { " the" = 1.0, "." = 1, " and" = 0.5 }

# bigram table with a class row
[[bigram]]
id = "walk"
doc = "the planted bigram walk"
rows = { " the" = { " dog" = 1.0, " big" = 0.5 }, "@animals" = { " ran" = 0.5, " sat" = 0.5, " blue" = 0.2 } }


[[bigram]]
id = "after_on"
doc = "on the"
now = " on"
next = { " the" = 1.0, "@animals" = -0.5 }    # trailing comment
"""
CONTEXT = """group = "context"

# a skip-trigram: zap ... blue -> moon
[[skip]]
id = "zap_moon"
doc = "after zap earlier, blue is followed by moon"
earlier = "zap"
now = " blue"
next = { " moon" = 1.0 }

[[head]]
id = "prevtok"
doc = "previous-token head"
position = { 0 = 0.0, 1 = 2.0, default = -1.0 }
score = [
  { now = " blue", src = "zap", w = 1.0 },  # look back for zap
]

[[head_out]]
id = "copy_zap"
doc = "blue attends to zap"
head = "prevtok"
src = "zap"
now = " blue"
next = { " moon" = 0.5 }

[[neuron]]
id = "n_end"
doc = "fires after sun and up: a full stop comes"
threshold = 0.5
now = { " sun" = 1.0, " up" = 1.0 }
present = { " the" = 0.1 }
attend = { prevtok = { " red" = 0.3 } }
next = { "." = 1.0 }
"""
EXTRA_CRLF = ("# written on Windows\r\ngroup = \"extra\"\r\n\r\n[[prior]]\r\nid = \"late\"\r\ndoc = \"sub-table form\"\r\n"
              "[prior.next]\r\n\" moon\" = 0   # an integer\r\n\" sun\" = -1.5e-1\r\n")
FILES = {"05_classes.toml": CLASSES, "10_base.toml": BASE, "20_context.toml": CONTEXT, "30_extra.toml": EXTRA_CRLF}

# For torchrules == engine: every rule kind and the awkward corners (an @all row, a token and a class holding it
# in one table, two heads, a neuron with no threshold, one with a negative threshold, skip/head_out without `now`).
EQUIV = CLASSES + """
[[class]]
id = "ends"
doc = "words a sentence ends on"
tokens = [" up", " sun", " moon"]

[[prior]]
id = "p"
doc = "prior"
next = { "." = 0.7, "@ends" = -0.3 }

[[bigram]]
id = "rows"
doc = "rows with classes and @all"
rows = { "@all" = { " the" = 0.25 }, "@animals" = { " ran" = 1.5, "@ends" = 0.5 }, " dog" = { " ran" = 0.5, "@animals" = -1.0, " dog" = 0.5 } }

[[bigram]]
id = "one"
doc = "one row"
now = " the"
next = { " dog" = 2.0, " big" = 1.0 }

[[skip]]
id = "sk"
doc = "zap earlier, blue now"
earlier = "zap"
now = " blue"
next = { " moon" = 2.5 }

[[skip]]
id = "sk_any"
doc = "after any animal, more animals"
earlier = "@animals"
next = { "@animals" = 0.4 }

[[head]]
id = "h0"
doc = "previous token, plus zap"
position = { 0 = -0.5, 1 = 2.0, 2 = 0.5, default = -1.0 }
score = [{ now = " blue", src = "zap", w = 3.0 }, { now = "@animals", src = " the", w = 1.0 }]

[[head]]
id = "h1"
doc = "uniform unless a class matches"
score = [{ src = "@ends", w = 1.5 }]

[[head_out]]
id = "ho0"
doc = "blue copies moon from zap"
head = "h0"
src = "zap"
now = " blue"
next = { " moon" = 1.0 }

[[head_out]]
id = "ho1"
doc = "attending to an ending predicts a full stop"
head = "h1"
src = "@ends"
next = { "." = 2.0, " and" = 0.5 }

[[head_out]]
id = "cp0"
doc = "h1 copies whatever it attends to"
head = "h1"
src = "@all"
copy = 0.8

[[head_out]]
id = "cp1"
doc = "an animal now copies the ending h0 attends to, and predicts and"
head = "h0"
src = "@ends"
now = "@animals"
copy = -0.6
next = { " and" = 0.3 }

[[head_out]]
id = "cp2"
doc = "blue copies zap back (conditional, copy only)"
head = "h0"
src = "zap"
now = " blue"
copy = 1.25

[[neuron]]
id = "n0"
doc = "thresholded"
threshold = 0.5
now = { " sun" = 1.0, "@animals" = 0.8 }
present = { " the" = 0.6, "zap" = -0.4 }
attend = { h0 = { " red" = 0.9 }, h1 = { "@ends" = 1.2 } }
next = { "." = 1.0, " and" = -0.5 }

[[neuron]]
id = "n1"
doc = "no threshold"
now = { " up" = 1.0 }
next = { " and" = 0.75 }

[[neuron]]
id = "n2"
doc = "fires with no input (negative threshold)"
threshold = -0.3
present = { " blue" = 1.0 }
next = { " hat" = 1.0 }
"""

NUM = re.compile(r"(?<![\w.\"'@-])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w\"'.])")


@pytest.fixture
def rules_dir(tmp_path) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    for name, text in FILES.items():
        (d / name).write_bytes(text.encode("utf-8"))  # bytes: keep the CRLF file's line endings
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def skeleton(text: str) -> str:
    """The file with every number literal replaced by N: what must never change."""
    return NUM.sub("N", text)


def numbers(text: str) -> list[float]:
    return [float(x) for x in NUM.findall(text)]


def structure(obj):
    """A parsed TOML tree with every number replaced by None (keys, order, strings, nesting remain)."""
    if isinstance(obj, dict):
        return [(k, structure(v)) for k, v in obj.items()]
    if isinstance(obj, list):
        return [structure(v) for v in obj]
    return None if isinstance(obj, (int, float)) and not isinstance(obj, bool) else obj


def engine_kl(oracle, rules_path, windows, ref) -> float:
    from handmodel import HandModel, load_rules

    hm = HandModel(load_rules(rules_path, oracle.vocab))
    return float(hm.stream_metrics(list(windows), np.concatenate(ref))["kl"].mean())


def fit(oracle, planted, rules, **kw):
    from verify.discover.fit import fit_rules

    kw = {"tokens": 512, "steps": 8, "progress": False, **kw}
    return fit_rules(rules, oracle, planted[1], **kw)


# -- the fit itself ----------------------------------------------------------------------------------
def test_fit_lowers_kl_monotonically_and_only_numbers_change(oracle, planted, rules_dir):
    from handmodel import load_rules
    from verify.discover.common import sample_windows

    before = snapshot(rules_dir)
    windows = sample_windows(oracle, planted[1], 512, window=128)
    ref = oracle.log_probs(list(windows))
    kl_engine_before = engine_kl(oracle, rules_dir, windows, ref)

    d = fit(oracle, planted, rules_dir)
    h = d["history"]
    assert len(h) >= 3 and np.all(np.diff(h) <= 0), h  # every accepted step lowers (never raises) the KL
    assert d["kl_before"] == h[0] and d["kl_after"] == h[-1] and h[-1] < 0.8 * h[0]
    # the objective is the engine's KL on the same positions
    assert d["kl_before"] == pytest.approx(kl_engine_before, abs=1e-4)
    assert d["positions"] == windows.size
    n_numbers = int(load_rules(rules_dir, oracle.vocab).rule_numbers.sum())
    assert d["numbers_fitted"] == d["numbers_total"] == n_numbers == 24
    assert sorted(d["written"]) == sorted(str(rules_dir / n) for n in ("10_base.toml", "20_context.toml", "30_extra.toml"))

    after = snapshot(rules_dir)
    assert list(after) == list(before)  # no file added (no temp file left behind), none removed
    assert after["05_classes.toml"] == before["05_classes.toml"]
    for name in FILES:
        old, new = before[name].decode(), after[name].decode()
        # only numbers change: comments, order, blank lines, spacing and line endings are identical
        assert skeleton(new) == skeleton(old), name
        assert new.count("\r\n") == old.count("\r\n")
        assert len(numbers(new)) == len(numbers(old))
        # structure never added or removed
        assert structure(tomllib.loads(new)) == structure(tomllib.loads(old)), name
    assert before["10_base.toml"] != after["10_base.toml"]
    # the written file is what fit reported, and scores as well as the fit said (numbers are rounded to 4 digits)
    kl_file = engine_kl(oracle, rules_dir, windows, ref)
    assert kl_file == pytest.approx(d["kl_after"], rel=2e-3, abs=2e-3) and kl_file < d["kl_before"]
    from verify.discover.slots import read_slots

    S = read_slots(load_rules(rules_dir, oracle.vocab))
    np.testing.assert_allclose(S.values, [c["after"] for c in d["changes"]], rtol=1e-3, atol=1e-3)
    # fitting again from the fitted numbers starts where the last fit ended
    d2 = fit(oracle, planted, rules_dir, steps=1)
    assert d2["kl_before"] == pytest.approx(kl_file, abs=1e-4) and d2["kl_after"] <= d2["kl_before"]


def test_only_changes_only_that_rule(oracle, planted, rules_dir):
    from handmodel import load_rules

    before = snapshot(rules_dir)
    old = {r.id: r for r in load_rules(rules_dir, oracle.vocab).rules}
    d = fit(oracle, planted, rules_dir, only=["walk"], steps=5)
    assert d["numbers_fitted"] == 5 and {c["rule"] for c in d["changes"]} == {"walk"}
    assert np.all(np.diff(d["history"]) <= 0) and d["kl_after"] < d["kl_before"]
    after = snapshot(rules_dir)
    assert d["written"] == [str(rules_dir / "10_base.toml")]
    for name in ("05_classes.toml", "20_context.toml", "30_extra.toml"):
        assert after[name] == before[name]
    new = {r.id: r for r in load_rules(rules_dir, oracle.vocab).rules}
    assert new["walk"].rows != old["walk"].rows
    assert [(now, [sid for sid, _ in row]) for now, row in new["walk"].rows] == \
        [(now, [sid for sid, _ in row]) for now, row in old["walk"].rows]
    for rid in old:
        if rid != "walk":
            assert (new[rid].next, new[rid].rows) == (old[rid].next, old[rid].rows), rid
    # only the walk line differs
    diff = [(a, b) for a, b in zip(before["10_base.toml"].decode().splitlines(), after["10_base.toml"].decode().splitlines())
            if a != b]
    assert len(diff) == 1 and diff[0][0].startswith("rows = {") and skeleton(diff[0][0]) == skeleton(diff[0][1])
    # several ids: repeat --only or comma-separate
    d = fit(oracle, planted, rules_dir, only=["after_on,zap_moon", "n_end"], steps=2, dry_run=True)
    assert {c["rule"] for c in d["changes"]} == {"after_on", "zap_moon", "n_end"} and d["numbers_fitted"] == 9


def test_dry_run_writes_nothing_cli(planted, rules_dir, capsys):
    from verify.cli import main

    before = snapshot(rules_dir)
    rc = main(["fit", "--rules", str(rules_dir), "--checkpoint", str(planted[0]), "--train-corpus", str(planted[1]),
               "--tokens", "512", "--steps", "4", "--dry-run", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dry_run"] and d["written"] == [] and d["kl_after"] < d["kl_before"]
    assert any(c["after"] != c["before"] for c in d["changes"])
    assert snapshot(rules_dir) == before
    # one file given alone, rich tables instead of JSON
    rc = main(["fit", "--rules", str(rules_dir / "30_extra.toml"), "--checkpoint", str(planted[0]), "--train-corpus", str(planted[1]),
               "--tokens", "256", "--steps", "2", "--dry-run", "--only", "late"])
    out = capsys.readouterr().out
    assert rc == 0 and "dry run: nothing written" in out and "KL(ref ‖ hand)" in out
    assert snapshot(rules_dir) == before


# -- torchrules == engine --------------------------------------------------------------------------
def _random_windows(vocab, B=8, T=32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hot = [vocab.index(t) for t in (" the", " dog", " cat", " blue", "zap", " moon", " sun", " up", " red", " on",
                                    ".", " ran", " and", " big", " hat")]
    pool = np.array(hot * 4 + list(rng.integers(0, len(vocab), 20)))
    return rng.choice(pool, size=(B, T)).astype(np.int64)


def test_torchrules_logits_equal_the_engine(oracle, tmp_path):
    import torch

    from handmodel import HandModel, load_rules
    from verify.discover.slots import fmt, read_slots, write_back
    from verify.discover.torchrules import TorchRules

    d = tmp_path / "eq"
    d.mkdir()
    (d / "rules.toml").write_text(EQUIV, encoding="utf-8")
    kinds = set()
    for step in range(3):  # the numbers as written, then twice at random numbers written back into the file
        rules = load_rules(d, oracle.vocab)
        kinds |= set(rules.rule_kinds)
        S = read_slots(rules)
        W = _random_windows(oracle.vocab, seed=step)
        tr = TorchRules(rules, S, W)
        theta = torch.as_tensor(S.values, dtype=torch.float64)
        got = torch.log_softmax(tr.logits(theta), -1).numpy()
        part = torch.log_softmax(tr.logits(theta, torch.arange(2, 5)), -1).numpy()
        np.testing.assert_allclose(part, got[2:5], atol=1e-9)
        hm = HandModel(rules)
        want = np.stack(hm.log_probs_batch(list(W)))
        assert np.abs(got - want).max() <= 1e-4, (step, np.abs(got - want).max())
        # gradients exist for every number
        th = theta.clone().requires_grad_(True)
        torch.log_softmax(tr.logits(th), -1)[..., : 50].sum().backward()
        assert torch.isfinite(th.grad).all() and (th.grad != 0).sum() > len(S.slots) // 2
        new = S.values + np.random.default_rng(step).normal(0, 1.0, len(S.slots))
        write_back(S, new)
        assert np.allclose(read_slots(load_rules(d, oracle.vocab)).values, [fmt(v) for v in new])
    assert kinds == {"prior", "bigram", "skip", "head", "head_out", "neuron"}


COPY_RULE = """
# copy rule: the previous-token head hands its source token on
[[head_out]]
id = "copy_prev"   # fitted below
doc = "repeat what the previous-token head looks at"
head = "prevtok"
src = "@all"
copy = 0.1    # a small start
"""


def test_fit_writes_copy_back_keeping_the_file(oracle, planted, rules_dir):
    from handmodel import load_rules
    from verify.discover.slots import read_slots

    p = rules_dir / "20_context.toml"
    # next to the other head_out: tomlkit regroups [[kind]] tables of one kind that are interleaved with others
    p.write_text(p.read_text(encoding="utf-8").replace("\n[[neuron]]", COPY_RULE + "\n[[neuron]]", 1), encoding="utf-8")
    before = snapshot(rules_dir)
    rules = load_rules(rules_dir, oracle.vocab)
    ri = rules.rule_ids.index("copy_prev")
    assert rules.rule_numbers[ri] == 1 and rules.rules[ri].copy == 0.1
    S = read_slots(rules)
    assert [s.path for s in S.slots if s.rule == ri] == [("copy",)]
    d = fit(oracle, planted, rules_dir, only=["copy_prev"], steps=6)
    assert d["numbers_fitted"] == 1 and [c["rule"] for c in d["changes"]] == ["copy_prev"]
    assert d["kl_after"] < d["kl_before"] and d["written"] == [str(p)]
    after = snapshot(rules_dir)
    for name in FILES:
        if name != "20_context.toml":
            assert after[name] == before[name]
    old, new = before["20_context.toml"].decode(), after["20_context.toml"].decode()
    diff = [(a, b) for a, b in zip(old.splitlines(), new.splitlines()) if a != b]
    assert len(diff) == 1 and diff[0][0] == "copy = 0.1    # a small start", diff
    assert skeleton(new) == skeleton(old) and "# copy rule: the previous-token head" in new
    got = load_rules(rules_dir, oracle.vocab).rules[ri].copy
    assert got == pytest.approx(d["changes"][0]["after"], rel=1e-3) and got != 0.1


# -- bad input: one-line UserError, exit code 2, files untouched -------------------------------------
BAD = {
    "unknown token": ("10_base.toml", ('" and" = 0.5', '" adn" = 0.5'), r"10_base\.toml:7: .*unknown token ' adn'.*did you mean .*' and'"),
    "unknown head": ("20_context.toml", ('head = "prevtok"', 'head = "prevtk"'), r"20_context\.toml:\d+: .*unknown head 'prevtk'.*did you mean 'prevtok'"),
    "toml syntax": ("20_context.toml", ('next = { " moon" = 0.5 }', 'next = { " moon" = 0.5'), r"20_context\.toml:\d+: malformed TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rule_files_are_a_clear_error_and_untouched(planted, rules_dir, capsys, case):
    from verify.cli import main

    name, (old, new), pattern = BAD[case]
    p = rules_dir / name
    p.write_text(p.read_text().replace(old, new, 1))
    before = snapshot(rules_dir)
    rc = main(["fit", "--rules", str(rules_dir), "--checkpoint", str(planted[0]), "--train-corpus", str(planted[1]), "--tokens", "256",
               "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err
    assert snapshot(rules_dir) == before


@pytest.mark.parametrize("args, needle", [
    (["--only", "walkk"], "--only 'walkk': no rule with that id; did you mean walk?"),
    (["--only", "common,zzz_nothing_like_it"], "--only 'zzz_nothing_like_it': no rule with that id (ids: common,"),
    (["--only", "animals"], "--only 'animals': no rule with that id"),  # a class holds no numbers to fit
])
def test_bad_only_is_a_clear_error(planted, rules_dir, capsys, args, needle):
    from verify.cli import main

    before = snapshot(rules_dir)
    rc = main(["fit", "--rules", str(rules_dir), "--checkpoint", str(planted[0]), "--train-corpus", str(planted[1]), "--tokens", "256",
               *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert snapshot(rules_dir) == before


def test_fitting_on_valid_text_is_refused(oracle, planted, rules_dir, tmp_path):
    valid = planted[1].parent / "valid.txt"
    assert valid.exists()
    before = snapshot(rules_dir)
    # the CLI in a real process: exit code 2, one line, no traceback
    r = subprocess.run([sys.executable, "-m", "verify.cli", "fit", "--rules", str(rules_dir), "--checkpoint", str(planted[0]),
                        "--train-corpus", str(valid), "--tokens", "256"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "valid.txt is for reporting" in r.stderr, r.stderr
    # the library call too, and a folder that holds valid.txt, and a link to it under another name
    from verify.discover.fit import fit_rules

    link = tmp_path / "train_link.txt"
    link.symlink_to(valid)
    for corpus in (valid, planted[1].parent, link):
        with pytest.raises(UserError, match="valid"):
            fit_rules(rules_dir, oracle, corpus, tokens=256, steps=1, progress=False)
    assert snapshot(rules_dir) == before
    # a rule set with no numbers at all
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(rules_dir / "05_classes.toml", empty)
    (empty / "h.toml").write_text('[[head]]\nid = "h"\ndoc = "no numbers"\n')
    with pytest.raises(UserError, match="no numbers to fit"):
        fit_rules(empty, oracle, planted[1], tokens=256, steps=1, progress=False)


def test_objective_gradient_is_the_same_in_one_chunk_or_many(oracle, tmp_path):
    """On a real vocabulary the objective runs in chunks of windows; every chunk's gradient must reach the
    numbers (a second backward through the shared graph used to crash `handmodel fit`)."""
    import torch

    from handmodel import load_rules
    from verify.discover.fit import Objective
    from verify.discover.slots import read_slots
    from verify.discover.torchrules import TorchRules

    d = tmp_path / "chunks"
    d.mkdir()
    (d / "rules.toml").write_text(EQUIV, encoding="utf-8")
    rules = load_rules(d, oracle.vocab)
    S = read_slots(rules)
    W = _random_windows(oracle.vocab, seed=7)
    tr = TorchRules(rules, S, W)
    ref = torch.log_softmax(torch.randn(*W.shape, len(oracle.vocab)), -1).numpy()
    grads, vals = [], []
    for max_elems in (1 << 30, W.shape[1] * len(oracle.vocab)):  # one chunk; one window per chunk
        obj = Objective(tr, ref, max_elems=max_elems)
        x = torch.as_tensor(S.values, dtype=torch.float32).clone().requires_grad_(True)
        vals.append(obj(x * 1.0, backward=True))  # theta built from x, as fit_rules builds it
        grads.append(x.grad.clone())
    assert Objective(tr, ref, max_elems=W.shape[1] * len(oracle.vocab)).chunk == 1 < len(W)
    assert vals[0] == pytest.approx(vals[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert (grads[0] != 0).any()


# -- weighted sets ([[weights]]): constants to fit, references fitted -------------------------------------
WEIGHTED_SETS = """# weighted sets only: fit never touches this file
[[weights]]
id = "ends_w"
doc = "sentence ends, the full stop most"
tokens = { "." = 1.0, " moon" = 0.4, "@animals" = -0.3 }

[[weights]]
id = "story_w"
doc = "story words"
tokens = { " dog" = 0.5, " sun" = 1.5, " blue" = -1.0, "@all" = 0.05 }
"""
WEIGHTED_RULES = CLASSES + """
[[prior]]
id = "p"
doc = "prior through a weighted set"
next = { "@ends_w" = 0.7, " the" = 0.2 }

[[bigram]]
id = "rows"
doc = "rows writing weighted sets"
rows = { "@animals" = { "@ends_w" = 1.5 }, " the" = { "@story_w" = -0.5, " dog" = 1.0 } }

[[skip]]
id = "sk"
doc = "zap earlier"
earlier = "zap"
next = { "@story_w" = 0.4 }

[[head]]
id = "h0"
doc = "previous token"
position = { 0 = -0.5, 1 = 2.0, default = -1.0 }

[[head_out]]
id = "ho"
doc = "writes a weighted set"
head = "h0"
src = "@animals"
next = { "@ends_w" = 1.2 }

[[neuron]]
id = "n0"
doc = "reads and writes weighted sets"
threshold = 0.2
now = { "@story_w" = 1.0, " up" = 0.5 }
attend = { h0 = { "@ends_w" = 0.9, "@story_w" = -0.4 } }
next = { "@ends_w" = 1.0, "@story_w" = 0.3 }
"""


def test_torchrules_with_weighted_sets_equal_the_engine_and_fit_keeps_the_sets(oracle, planted, tmp_path):
    """Weighted sets in every value place (prior, rows, skip, head_out, neuron now/attend/next): torch == engine;
    `fit` moves the references' numbers and writes the sets' file back unchanged."""
    import torch

    from handmodel import HandModel, load_rules
    from verify.discover.slots import read_slots
    from verify.discover.torchrules import TorchRules

    d = tmp_path / "w"
    d.mkdir()
    (d / "00_sets.toml").write_text(WEIGHTED_SETS, encoding="utf-8")
    (d / "10_rules.toml").write_text(WEIGHTED_RULES, encoding="utf-8")
    rules = load_rules(d, oracle.vocab)
    S = read_slots(rules)
    assert len(S.slots) == 17 and int(rules.rule_numbers.sum()) == 17 + 3 + 4  # the sets' 7 entries are no slots
    W = _random_windows(oracle.vocab, seed=3)
    tr = TorchRules(rules, S, W)
    got = torch.log_softmax(tr.logits(torch.as_tensor(S.values, dtype=torch.float64)), -1).numpy()
    want = np.stack(HandModel(rules).log_probs_batch(list(W)))
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    sets_before = (d / "00_sets.toml").read_bytes()
    res = fit(oracle, planted, d, steps=3)
    assert res["kl_after"] < res["kl_before"] and res["numbers_total"] == 17
    assert (d / "00_sets.toml").read_bytes() == sets_before and str(d / "10_rules.toml") in res["written"]
