"""`handmodel` on the foundation commands: bad input gives `error: ...` on one line, exit code 2, no
traceback; good input works, in-process (verify.cli.main) and as real processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from verify.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def empty_corpus(tmp_path) -> Path:
    p = tmp_path / "empty.txt"
    p.write_text("<|endoftext|>\n")
    return p


def test_train_errors(capsys, tmp_path, empty_corpus, tiny_corpus):
    rc, _, err = run(capsys, "train", "--train-corpus", tmp_path / "missing.txt", "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "missing.txt: no such file or folder; check the --train-corpus path")
    rc, _, err = run(capsys, "train", "--train-corpus", empty_corpus, "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "empty.txt: corpus is empty (no story text found)")
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("{ broken")
    rc, _, err = run(capsys, "train", "--train-corpus", tiny_corpus / "train.txt", "--tokenizer", bad_tok, "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "tok.json: not a readable tokenizers JSON (", "retrain or re-save it")


def test_checkpoint_errors(capsys, tmp_path, tiny_checkpoint):
    for cmd in ("sample", "info"):
        rc, _, err = run(capsys, cmd, "--checkpoint", tmp_path / "nowhere")
        assert_one_line_error(rc, err, "nowhere: checkpoint folder not found; pass --checkpoint DIR")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    rc, _, err = run(capsys, "sample", "--checkpoint", broken)
    assert_one_line_error(rc, err, "model.safetensors: corrupt weights file (", "restore it or retrain")
    (broken / "model.safetensors").unlink()
    rc, _, err = run(capsys, "sample", "--checkpoint", broken)
    assert_one_line_error(rc, err, "checkpoint is missing model.safetensors")
    rc, _, err = run(capsys, "sample", "--checkpoint", tiny_checkpoint, "--temperature", "-1")
    assert_one_line_error(rc, err, "--temperature must be >= 0 (got -1.0); 0 means greedy")


def test_usage_errors_are_short(capsys):
    rc, out, err = run(capsys, "sample", "--no-such-flag")
    assert rc == 2
    assert "No such option" in out + err and "Traceback" not in out + err


def test_sample_and_info_on_a_checkpoint(capsys, tiny_checkpoint):
    rc, out, err = run(capsys, "sample", "--checkpoint", tiny_checkpoint, "--prompt", "Tom", "--max-new", "8",
                       "--n", "2", "--seed", "5")
    assert rc == 0, err
    a, b = out.rstrip("\n").split("\n---\n")
    assert a.startswith("Tom") and b.startswith("Tom")
    rc2, out2, _ = run(capsys, "sample", "--checkpoint", tiny_checkpoint, "--prompt", "Tom", "--max-new", "8",
                       "--n", "2", "--seed", "5")
    assert rc2 == 0 and out2 == out  # same seed, same text
    rc, out, err = run(capsys, "info", "--checkpoint", tiny_checkpoint)
    assert rc == 0, err
    assert "hash" in out and "params" in out and "sample" in out


def test_train_through_the_cli(capsys, tiny_corpus, tmp_path):
    out_dir = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--out", out_dir, "--train-corpus", tiny_corpus / "train.txt", "--vocab-size", "280",
                       "--n-ctx", "16", "--d-model", "16", "--n-heads", "4", "--d-mlp", "16", "--steps", "3",
                       "--batch-size", "2", "--eval-every", "3", "--threads", "1", "--no-progress")
    assert rc == 0, err
    assert f"saved {out_dir}: train loss" in out
    assert {"model.safetensors", "config.json", "tokenizer.json", "card.json", "card.md", "train_state.pt"} <= \
        {p.name for p in out_dir.iterdir()}


@pytest.mark.parametrize("launcher", [["handmodel"], [sys.executable, "-m", "verify.cli"]])
def test_real_process_prints_one_line_and_exits_2(launcher, tmp_path):
    if launcher == ["handmodel"] and not any((Path(p) / "handmodel").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("the handmodel console script is not installed (pip install -e .)")
    r = subprocess.run(launcher + ["sample", "--checkpoint", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: checkpoint folder not found; pass --checkpoint DIR (a folder made by `handmodel train`)"]
