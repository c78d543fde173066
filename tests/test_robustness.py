"""Issue 23: nothing silently wrong, nothing lost. Bad rule files, damaged caches, concurrent edits and
hostile cache entries give a clear one-line error or a rebuild, never a traceback or a wrong number.

Over 400 lines on purpose: one file for the issue, because its items share the rule snippets and the
tiny-world helpers, and the fuzz tests at the end throw all of them at load_rules and verify."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from handmodel import UserError, load_rules

VOCAB = ["<|endoftext|>", " the", " dog", " dogs", " cat", ".", "@"]


def write(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def fails(d: Path, files: dict[str, str], vocab=VOCAB) -> str:
    write(d, files)
    with pytest.raises(UserError) as e:
        load_rules(d, vocab)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def big_rules(n: int = 1200) -> str:
    """A rule file over the parse cache's size threshold (20,000 characters)."""
    return "".join(f'[[prior]]\nid = "p{i}"\ndoc = "prior number {i}"\nnext = {{ " the" = {i / 100:.2f} }}\n\n'
                   for i in range(n))


# -- #5: the parse cache holds data only ----------------------------------------------------------
def test_parse_cache_is_json_and_a_planted_pickle_never_runs(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HANDMODEL_CACHE", str(cache))
    text = big_rules()
    rules = write(tmp_path / "r", {"a.toml": text})
    from handmodel.rulefile import parse_cache_key

    key = parse_cache_key(text)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (cache / "parsed").mkdir(parents=True)
    (cache / "parsed" / f"{key}.pickle").write_bytes(pickle.dumps(Evil()))
    first = load_rules(rules, VOCAB)
    assert not marker.exists()
    entry = cache / "parsed" / f"{key}.json"
    assert json.loads(entry.read_text())["key"] == key  # the cache is JSON now
    again = load_rules(rules, VOCAB)  # from the cache: the same rules
    assert [(r.id, r.line, r.next) for r in again.rules] == [(r.id, r.line, r.next) for r in first.rules]
    # an entry that is not exactly what we wrote (another key, another shape, garbage) is ignored
    for bad in ('{"version": 2, "key": "0", "data": {}, "id_lines": {}}', "garbage", '{"version": 2, "key": "%s", '
                '"data": [], "id_lines": {}}' % key, '{"version": 2, "key": "%s", "data": {}, "id_lines": {"p0": ["x"]}}' % key):
        entry.write_text(bad)
        got = load_rules(rules, VOCAB)
        assert [(r.id, r.line, r.next) for r in got.rules] == [(r.id, r.line, r.next) for r in first.rules]


def test_nothing_is_unpickled_anywhere():
    root = Path(__file__).resolve().parents[1]
    for f in [*root.glob("handmodel/**/*.py"), *root.glob("verify/**/*.py"), *root.glob("reference/**/*.py")]:
        src = f.read_text()
        assert "import pickle" not in src and "allow_pickle=True" not in src, f
        assert "weights_only=False" not in src, f


def test_resume_state_is_loaded_without_unpickling_code(tiny_corpus, tiny_config, tmp_path):
    """A planted train_state.pt that would run code on a full unpickle is refused (weights_only=True)."""
    import torch

    from reference.train import train

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"config": Evil(), "model": {}, "opt": {}, "step": 0, "history": []}, out / "train_state.pt")
    cfg = tiny_config(tiny_corpus, out, steps=2)
    with pytest.raises(UserError, match="cannot be read as a training state"):
        train(cfg, resume=True, progress=False, log=lambda m: None)
    assert not marker.exists()


# -- #4: comments and strings never move a rule -------------------------------------------------
def test_an_id_in_a_comment_or_string_does_not_reorder_or_misplace(tmp_path):
    text = ('# id = "b2"\n'
            '[[bigram]]\nid = "b1"\ndoc = "the first; id = \'b2\' here is only text"\nnow = " the"\nnext = { " dog" = 1.0 }\n'
            '[[bigram]]\nid = "b2"  # id = "b1"\ndoc = "second"\nnow = " dog"\nnext = { "." = 1.0 }\n')
    write(tmp_path, {"a.toml": text})
    r = load_rules(tmp_path, VOCAB)
    assert r.rule_ids == ["b1", "b2"] and r.rule_lines == [3, 8]
    (tmp_path / "a.toml").write_text(text.replace('next = { "." = 1.0 }', 'next = { " dgo" = 1.0 }'))
    msg = fails(tmp_path, {})
    assert msg.startswith(f"{tmp_path / 'a.toml'}:11: bigram 'b2': unknown token ' dgo'")


# -- #7, #10, #12: bounded numbers, keys, depths; BOM; empty tables; long tokens ------------------
@pytest.mark.parametrize("body, line, what", [
    ('[[prior]]\nid = "p"\ndoc = "d"\nnext = { " the" = 1e39 }\n', 4, "beyond"),
    ('[[head]]\nid = "h"\ndoc = "d"\nposition = { 1 = 1.0 }\n[[head_out]]\nid = "o"\ndoc = "d"\nhead = "h"\n'
     'src = " dog"\ncopy = 1e308\n', 10, "beyond"),
    ('[[head]]\nid = "h"\ndoc = "d"\nposition = { 99999999999 = 1.0 }\n', 4, "beyond 65,536"),
    ('[[head]]\nid = "h"\ndoc = "d"\nposition = { "²" = 1.0 }\n', 4, "is not a distance"),
    ('[[prior]]\nid = "p"\ndoc = "d"\nnext = {}\n', 4, "'next' is an empty table"),
    ('[[bigram]]\nid = "b"\ndoc = "d"\nrows = {}\n', 4, "'rows' is an empty table"),
    ('[[bigram]]\nid = "b"\ndoc = "d"\nrows = { " the" = {} }\n', 4, "rows[' the'] is an empty table"),
])
def test_out_of_range_and_empty_values_are_file_line_errors(tmp_path, body, line, what):
    msg = fails(tmp_path, {"a.toml": body})
    assert msg.startswith(f"{tmp_path / 'a.toml'}:{line}: ") and what in msg


def test_deep_nesting_and_class_chains_are_errors_not_recursion(tmp_path):
    msg = fails(tmp_path / "a", {"a.toml": "x = " + "[" * 5000 + "]" * 5000 + "\n"})
    assert "nested too deep" in msg
    chain = "".join(f'[[class]]\nid = "c{i}"\ndoc = "d"\ntokens = ["@c{i + 1}"]\n' for i in range(3000))
    chain += '[[class]]\nid = "c3000"\ndoc = "d"\ntokens = [" dog"]\n'
    msg = fails(tmp_path / "b", {"a.toml": chain})
    assert "more than 200 other classes" in msg


def test_utf8_bom_is_accepted(tmp_path):
    (tmp_path / "a.toml").write_bytes(b"\xef\xbb\xbf" + b'[[prior]]\nid = "p"\ndoc = "d"\nnext = { " the" = 1.0 }\n')
    r = load_rules(tmp_path, VOCAB)
    assert r.rule_ids == ["p"] and r.rule_lines == [2]


def test_a_huge_unknown_token_is_shown_truncated(tmp_path):
    tok = " x" * 50_000
    t0 = time.perf_counter()
    msg = fails(tmp_path, {"a.toml": f'[[prior]]\nid = "p"\ndoc = "d"\nnext = {{ "{tok}" = 1.0 }}\n'})
    assert "unknown token ' x x x" in msg and "(100,000 characters)" in msg and len(msg) < 600
    assert time.perf_counter() - t0 < 5  # no fuzzy matching of a 100 KB string against the vocabulary


# -- #1, #3, #6: cache entries are keyed by what was read and checked when read --------------------
CLASS_FILE = '[[ class ]]\nid = "animals"\ndoc = "names"\ntokens = [" Lily"]\n'
PRIOR = '[[prior]]\nid = "pets"\ndoc = "names are likely"\nnext = { "@animals" = 3.0, "." = 1.0 }\n'
BIGRAMS = ('[[bigram]]\nid = "after_dot"\ndoc = "after a full stop"\nrows = { "." = { "<|endoftext|>" = 1.0 } }\n'
           '[[bigram]]\nid = "the_noun"\ndoc = "nouns after the"\nnow = " the"\nnext = { " happy" = 1.0, " b" = 1.0 }\n')


def evaluate(world, rules, **kw):
    from verify.ledger.evaluate import evaluate as ev

    ckpt, evalf, train = world
    return ev(ckpt, rules, evalf, 4, 0, train, log=lambda m: None, **kw)


def kls(res) -> list[float]:
    return [r["kl"] for r in res.ledger] + [r["kl"] for r in res.baselines]


def fresh_kls(world, rules, tmp_path) -> list[float]:
    """The same evaluation on an empty cache."""
    old = os.environ["HANDMODEL_CACHE"]
    os.environ["HANDMODEL_CACHE"] = str(tmp_path / "fresh-cache")
    try:
        return kls(evaluate(world, rules))
    finally:
        os.environ["HANDMODEL_CACHE"] = old


def test_ledger_key_follows_what_was_read_not_how_it_was_spelled(tiny_world, tmp_path):
    """A class file written `[[ class ]]` (no `[[class]]` bytes to find) is edited: the rows using it are
    recomputed, not served stale."""
    rules = write(tmp_path / "r", {"10_classes.toml": CLASS_FILE, "20_prior.toml": PRIOR, "30_bigrams.toml": BIGRAMS})
    before = kls(evaluate(tiny_world, rules))
    (rules / "10_classes.toml").write_text(CLASS_FILE.replace('[" Lily"]', '[" Lily", " happy", " a"]'))
    after = kls(evaluate(tiny_world, rules))
    assert after[1] != before[1]
    assert after == pytest.approx(fresh_kls(tiny_world, rules, tmp_path), abs=1e-12)


def test_swapped_ledger_entries_are_detected_and_rebuilt(tiny_world, tmp_path, capsys):
    rules = write(tmp_path / "r", {"10_classes.toml": CLASS_FILE, "20_prior.toml": PRIOR, "30_bigrams.toml": BIGRAMS})
    first = evaluate(tiny_world, rules)
    ref = first.ref
    a, b = sorted((ref.dir / "ledger").glob("*.npz"))[:2]
    tmp = a.with_name("swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    capsys.readouterr()
    second = evaluate(tiny_world, rules)
    assert kls(second) == kls(first)
    err = capsys.readouterr().err
    assert err.count("was damaged (it holds the row of key") == 2 and "rebuilding" in err
    third = evaluate(tiny_world, rules)  # healed: no more messages
    assert kls(third) == kls(first) and "damaged" not in capsys.readouterr().err


def _garbage(f: Path, keep_size: bool = True) -> None:
    n = f.stat().st_size
    raw = bytearray(f.read_bytes())
    rng = np.random.default_rng(0)
    if keep_size:  # damage after the header: the shape still reads fine, only the numbers are wrong
        start = min(n - 1, 128)
        raw[start:] = rng.integers(0, 256, n - start, dtype=np.uint8).tobytes()
        f.write_bytes(bytes(raw))
    else:
        f.write_bytes(bytes(raw[: n // 2]))


@pytest.mark.parametrize("target, how", [
    ("ref/logp16.npy", "garbage"), ("ref/tokens.npy", "truncate"), ("ref/ce.npy", "garbage"),
    ("ref/meta.json", "garbage"), ("ref/offsets.npy", "garbage"), ("tables/log_bigram.npy", "truncate"),
    ("tables/log_unigram.npy", "garbage"), ("tables/meta.json", "truncate"), ("baseline", "garbage"),
    ("ledger", "truncate"), ("ledger", "garbage"),
])
def test_damaged_cache_files_are_reported_and_rebuilt(tiny_world, tmp_path, capsys, target, how):
    rules = write(tmp_path / "r", {"10_classes.toml": CLASS_FILE, "20_prior.toml": PRIOR, "30_bigrams.toml": BIGRAMS})
    first = evaluate(tiny_world, rules)
    ref = first.ref
    cache = Path(os.environ["HANDMODEL_CACHE"])
    if target.startswith("ref/"):
        f = ref.dir / target[4:]
    elif target.startswith("tables/"):
        f = next((cache / "baselines").iterdir()) / target[7:]
    elif target == "baseline":
        f = next(ref.dir.glob("baseline-*.npz"))
    else:
        f = sorted((ref.dir / "ledger").glob("*.npz"))[-1]
    _garbage(f, keep_size=how == "garbage")
    capsys.readouterr()
    second = evaluate(tiny_world, rules)
    err = capsys.readouterr().err
    assert kls(second) == pytest.approx(kls(first), abs=1e-12)
    lines = [x for x in err.splitlines() if "damaged" in x]
    assert len(lines) == 1 and lines[0].startswith("cache entry ") and lines[0].endswith(": rebuilding"), err
    assert "Traceback" not in err
    third = evaluate(tiny_world, rules)
    assert kls(third) == kls(second) and "damaged" not in capsys.readouterr().err


def test_interrupted_builds_are_cleaned_up_and_baselines_written_by_rename(tiny_world, tmp_path):
    rules = write(tmp_path / "r", {"20_prior.toml": PRIOR.replace('"@animals" = 3.0, ', "")})
    cache = Path(os.environ["HANDMODEL_CACHE"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead_pid = int(dead.stdout)
        for sub in ("ref", "baselines"):
            (cache / sub / f".abc.tmp{dead_pid}").mkdir(parents=True)
            (cache / sub / f".abc.tmp{dead_pid}" / "logp16.npy").write_bytes(b"x" * 1000)
            (cache / sub / f".live.tmp{sleeper.pid}").mkdir()
        res = evaluate(tiny_world, rules)
        for sub in ("ref", "baselines"):
            assert not (cache / sub / f".abc.tmp{dead_pid}").exists()  # its process is gone: removed
            assert (cache / sub / f".live.tmp{sleeper.pid}").exists()  # a build still running: kept
    finally:
        sleeper.kill()
    ref = res.ref
    assert not [p for p in ref.dir.iterdir() if ".tmp" in p.name]
    import verify.ledger.baselines as B

    src = Path(B.__file__).read_text()
    assert "np.savez(f," not in src  # baselines never go straight to their final name


def test_concurrent_verify_processes_on_a_fresh_cache_agree(tiny_world, tmp_path):
    ckpt, evalf, train = tiny_world
    rules = write(tmp_path / "r", {"10_classes.toml": CLASS_FILE, "20_prior.toml": PRIOR})
    env = {**os.environ, "HANDMODEL_CACHE": str(tmp_path / "shared-cache")}
    cmd = [sys.executable, "-m", "verify.cli", "verify", "--checkpoint", str(ckpt), "--rules", str(rules),
           "--corpus", str(evalf), "--train-corpus", str(train), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    a, b = (json.loads(o[0]) for o in outs)
    assert [r["kl"] for r in a["ledger"]] == [r["kl"] for r in b["ledger"]]
    assert not any("damaged" in o[1] for o in outs)


# -- #2: fit's write-back never loses an edit ------------------------------------------------------
FIT_A = '[[prior]]\nid = "pa"\ndoc = "d"\nnext = { " the" = 1.0, " dog" = 2.0 }  # keep me\n'
FIT_B = '[[bigram]]\nid = "pb"\ndoc = "d"\nnow = " the"\nnext = { " cat" = 0.5 }\n'


def _slots(d: Path):
    from verify.discover.slots import read_slots

    S = read_slots(load_rules(d, VOCAB))
    return S, S.values + 1.0  # every number changes


def test_write_back_refuses_a_file_edited_by_another_process_meanwhile(tmp_path):
    from verify.discover.slots import write_back

    d = write(tmp_path / "r", {"a.toml": FIT_A, "b.toml": FIT_B})
    S, theta = _slots(d)
    added = '\n[[prior]]\nid = "added_meanwhile"\ndoc = "written while fit ran"\nnext = { "." = 1.0 }\n'
    subprocess.run([sys.executable, "-c", f"open({str(d / 'b.toml')!r}, 'a').write({added!r})"], check=True)
    with pytest.raises(UserError, match=r"b.toml: changed on disk while fit was running .* nothing was written"):
        write_back(S, theta)
    assert (d / "a.toml").read_text() == FIT_A  # nothing written: not even the unchanged-on-disk file
    assert (d / "b.toml").read_text() == FIT_B + added
    S, theta = _slots(d)  # read again: now it goes through, keeping the comment and the new rule
    assert write_back(S, theta) == [str(d / "a.toml"), str(d / "b.toml")]
    assert "# keep me" in (d / "a.toml").read_text() and "added_meanwhile" in (d / "b.toml").read_text()
    assert load_rules(d, VOCAB).rules[0].next == [(1, 2.0), (2, 3.0)]


def test_write_back_is_all_or_nothing(tmp_path, monkeypatch):
    from verify.discover import slots

    d = write(tmp_path / "r", {"a.toml": FIT_A, "b.toml": FIT_B})
    S, theta = _slots(d)
    from handmodel import rulecache

    rulecache.flush()  # load_rules' cache entry is written on a thread: its writes must not count below
    real = Path.write_text
    calls = []

    def flaky(self, *a, **kw):
        if Path(self).parent == d:  # the rule folder's writes only (the write-back's temporaries sit beside them)
            calls.append(self.name)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(UserError, match="could not write the fitted rule files .* nothing was changed"):
        slots.write_back(S, theta)
    monkeypatch.setattr(Path, "write_text", real)
    assert (d / "a.toml").read_text() == FIT_A and (d / "b.toml").read_text() == FIT_B
    assert sorted(p.name for p in d.iterdir()) == ["a.toml", "b.toml"]  # no temporaries left


def test_write_back_through_a_symlink_keeps_the_link(tmp_path):
    from verify.discover.slots import write_back

    real = write(tmp_path / "store", {"a.toml": FIT_A})
    d = tmp_path / "r"
    d.mkdir()
    (d / "a.toml").symlink_to(real / "a.toml")
    S, theta = _slots(d)
    write_back(S, theta)
    assert (d / "a.toml").is_symlink() and (real / "a.toml").read_text() != FIT_A
    assert load_rules(d, VOCAB).rules[0].next == [(1, 2.0), (2, 3.0)]


def test_write_back_keeps_a_byte_order_mark(tmp_path):
    from verify.discover.slots import write_back

    d = tmp_path / "r"
    d.mkdir()
    (d / "a.toml").write_bytes(b"\xef\xbb\xbf" + FIT_A.encode())
    S, theta = _slots(d)
    write_back(S, theta)
    assert (d / "a.toml").read_bytes().startswith(b"\xef\xbb\xbf[[prior]]")
    assert load_rules(d, VOCAB).rules[0].next == [(1, 2.0), (2, 3.0)]


# -- #12: eval text that is not UTF-8 is never read silently -----------------------------------------
def test_non_utf8_eval_text_warns_with_file_and_count(tmp_path, capsys):
    from reference.corpus import read_stories

    f = tmp_path / "eval.txt"
    f.write_bytes(b"Tom saw a dog.\n<|endoftext|>\nLily \xff\xfe had a \xe9 cat.\n<|endoftext|>\n")
    stories = read_stories(f)
    assert stories[1] == "Lily \ufffd\ufffd had a \ufffd cat."
    err = capsys.readouterr().err.strip()
    assert err == f"warning: {f}: 3 bytes not valid UTF-8, read as U+FFFD; re-save the file as UTF-8 if this is not expected"
    f.write_text("Tom saw a dog.\n<|endoftext|>\n", encoding="utf-8")
    read_stories(f)
    assert capsys.readouterr().err == ""


def test_non_finite_reference_log_probs_are_blamed_on_the_reference(tmp_path):
    from handmodel import HandModel

    write(tmp_path, {"a.toml": '[[prior]]\nid = "p"\ndoc = "d"\nnext = { " dog" = 1.0 }\n'})
    hm = HandModel(load_rules(tmp_path, VOCAB))
    ref = np.log(np.full((3, 7), 1 / 7, np.float32))
    ref[1, 2] = np.nan
    with pytest.raises(UserError, match=r"^reference log-probs \(ref_logp\) row 1 have NaN"):
        hm.stream_metrics([np.array([1, 2, 3], dtype=np.int32)], ref)


# -- fuzz: mutated rule files, eval texts and cache entries ----------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HEADS = ('[[head]]\nid = "prev"\ndoc = "looks one back"\nposition = { 1 = 3.0, default = -1.0 }\n'
         '[[head_out]]\nid = "copy_prev"\ndoc = "copies"\nhead = "prev"\nsrc = "@animals"\ncopy = 0.5\n')
BASE_RULES = {"10_classes.toml": CLASS_FILE, "20_prior.toml": PRIOR, "30_bigrams.toml": BIGRAMS, "40_heads.toml": HEADS}
SNIPPETS = ["[", "]", "{", "}", '"', "'", "=", "\n", "#", ",", "@", ".", "1e39", "-", "0", "9" * 12, "nan", "\ufeff",
            "[[class]]\n", "[[ class ]]\n", 'id = "p"', "# id = \"after_dot\"\n", "{}", "²", " ", "\\", "\x00"]


NUMBERS = ["1e39", "-1e39", "1e308", "1e6", "-1000001", "nan", "inf", "0", "99999999999", "65537", '"²"', "1_000", "0x10"]


@st.composite
def text_mutation(draw, text: str):
    """A few edits of a text: insert a TOML-significant snippet, delete a span, or duplicate a line."""
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "dup", "number"]))
        nums = list(re.finditer(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])", text))
        if op == "number" and nums:  # a number, or a position key, replaced by an extreme one
            m = draw(st.sampled_from(nums))
            text = text[:m.start()] + draw(st.sampled_from(NUMBERS)) + text[m.end():]
        elif op == "insert":
            text = text[:i] + draw(st.sampled_from(SNIPPETS)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 12)):]
        else:
            lines = text.splitlines(keepends=True) or [""]
            k = draw(st.integers(0, len(lines) - 1))
            text = "".join(lines[: k + 1] + lines[k:])
    return text


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_load_rules_gives_rules_or_one_line_error(tmp_path_factory, data):
    from conftest import SMALL_VOCAB

    name = data.draw(st.sampled_from(sorted(BASE_RULES)))
    d = write(tmp_path_factory.mktemp("fz"), {**BASE_RULES, name: data.draw(text_mutation(BASE_RULES[name]))})
    vocab = VOCAB + [t for t in SMALL_VOCAB if t not in VOCAB] + [" Lily", " happy", " a", " b"]
    try:
        r = load_rules(d, vocab)
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 1000 and msg.startswith(str(d)), msg
        return
    nums = [w for x in r.rules for _, w in x.next] + [w for x in r.rules for w in x.position.values()]
    nums += [w for x in r.rules for _, row in x.rows for _, w in row] + [x.copy for x in r.rules if x.copy is not None]
    assert len(r.rule_ids) == len(set(r.rule_ids)) and all(abs(w) <= 1e6 for w in nums)
    assert all(d <= 1 << 16 for x in r.rules for d in x.position)


def _verify(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from verify.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def test_fuzz_verify_inputs_and_cache_entries(tiny_world, tmp_path):
    """verify (the CLI's main, in process) on mutated rules / eval text / cache files: exit 0 with the
    ledger a cache-free run gives, or exit 2 with one error line; a damaged cache never changes a number."""
    ckpt, evalf, train = tiny_world
    rules = write(tmp_path / "rules", BASE_RULES)
    ev = tmp_path / "eval.txt"
    ev.write_bytes(evalf.read_bytes())
    out = tmp_path / "out.json"
    argv = ["verify", "--checkpoint", str(ckpt), "--rules", str(rules), "--corpus", str(ev), "--train-corpus", str(train),
            "--json-out", str(out)]
    rc, err = _verify(argv)
    assert rc == 0, err
    base = json.loads(out.read_text())
    cache = Path(os.environ["HANDMODEL_CACHE"])

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        write(rules, BASE_RULES)
        ev.write_bytes(evalf.read_bytes())
        what = data.draw(st.sampled_from(["rules", "eval", "cache"]))
        if what == "rules":
            name = data.draw(st.sampled_from(sorted(BASE_RULES)))
            (rules / name).write_text(data.draw(text_mutation(BASE_RULES[name])), encoding="utf-8")
        elif what == "eval":
            raw = bytearray(evalf.read_bytes())
            i = data.draw(st.integers(0, len(raw)))
            raw[i:i] = data.draw(st.sampled_from([b"\xff\xfe", b"<|endoftext|>\n", b"\x00", b"\xe2\x80", "ü".encode()]))
            ev.write_bytes(bytes(raw))
        else:
            # draws independent of the cache's current contents (which earlier examples change)
            pick, at, truncate = data.draw(st.integers(0, 999)), data.draw(st.floats(0, 1)), data.draw(st.booleans())
            files = sorted(p for p in cache.rglob("*") if p.is_file() and p.suffix in (".npy", ".npz", ".json"))
            f = files[pick % len(files)]
            raw = f.read_bytes()
            cut = min(len(raw) - 1, int(at * len(raw)))
            f.write_bytes(raw[:cut] if truncate else raw[:cut] + bytes([raw[cut] ^ 0x5A]) + raw[cut + 1:])
        out.unlink(missing_ok=True)
        rc, err = _verify(argv)
        assert "Traceback" not in err
        if rc == 2:
            errors = [x for x in err.splitlines() if x.startswith("error: ")]
            assert len(errors) == 1 and what != "cache", err
            return
        assert rc == 0, err
        got = json.loads(out.read_text())
        kl = [r["kl"] for r in got["ledger"]]
        if what == "cache":  # no input changed: no number may change
            assert kl == [r["kl"] for r in base["ledger"]]
            assert [r["kl"] for r in got["baselines"]] == [r["kl"] for r in base["baselines"]]
        else:  # the numbers are the ones a run with no cached rows gives
            from verify.ledger import core as L
            from verify.ledger.evaluate import evaluate

            res = evaluate(ckpt, rules, ev, 4, 0, train, log=lambda m: None)
            ref, hm, compiled = res.ref, res.hand, res.rules
            fresh, _ = L.run_ledger(hm, compiled, ref, res.baselines[1]["kl"], L.boot_weights(len(ref.offsets) - 1),
                                    cache=False)
            assert kl == pytest.approx([r["kl"] for r in fresh], abs=1e-12)

    one()
