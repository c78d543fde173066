"""Bring-your-own-model round trips against the real peer libraries (reference/interop.py, verify/cli/interop.py).

Peers are built offline, small and randomly initialised, with their own libraries: transformers' GPT2LMHeadModel /
GPTNeoForCausalLM and TransformerLens 4's boot_native. Every comparison is log-probs of our loaded checkpoint vs
the peer's own forward on random token batches (<= 1e-4). The libraries are the optional `[interop]` extra: the
tests skip without them, unless HANDMODEL_REQUIRE_INTEROP=1 (then they fail).
"""
from __future__ import annotations

import importlib
import json
import math
import os

import pytest
import torch

from handmodel.errors import UserError
from reference.checkpoint import DEFAULT_DIR, load_checkpoint
from reference.interop import OURS_TO_TL, from_hf_model, from_tl, read_any, write_ours
from verify.cli import main

TOL = 1e-4
SHIPPED_TOK = (DEFAULT_DIR / "tokenizer.json").read_text()


def lib(name: str):
    """The optional library, or a skip naming the extra (a failure under HANDMODEL_REQUIRE_INTEROP=1)."""
    if os.environ.get("HANDMODEL_REQUIRE_INTEROP") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed: pip install -e '.[interop]'")


def wordlevel_tokenizer(n: int) -> str:
    """A real tokenizers JSON with exactly n tokens (for vocabularies our BPE tokenizer does not have)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n - 1)} | {"<|endoftext|>": n - 1}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


@torch.no_grad()
def gap(ours, peer, V: int, T: int, seed: int = 0, batch: int = 3) -> float:
    ids = torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))
    return float((ours(ids).log_softmax(-1) - peer(ids).float().log_softmax(-1)).abs().max())


@torch.no_grad()
def jitter(module: torch.nn.Module, seed: int) -> None:
    """Random init leaves biases 0 and LN gains 1; perturb everything so a dropped or misplaced term shows."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.3)


# -- the shipped model is untouched by the new config fields (no optional library needed) ---------------
def test_shipped_model_unchanged():
    m, _ = load_checkpoint()
    assert m.cfg.to_dict() == json.loads((DEFAULT_DIR / "config.json").read_text())  # config.json written identically
    assert set(m.state_dict()) == {"W_E", "W_pos", "ln1.weight", "ln1.bias", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V",
                                   "W_O", "b_O", "ln2.weight", "ln2.bias", "W_in", "b_in", "W_out", "b_out",
                                   "ln_final.weight", "ln_final.bias", "W_U", "b_U"}
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(3))
    F = torch.nn.functional
    with torch.no_grad():  # the pre-interop forward, spelled out: ReLU, q.k / sqrt(d_head), causal mask
        x = m.W_E[ids] + m.W_pos[:48]
        h = m.ln1(x)
        q, k, v = (torch.einsum("btd,hde->bhte", h, W) + b[None, :, None] for W, b in
                   ((m.W_Q, m.b_Q), (m.W_K, m.b_K), (m.W_V, m.b_V)))
        s = (q @ k.transpose(-1, -2) / math.sqrt(64)).masked_fill(~torch.tril(torch.ones(48, 48, dtype=torch.bool)), -math.inf)
        x = x + torch.einsum("bhte,hed->btd", s.softmax(-1) @ v, m.W_O) + m.b_O
        x = x + F.relu(m.ln2(x) @ m.W_in + m.b_in) @ m.W_out + m.b_out
        want = m.ln_final(x) @ m.W_U + m.b_U
        assert torch.allclose(m(ids), want, atol=1e-5)


# -- Hugging Face -----------------------------------------------------------------------------------------
def hf_peer(kind: str, **kw):
    tf = lib("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=1, **{"vocab_size": 4096, "n_positions": 40, "n_embd": 32, "n_head": 4} | kw)
        hf = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.GPTNeoConfig(num_layers=1, **{"vocab_size": 4096, "max_position_embeddings": 40, "hidden_size": 32,
                                              "num_heads": 4, "attention_types": [[["global"], 1]]} | kw)
        hf = tf.GPTNeoForCausalLM(cfg)
    jitter(hf, 1)
    return hf.eval()


HF_CASES = {
    "gpt2-gelu_new-tied": ("gpt2", {}),
    "gpt2-relu-untied": ("gpt2", {"activation_function": "relu", "tie_word_embeddings": False, "n_inner": 48}),
    "gpt2-gelu-unscaled": ("gpt2", {"activation_function": "gelu", "scale_attn_weights": False}),
    "neo-global": ("neo", {}),
    "neo-local": ("neo", {"attention_types": [[["local"], 1]], "window_size": 6}),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_import_matches_transformers(case, tmp_path):
    kind, kw = HF_CASES[case]
    hf = hf_peer(kind, **kw)
    write_ours(from_hf_model(hf, SHIPPED_TOK, case), tmp_path / "ck")
    ours, card = load_checkpoint(tmp_path / "ck")  # through every check the commands apply
    assert gap(ours, lambda ids: hf(ids).logits, 4096, 40) <= TOL
    assert card["tied_embeddings"] == ("untied" not in case)


def test_hf_folder_with_50k_vocabulary_through_the_cli(tmp_path, capsys):
    hf = hf_peer("gpt2", vocab_size=50257, n_embd=16, n_head=2)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(wordlevel_tokenizer(50257))
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    assert "log-prob gap vs source" in capsys.readouterr().out
    ours, card = load_checkpoint(tmp_path / "ck")
    assert ours.cfg.vocab_size == 50257 and "import_check" in card
    assert gap(ours, lambda ids: hf(ids).logits, 50257, 40, seed=5) <= TOL


def test_multilayer_and_mismatched_models_are_refused(tmp_path, capsys):
    tf = lib("transformers")
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=4096, n_positions=16, n_embd=16, n_layer=2, n_head=2)).save_pretrained(tmp_path / "two")
    capsys.readouterr()  # save_pretrained's progress bar is not ours
    assert main(["import", str(tmp_path / "two"), "--out", str(tmp_path / "x"), "--tokenizer",
                 str(DEFAULT_DIR / "tokenizer.json")]) == 2
    err = capsys.readouterr().err
    assert "2-layer model" in err and "one-layer" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="3-layer"):
        from_tl({"n_layers": 3, "d_model": 8, "n_heads": 2, "d_head": 4}, {}, SHIPPED_TOK, "tl")
    with pytest.raises(UserError, match="tokenizer has 4096 tokens but the model's vocabulary is 50"):
        from_hf_model(hf_peer("gpt2", vocab_size=50), SHIPPED_TOK, "small")


# -- TransformerLens ----------------------------------------------------------------------------------------
def tl_native(**kw):
    lib("transformer_lens")
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(**({"n_layers": 1, "d_model": 32, "d_head": 8, "n_heads": 4, "d_mlp": 48,
                                      "d_vocab": 4096, "n_ctx": 40, "act_fn": "relu", "normalization_type": "LN",
                                      "positional_embedding_type": "standard", "architecture": "TransformerLensNative",
                                      "seed": 0} | kw))
    bridge = TransformerBridge.boot_native(cfg)
    jitter(bridge, 2)
    return bridge.eval(), cfg


def property_dict(bridge, cfg) -> dict[str, torch.Tensor]:
    """The bridge's weights in HookedTransformer property format, checked against TL's own converter."""
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    sd, H, Dh, D = bridge.state_dict(), cfg.n_heads, cfg.d_head, cfg.d_model
    out = {"embed.W_E": sd["embed.weight"], "pos_embed.W_pos": sd["pos_embed.weight"],
           "unembed.W_U": sd["unembed.weight"].T, "unembed.b_U": sd["unembed.bias"],
           "blocks.0.attn.W_O": sd["blocks.0.attn.o.weight"].T.reshape(H, Dh, D), "blocks.0.attn.b_O": sd["blocks.0.attn.o.bias"]}
    for n in "QKV":
        out[f"blocks.0.attn.W_{n}"] = sd[f"blocks.0.attn.{n.lower()}.weight"].reshape(H, Dh, D).transpose(1, 2)
        out[f"blocks.0.attn.b_{n}"] = sd[f"blocks.0.attn.{n.lower()}.bias"].reshape(H, Dh)
    for k, t in sd.items():
        if k.startswith(("ln_final.", "blocks.0.ln", "blocks.0.mlp.ln.")):
            out[k.replace(".weight", ".w").replace(".bias", ".b")] = t
        elif k.startswith("blocks.0.mlp."):
            out[k.replace(".in.weight", ".W_in").replace(".out.weight", ".W_out").replace(".in.bias", ".b_in")
                 .replace(".out.bias", ".b_out")] = t.T if k.endswith("weight") else t
    conv = convert_tl_checkpoint(out, cfg)
    assert conv.keys() == sd.keys() and all(torch.equal(conv[k], sd[k]) for k in sd)  # the layout is TL's
    return {k: v.contiguous() for k, v in out.items()}


def tl_from_export(folder):
    """Load an exported folder the way docs/interop.md tells a TransformerLens 4 user to."""
    from safetensors.torch import load_file
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    cfg = TransformerBridgeConfig.from_dict(json.loads((folder / "config.json").read_text()) | {"architecture": "TransformerLensNative"})
    bridge = TransformerBridge.boot_native(cfg)
    res = bridge.load_state_dict(convert_tl_checkpoint(load_file(str(folder / "model.safetensors")), cfg), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return bridge.eval()


TL_CASES = {"relu": {}, "gelu": {"act_fn": "gelu"}, "solu_ln": {"act_fn": "solu_ln"},
            "attn_only": {"attn_only": True}, "lnpre_gelu_new": {"normalization_type": "LNPre", "act_fn": "gelu_new"}}


@pytest.mark.parametrize("case", TL_CASES)
def test_tl_native_import_and_export_round_trip(case, tmp_path):
    from safetensors.torch import save_file

    bridge, cfg = tl_native(**TL_CASES[case])
    src = tmp_path / "tl"
    src.mkdir()
    save_file(property_dict(bridge, cfg), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({k: cfg.to_dict()[k] for k in (
        "n_layers", "d_model", "d_head", "n_heads", "d_mlp", "d_vocab", "n_ctx", "act_fn", "eps", "normalization_type",
        "attn_only", "positional_embedding_type")}))
    (src / "tokenizer.json").write_text(SHIPPED_TOK)
    write_ours(read_any(str(src)), tmp_path / "ck")
    ours, _ = load_checkpoint(tmp_path / "ck")
    assert (ours.cfg.d_mlp == 0) == (case == "attn_only") and ours.cfg.act_fn == TL_CASES[case].get("act_fn", "relu")
    assert gap(ours, bridge, 4096, 40) <= TOL
    assert main(["export", "--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "ck")]) == 0
    assert gap(ours, tl_from_export(tmp_path / "out"), 4096, 40, seed=1) <= TOL


def test_export_shipped_and_unscaled_models_load_in_transformer_lens(tmp_path):
    lib("transformer_lens")
    assert main(["export", "--out", str(tmp_path / "shipped"), "--to", "transformer-lens"]) == 0
    ours, _ = load_checkpoint()
    assert gap(ours, tl_from_export(tmp_path / "shipped"), 4096, 64, batch=2) <= TOL
    # GPT-Neo's unscaled attention has no TL-native switch: the export folds sqrt(d_head) into W_Q, b_Q
    neo = hf_peer("neo")
    write_ours(from_hf_model(neo, SHIPPED_TOK, "neo"), tmp_path / "neo")
    assert main(["export", "--out", str(tmp_path / "neo_tl"), "--checkpoint", str(tmp_path / "neo")]) == 0
    assert gap(lambda ids: neo(ids).logits, tl_from_export(tmp_path / "neo_tl"), 4096, 40) <= TOL


def test_local_attention_export_is_refused(tmp_path, capsys):
    lib("transformers")
    write_ours(from_hf_model(hf_peer("neo", attention_types=[[["local"], 1]], window_size=6), SHIPPED_TOK, "neo"), tmp_path / "ck")
    assert main(["export", "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "ck")]) == 2
    assert "local attention (window 6)" in capsys.readouterr().err


def test_property_names_cover_our_state_dict():
    m, _ = load_checkpoint()
    assert set(m.state_dict()) <= set(OURS_TO_TL)


def test_import_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "tl").mkdir()
    (tmp_path / "tl" / "config.json").write_text(json.dumps({"n_layers": 1, "d_vocab": 10, "d_model": 8, "n_heads": 2}))
    cases = [(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "no config.json"),
             (["import", str(tmp_path / "bad"), "--out", str(tmp_path / "o")], "not valid JSON"),
             (["import", str(tmp_path / "tl"), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "t.json")],
              "tokenizer file not found"),
             (["import", str(tmp_path / "tl"), "--out", str(tmp_path / "o")], "no weights"),
             (["export", "--out", str(tmp_path / "o"), "--to", "onnx"], "unknown export format")]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_new_config_fields_are_checked_on_load(tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(DEFAULT_DIR, ck)
    base = json.loads((DEFAULT_DIR / "config.json").read_text())
    for extra, needle in (({"act_fn": "swish"}, "act_fn='swish' must be one of"), ({"window": -1}, "window=-1"),
                          ({"scale_attn": "no"}, "scale_attn='no'"), ({"d_mlp": 0}, "weights do not match")):
        (ck / "config.json").write_text(json.dumps(base | extra))
        with pytest.raises(UserError, match=needle):
            load_checkpoint(ck)
    (ck / "config.json").write_text(json.dumps(base | {"act_fn": "gelu", "window": 8}))
    m, _ = load_checkpoint(ck)  # same weights, other architecture: loads, and computes something else
    assert m.cfg.act_fn == "gelu" and m.cfg.window == 8 and not torch.equal(m.causal, torch.tril(m.causal.new_ones(256, 256)))
