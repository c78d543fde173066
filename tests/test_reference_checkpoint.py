"""Checkpoint folders: bit-exact save/load, the content hash, and one clear line for every broken folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from handmodel.errors import UserError
from reference.checkpoint import FILES, checkpoint_hash, load_checkpoint, same_state, save_checkpoint, tokenizer_sha
from reference.model import ModelConfig, OneLayerTransformer
from reference.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(story_maker):
    return train_tokenizer(story_maker(50, seed=5), vocab_size=290)


@pytest.fixture
def ckpt(tmp_path, tok):
    """A fresh folder holding a random tiny model; tests may break it."""
    torch.manual_seed(0)
    model = OneLayerTransformer(ModelConfig(vocab_size=tok.get_vocab_size(), n_ctx=16, d_model=32, n_heads=4, d_mlp=40))
    out = tmp_path / "ckpt"
    save_checkpoint(model, out, tok.to_str(), {"steps": 0, "note": {"what": "test"}})
    return out, model


def load_error(path) -> str:
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_round_trip_is_bit_exact(ckpt):
    out, model = ckpt
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json", "card.json", "card.md"}
    loaded, card = load_checkpoint(out)
    assert not loaded.training
    assert loaded.cfg == model.cfg
    assert same_state(loaded.state_dict(), model.state_dict())
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values())
    assert card == {"steps": 0, "note": {"what": "test"}, "tokenizer_sha256": tokenizer_sha((out / "tokenizer.json").read_text())}
    assert "- **steps**: 0" in (out / "card.md").read_text()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))


def test_saving_again_gives_identical_files_and_hash(ckpt, tok, tmp_path):
    out, model = ckpt
    loaded, card = load_checkpoint(out)
    again = tmp_path / "again"
    save_checkpoint(loaded, again, tok.to_str(), card)
    for f in FILES:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    assert checkpoint_hash(out) == checkpoint_hash(again)
    assert len(checkpoint_hash(out)) == 16
    with torch.no_grad():
        loaded.b_U[0] += 1e-3
    save_checkpoint(loaded, again, tok.to_str(), card)
    assert checkpoint_hash(out) != checkpoint_hash(again)
    assert not same_state(loaded.state_dict(), model.state_dict())


def test_missing_folder(tmp_path):
    msg = load_error(tmp_path / "nowhere")
    assert msg.endswith("nowhere: checkpoint folder not found; pass --checkpoint DIR (a folder made by `handmodel train`)")


@pytest.mark.parametrize("name", FILES)
def test_missing_file(ckpt, name):
    out, _ = ckpt
    (out / name).unlink()
    assert load_error(out) == f"{out}: checkpoint is missing {name}; re-run `handmodel train` or copy the whole folder"


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_corrupt_weights(ckpt, how):
    out, _ = ckpt
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"\x00\xff not safetensors" * 20, "truncated": data[: len(data) // 2], "empty": b""}[how])
    msg = load_error(out)
    assert msg.startswith(f"{f}: corrupt weights file (") and msg.endswith("); restore it or retrain")


@pytest.mark.parametrize("content, why", [
    ("{ not json", "Expecting property name"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("{}", "missing vocab_size, n_ctx, d_model, n_heads, d_mlp, ln_eps"),
    ('{"vocab_size": 290, "n_ctx": 16, "d_model": 32, "n_heads": 4, "d_mlp": 40}', "missing ln_eps"),
    ('{"vocab_size": 290, "n_ctx": -16, "d_model": 32, "n_heads": 4, "d_mlp": 40, "ln_eps": 1e-5}',
     "n_ctx=-16 must be a positive integer"),
    ('{"vocab_size": "290", "n_ctx": 16, "d_model": 32, "n_heads": 4, "d_mlp": 40, "ln_eps": 1e-5}',
     "vocab_size='290' must be a positive integer"),
    ('{"vocab_size": 290, "n_ctx": 16, "d_model": 30, "n_heads": 4, "d_mlp": 40, "ln_eps": 1e-5}',
     "d_model=30 is not divisible by n_heads=4"),
])
def test_corrupt_config(ckpt, content, why):
    out, _ = ckpt
    (out / "config.json").write_text(content)
    msg = load_error(out)
    assert msg.startswith(f"{out / 'config.json'}: corrupt config (")
    assert why in msg
    assert msg.endswith("); restore it from the training run")


def test_corrupt_tokenizer(ckpt):
    out, _ = ckpt
    (out / "tokenizer.json").write_text("{ nope")
    assert load_error(out) == f"{out / 'tokenizer.json'}: corrupt tokenizer file; copy it from the training run"


def test_config_and_tokenizer_vocab_mismatch(ckpt, story_maker):
    out, _ = ckpt
    other = train_tokenizer(story_maker(50, seed=6), vocab_size=320)
    (out / "tokenizer.json").write_text(other.to_str())
    assert load_error(out) == (f"{out}: tokenizer has 320 tokens but config.json says vocab_size=290; "
                               "the tokenizer and the weights come from different runs")


def test_weights_do_not_match_config(ckpt):
    out, _ = ckpt
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "d_mlp": 64}))
    msg = load_error(out)
    assert msg.startswith(f"{out}: weights do not match config.json (")
    assert msg.endswith("); the files come from different runs")
    assert "W_in" in msg


def test_weights_from_another_model_with_same_config(ckpt, tmp_path, tok):
    """A folder copied together from two runs with equal shapes loads (nothing to detect), but the hash tells them apart."""
    out, model = ckpt
    torch.manual_seed(1)
    other = tmp_path / "other"
    save_checkpoint(OneLayerTransformer(model.cfg), other, tok.to_str(), {})
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(other / "model.safetensors", mixed / "model.safetensors")
    load_checkpoint(mixed)
    assert checkpoint_hash(mixed) != checkpoint_hash(out)


# -- issue 23: damaged or mismatched checkpoints fail fast and say why ------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_on_load(ckpt, bad):
    out, model = ckpt
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["W_in"][3, 5] = bad
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"))
    msg = load_error(out)
    assert msg == (f"{out / 'model.safetensors'}: tensor W_in has 1 NaN/inf values; the weights are damaged "
                   "(or training diverged): restore them or retrain")


def test_a_huge_n_ctx_in_config_fails_fast(ckpt):
    """n_ctx = 100000 would allocate a 10^10-entry causal mask before load_state_dict noticed."""
    import resource
    import time

    out, _ = ckpt
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "n_ctx": 100000}))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    msg = load_error(out)
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 500_000  # KiB: nothing big was built
    assert msg == (f"{out}: weights do not match config.json (W_pos is [16, 32], config.json implies [100000, 32]); "
                   "the files come from different runs")


def test_a_foreign_tokenizer_of_the_same_size_is_caught(ckpt, story_maker):
    """Same vocabulary size, other merges: every id would decode to other text. The card's hash catches it,
    in the torch loader and in verify's torch-free checkpoint check alike."""
    from verify.ledger.data import checkpoint_info

    out, _ = ckpt
    card = json.loads((out / "card.json").read_text())
    assert len(card["tokenizer_sha256"]) == 64
    checkpoint_info(out)
    other = train_tokenizer(story_maker(50, seed=9), vocab_size=290)
    assert other.get_vocab_size() == 290 and other.to_str() != (out / "tokenizer.json").read_text()
    (out / "tokenizer.json").write_text(other.to_str())
    msg = load_error(out)
    assert msg.startswith(f"{out / 'tokenizer.json'}: not the tokenizer this model was trained with (card.json records sha256 ")
    with pytest.raises(UserError, match="not the tokenizer this model was trained with"):
        checkpoint_info(out)


def test_the_shipped_card_records_its_tokenizer(shipped_checkpoint):
    import hashlib

    card = json.loads((shipped_checkpoint / "card.json").read_text())
    assert card["tokenizer_sha256"] == hashlib.sha256((shipped_checkpoint / "tokenizer.json").read_bytes()).hexdigest()
