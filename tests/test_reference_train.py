"""Training: the loss goes down, the same command gives the same model, an interrupted run resumes into
exactly the weights of an uninterrupted one, and data-parallel training on 2 CPU processes (gloo)
follows the single-process loss curve."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from handmodel.errors import UserError
from reference.checkpoint import load_checkpoint
from reference.model import OneLayerTransformer
from reference.train import TrainConfig, batch_at, evaluate, lr_at, train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda *_: None)


class Interrupted(Exception):
    pass


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def history(out: Path) -> list[dict]:
    return torch.load(out / "train_state.pt", weights_only=False)["history"]


def test_a_tiny_model_learns(tiny_checkpoint, tiny_corpus):
    card = json.loads((tiny_checkpoint / "card.json").read_text())
    model, _ = load_checkpoint(tiny_checkpoint)
    V = model.cfg.vocab_size
    hist = history(tiny_checkpoint)
    assert [h["step"] for h in hist] == [20, 40, 60]
    assert hist[0]["train_loss"] > hist[1]["train_loss"] > hist[2]["train_loss"]
    assert hist[0]["valid_loss"] > hist[1]["valid_loss"] > hist[2]["valid_loss"]
    # an untrained model sits at about ln(V); the trained one is far below it on held-out stories
    from reference.corpus import read_stories, token_stream
    from reference.tokenizer import load_tokenizer

    vstream = token_stream(load_tokenizer(tiny_checkpoint / "tokenizer.json"), read_stories(tiny_corpus / "valid.txt"))
    torch.manual_seed(0)
    untrained = evaluate(OneLayerTransformer(model.cfg), vstream, model.cfg.n_ctx, 2048, "cpu")
    assert abs(untrained - math.log(V)) < 0.2
    assert card["valid_loss_full"] < 0.6 * untrained
    assert card["steps"] == 60 and card["tokens_seen"] == 60 * 8 * 32 and card["finished"] is True
    assert card["valid_tokens"] == len(vstream) and card["params"] == model.n_params()
    for key in ("data", "train_tokens", "train_loss", "valid_loss", "model", "training"):
        assert key in card
    assert (tiny_checkpoint / "card.md").read_text().startswith("# Model card")


def test_same_command_same_model_and_resume_is_seamless(tiny_corpus, tiny_config, tmp_path):
    kw = dict(steps=12, eval_every=1, ckpt_every=4)
    full = tmp_path / "full"
    train(tiny_config(tiny_corpus, full, **kw), resume=False, **quiet)

    again = tmp_path / "again"  # the same command again: the same model, bit for bit
    train(tiny_config(tiny_corpus, again, **kw), resume=False, **quiet)
    w_full = weights(full)
    assert all(torch.equal(w_full[k], weights(again)[k]) for k in w_full)

    # a run interrupted after step 6 (last checkpoint: step 4), then resumed with the same command
    cut = tmp_path / "cut"

    def interrupt(line):
        if json.loads(line)["step"] == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_config(tiny_corpus, cut, **kw), resume=True, progress=False, log=interrupt)
    assert torch.load(cut / "train_state.pt", weights_only=False)["step"] == 4
    assert json.loads((cut / "card.json").read_text())["finished"] is False
    lines = []
    card = train(tiny_config(tiny_corpus, cut, **kw), resume=True, progress=False, log=lines.append)
    assert lines[0] == f"resuming {cut} at step 4"
    assert [json.loads(x)["step"] for x in lines[1:]] == list(range(5, 13))
    w_cut = weights(cut)
    assert w_cut.keys() == w_full.keys()
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full), "resumed run diverged from the uninterrupted one"
    assert history(cut) == history(full)
    assert card == json.loads((full / "card.json").read_text())
    assert torch.load(cut / "train_state.pt", weights_only=False)["opt"]["state"].keys() == \
        torch.load(full / "train_state.pt", weights_only=False)["opt"]["state"].keys()

    # resuming a finished run trains nothing and returns its card
    assert train(tiny_config(tiny_corpus, cut, **kw), resume=True, **quiet) == card
    assert all(torch.equal(w_cut[k], weights(cut)[k]) for k in w_cut)


def test_resume_with_other_settings_is_refused(tiny_corpus, tiny_config, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_corpus, out, steps=2), resume=False, **quiet)
    with pytest.raises(UserError, match=r"run: holds a run with different settings; pass a new --out or --no-resume to overwrite"):
        train(tiny_config(tiny_corpus, out, steps=2, lr=5e-3), resume=True, **quiet)
    train(tiny_config(tiny_corpus, out, steps=2, lr=5e-3), resume=False, **quiet)  # --no-resume overwrites


def test_schedule_and_batches():
    from reference.model import ModelConfig

    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_frac=0.1, model=ModelConfig(n_ctx=8), batch_size=4, seed=3)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(100, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    stream = np.arange(1000, dtype=np.int32)
    b = batch_at(stream, 7, cfg)
    assert b.shape == (4, 9) and b.dtype == np.int64
    assert (np.diff(b, axis=1) == 1).all()  # contiguous windows: inputs + next-token targets
    np.testing.assert_array_equal(b, batch_at(stream, 7, cfg))
    assert not np.array_equal(b, batch_at(stream, 8, cfg))
    tiny = np.arange(10, dtype=np.int32)  # the smallest stream allowed: n_ctx + 2 tokens
    assert batch_at(tiny, 0, cfg).max() <= 9


def test_bad_training_inputs(tiny_corpus, tiny_config, tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n")
    with pytest.raises(UserError, match=r"empty\.txt: corpus is empty"):
        train(tiny_config(tiny_corpus, tmp_path / "o", corpus=str(tmp_path / "empty.txt")), **quiet)
    (tmp_path / "short.txt").write_text("Hi.\n<|endoftext|>\n")
    with pytest.raises(UserError, match=r"short\.txt: only \d+ tokens; training needs more than n_ctx=32"):
        train(tiny_config(tiny_corpus, tmp_path / "o", corpus=str(tmp_path / "short.txt")), **quiet)
    with pytest.raises(UserError, match=r"nope\.txt: no such file or folder; check the --corpus path"):
        train(tiny_config(tiny_corpus, tmp_path / "o", valid=str(tmp_path / "nope.txt")), **quiet)
    with pytest.raises(UserError, match=r"tok\.json: tokenizer file not found"):
        train(tiny_config(tiny_corpus, tmp_path / "o", tokenizer=str(tmp_path / "tok.json")), **quiet)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"--device cuda: no CUDA GPU is visible; use --device cpu"):
            train(tiny_config(tiny_corpus, tmp_path / "o", device="cuda"), **quiet)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match=r"--batch-size 8 is not divisible by the 3 processes; pick a multiple"):
        train(tiny_config(tiny_corpus, tmp_path / "o"), **quiet)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tiny_corpus, tiny_config, tmp_path):
    """`torchrun --nproc-per-node 2 handmodel train ...` (gloo) gives the loss curve of one process on the same
    global batch: each rank trains on half of it and DDP averages the gradients."""
    args = dict(vocab_size=300, n_ctx=32, d_model=32, n_heads=4, d_mlp=64, steps=6, batch_size=8, lr=1e-2, warmup=2,
                eval_every=1, ckpt_every=1000, seed=0, threads=1)
    # (the CLI evaluates up to 65536 held-out tokens: the whole tiny valid.txt)
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "verify.cli",
           "train", "--out", str(ddp_out), "--train-corpus", str(tiny_corpus / "train.txt"),
           "--corpus", str(tiny_corpus / "valid.txt"), "--no-progress"]
    cmd += [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"saved {ddp_out}") >= 1

    one_out = tmp_path / "one"
    model_kw = {k: args.pop(k) for k in ("n_ctx", "d_model", "n_heads", "d_mlp")}
    cfg = tiny_config(tiny_corpus, one_out, eval_tokens=65536, **args)
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    train(cfg, resume=False, **quiet)

    h_ddp, h_one = history(ddp_out), history(one_out)
    assert [h["step"] for h in h_ddp] == [h["step"] for h in h_one] == list(range(1, 7))
    for a, b in zip(h_ddp, h_one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)
    assert h_one[-1]["train_loss"] < h_one[0]["train_loss"]
    w_ddp, w_one = weights(ddp_out), weights(one_out)
    # b_K's true gradient is exactly 0 (softmax ignores a shift shared by all keys), so what it gets is float
    # rounding, which differs between the two reductions and which Adam scales up: it is left out.
    assert set(w_ddp) == set(w_one)
    for k in sorted(set(w_one) - {"b_K"}):
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
