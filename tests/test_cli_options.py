"""One CLI vocabulary (issue 19): every command's --help is parsed; the shared options (--rules, --checkpoint,
--corpus, --train-corpus, --out, --json) have one definition (in verify/cli/options.py) and one meaning (same
help and default everywhere), their defaults are printed as resolved project paths, and output paths and
bad gate values are refused before any work (issue 23, items 11 and 12)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from verify.cli import app, main
from verify.cli import options as O
from verify.discover.suggest_options import DEFAULTS, OPTIONS_FILE, SuggestOptions

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("--rules", "--checkpoint", "--corpus", "--train-corpus", "--json")
PROJECT_DEFAULTS = {"--rules": ROOT / "rules", "--checkpoint": ROOT / "reference" / "default",
                    "--corpus": (ROOT.parent / "shared/corpus/tinystories/valid.txt").resolve(),
                    "--train-corpus": (ROOT.parent / "shared/corpus/tinystories/train.txt").resolve()}


def commands() -> list[list[str]]:
    """Every leaf command as its argv prefix, e.g. ['verify'], ['inspect', 'head']."""
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + [name])
        else:
            out.append(path)

    walk(typer.main.get_command(app), [])
    return out


@pytest.fixture(scope="module")
def helps() -> dict[str, dict[str, tuple[str, str | None]]]:
    """Every command's --help, parsed; a wide terminal keeps each option on one line."""
    import contextlib
    import io

    res = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "400")
        for argv in commands():
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert main(argv + ["--help"]) == 0
            res[" ".join(argv)] = _parse(buf.getvalue())
    return res


def _parse(text: str) -> dict[str, tuple[str, str | None]]:
    """{flag: (help text, printed default)} from one rich --help screen."""
    opts = {}
    for line in text.splitlines():
        m = re.match(r"│\s+(?:\*\s+)?(--[\w-]+)\S*(?:\s+-\w)?\s+<[^>]+>\s+(.*?)\s*│$", line)
        if m:
            text_ = m.group(2)
            d = re.search(r"\[default: (.*?)\]", text_)
            opts[m.group(1)] = (re.sub(r"\s*\[(default: .*?|required)\]", "", text_), d.group(1) if d else None)
    return opts


def test_every_command_parses_and_the_shared_options_mean_one_thing(helps):
    assert {"verify", "report", "catalog", "check-rules", "fit", "suggest", "inspect head", "baselines", "train"} <= set(helps)
    for flag in SHARED:
        seen = {cmd: o[flag] for cmd, o in helps.items() if flag in o}
        assert len(set(seen.values())) == 1, (flag, seen)  # same help text, same default, everywhere
    for cmd in ("verify", "report", "catalog", "check-rules", "fit"):  # every command that reads a ruleset
        assert "--rules" in helps[cmd], cmd
    outs = {cmd: o["--out"][0] for cmd, o in helps.items() if "--out" in o}
    assert {"report", "catalog", "suggest", "train"} <= set(outs)
    assert all(h.startswith("Output ") and h.endswith(O.OUT_HELP.split("}")[1]) for h in outs.values()), outs


def test_printed_defaults_are_resolved_project_paths(helps, tmp_path):
    for cmd, opts in helps.items():
        for flag, (_, default) in opts.items():
            if flag in PROJECT_DEFAULTS:
                assert Path(default) == PROJECT_DEFAULTS[flag], (cmd, flag, default)
            if default and "/" in default:
                assert Path(default).is_absolute() and Path(default) == Path(default).resolve(), (cmd, flag, default)
    # from another working directory the defaults are the same paths (relative to the project, not the cwd)
    r = subprocess.run([sys.executable, "-m", "verify.cli", "verify", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "COLUMNS": "400", "PYTHONPATH": str(ROOT)})
    assert _parse(r.stdout)["--rules"][1] == str(ROOT / "rules")


def test_shared_options_are_defined_once_in_options_py():
    """No typer.Option for a shared flag outside verify/cli/options.py."""
    for f in (ROOT / "verify").rglob("*.py"):
        if f.name == "options.py" and f.parent.name == "cli":
            continue
        for call in re.findall(r"Option\([^)]*", f.read_text(encoding="utf-8")):
            for flag in SHARED + ("--out",):
                assert f'"{flag}"' not in call and f"'{flag}'" not in call, (f, flag)


def test_fit_help_shows_weights_literally(helps):
    r = subprocess.run([sys.executable, "-m", "verify.cli", "fit", "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "400"})
    assert "[[weights]]" in r.stdout and "A [] set" not in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["verify", "--fail-above", "nan"], "--fail-above nan"),
    (["verify", "--json-out", "{missing}/x.json"], "--json-out's folder"),
    (["report", "--out", "{missing}/r.html"], "--out's folder"),
    (["catalog", "--rules", "{rules_file}"], "--rules must be a folder here"),
    (["catalog", "--out", "{missing}/C.md"], "--out's folder"),
    (["catalog", "--json-out", "{missing}/c.json"], "--json-out's folder"),
    (["suggest", "--out", "{missing}/draft"], "--out's parent folder"),
    (["train", "--out", "{missing}/run"], "--out's parent folder"),
])
def test_bad_outputs_and_gates_are_refused_before_any_work(argv, message, tmp_path, capsys):
    """A one-line error and exit 2 — with a checkpoint (or text) that does not exist, so work would fail differently."""
    rules_file = tmp_path / "r.toml"
    rules_file.write_text('[[prior]]\nid = "p"\ndoc = "d"\nnext = { "a" = 1.0 }\n')
    argv = [a.format(missing=tmp_path / "no" / "such", rules_file=rules_file) for a in argv]
    broken = ["--train-corpus", str(tmp_path / "no-text.txt")] if argv[0] == "train" else \
        ["--checkpoint", str(tmp_path / "no-checkpoint")]
    assert main(argv + broken) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and broken[1] not in err, err


def test_suggest_options_file_round_trips_and_names_bad_lines(tmp_path):
    opts = SuggestOptions(budget=123, heads=False, prune_window=(0.3, 0.65), shared_size=(1200, 600), target="x/rules")
    f = tmp_path / OPTIONS_FILE
    f.write_text(opts.to_toml("header"))
    assert SuggestOptions.load(f) == opts
    assert SuggestOptions.load(_write(tmp_path, DEFAULTS.to_toml("defaults"))) == DEFAULTS
    from handmodel.errors import UserError

    with pytest.raises(UserError, match=r":3: unknown option 'budgt'"):
        SuggestOptions.load(_write(tmp_path, "# c\n\nbudgt = 5\n"))
    with pytest.raises(UserError, match=r":1: budget = 'many': expected int"):
        SuggestOptions.load(_write(tmp_path, "budget = 'many'\n"))


def test_the_shipped_rules_options_file_loads():
    """rules/suggest.conf (the shipped draft's command as a file) still names only options that exist."""
    opts = SuggestOptions.load(ROOT / "rules" / OPTIONS_FILE)
    assert opts != DEFAULTS and opts.joint_steps > 0 and opts.shared_size == (1300, 600)


def _write(d: Path, text: str) -> Path:
    p = d / "opts.conf"
    p.write_text(text)
    return p


def test_suggest_config_reruns_with_the_file_and_flags_override_it(tmp_path, monkeypatch, capsys):
    """`suggest --config FILE`: the file's options; a flag typed on the command line wins; defaults do not."""
    import reference.oracle
    import verify.discover.suggest as S

    seen = []
    monkeypatch.setattr(reference.oracle.Oracle, "load", classmethod(lambda cls, path=None: "oracle"))
    monkeypatch.setattr(S, "suggest", lambda o, out, corpus, opts, log, command: seen.append(opts) or
                        {"rules": 1, "numbers": 1, "classes": 0, "seconds": 0, "options": "x"})
    conf = _write(tmp_path, SuggestOptions(budget=77, classes=3, heads=False).to_toml("h"))
    train = tmp_path / "train.txt"
    train.write_text("text")
    base = ["suggest", "--out", str(tmp_path / "d"), "--train-corpus", str(train), "--json"]
    assert main(base + ["--config", str(conf), "--classes", "5"]) == 0
    assert seen[-1] == SuggestOptions(budget=77, classes=5, heads=False)
    assert main(base + ["--budget", "9"]) == 0
    assert seen[-1] == DEFAULTS.replace(budget=9)


LONG_GROUP = ('group = "bigrams after the determiners, a rather long group name"\n[[bigram]]\nid = "the_noun"\n'
              'doc = "nouns after the"\nnow = " the"\nnext = { " happy" = 1.0, " b" = 1.0 }\n')


def test_verify_tables_fit_80_columns_and_wide_shows_every_column(tiny_world, tmp_path):
    """At 80 columns no cell is cut to '…' and no line is longer than 80; --wide (or a wide COLUMNS) has every
    column; the JSON keeps its keys and their order."""
    from test_verify_core import PRIOR, write_rules

    ckpt, evalf, train = tiny_world
    rules = write_rules(tmp_path / "r", {"10_prior.toml": PRIOR, "20_long.toml": LONG_GROUP})
    common = ["verify", "--checkpoint", ckpt, "--rules", rules, "--corpus", evalf, "--train-corpus", train]

    def run(*extra, columns="80"):
        r = subprocess.run([sys.executable, "-m", "verify.cli", *map(str, common), *map(str, extra)], capture_output=True,
                           text=True, env={**os.environ, "COLUMNS": columns, "HANDMODEL_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, r.stderr
        return r.stdout

    narrow = run("--json-out", tmp_path / "v.json", "--ablate", "--worst", "2")
    tables = narrow[narrow.index("Baselines"):narrow.index("Ablation")]
    assert "…" not in tables and max(map(len, tables.splitlines())) <= 80, tables
    assert "CE_hand" not in tables and "95% CI" in tables and "oracle bigram" in tables
    assert all(w in tables for w in LONG_GROUP.split('"')[1].split())  # a long group name wraps instead of being cut
    res = json.loads((tmp_path / "v.json").read_text())
    assert list(res) == ["header", "baselines", "ledger", "final", "float16_precision", "ablation", "worst",
                         "gap_by_current", "gap_by_next", "verified", "timings", "wall_seconds", "fail_above", "failed"]
    for r in res["ledger"] + res["baselines"]:
        assert f"{r['kl']:.4f}" in tables and f"[{r['kl_lo']:.4f}, {r['kl_hi']:.4f}]" in tables
    for wide in (run("--wide"), run(columns="160")):
        assert "CE_hand" in wide and "unexpl." in wide and "rules" in wide
        assert all(f"{r['ce_ref']:.4f}" in wide for r in res["ledger"])
