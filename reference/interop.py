"""Bring your own one-layer model: TransformerLens / Hugging Face checkpoints <-> our checkpoint format.

Import converts once into our folder format (reference/checkpoint.py), so every command runs unchanged on
the result. Export writes our weights in TransformerLens's HookedTransformer property format
(`blocks.0.attn.W_Q` [H, D, Dh], ...), which is also our own parameter layout, so both directions are renames
plus a few reshapes. Weights stay UNPROCESSED both ways: no fold_ln, no centring, no folded value biases
(TransformerLens's from_pretrained defaults apply those; claims and `inspect` read the checkpoint's own
weights, so "a neuron" and "a head's output" mean what the checkpoint stored).

Differences the import absorbs exactly: absent biases become zeros (GPT-Neo's q/k/v, every unembedding
bias), tied embeddings are copied (W_U = W_E^T, noted on the card), LNPre becomes LN with unit gain.
Differences our model grew config fields for (reference/model.py): act_fn, scale_attn, window, d_mlp=0.
torch only at import time; `transformers` is imported only to read Hugging Face folders.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from handmodel.errors import UserError

from .checkpoint import save_checkpoint
from .model import ModelConfig, OneLayerTransformer

# TransformerLens property name -> our parameter name (same tensor layout: TL's per-head shapes).
TL_TO_OURS = {
    "embed.W_E": "W_E", "pos_embed.W_pos": "W_pos",
    "blocks.0.ln1.w": "ln1.weight", "blocks.0.ln1.b": "ln1.bias",
    "blocks.0.attn.W_Q": "W_Q", "blocks.0.attn.W_K": "W_K", "blocks.0.attn.W_V": "W_V", "blocks.0.attn.W_O": "W_O",
    "blocks.0.attn.b_Q": "b_Q", "blocks.0.attn.b_K": "b_K", "blocks.0.attn.b_V": "b_V", "blocks.0.attn.b_O": "b_O",
    "blocks.0.ln2.w": "ln2.weight", "blocks.0.ln2.b": "ln2.bias",
    "blocks.0.mlp.W_in": "W_in", "blocks.0.mlp.b_in": "b_in", "blocks.0.mlp.W_out": "W_out", "blocks.0.mlp.b_out": "b_out",
    "blocks.0.mlp.ln.w": "ln_mlp.weight", "blocks.0.mlp.ln.b": "ln_mlp.bias",
    "ln_final.w": "ln_final.weight", "ln_final.b": "ln_final.bias",
    "unembed.W_U": "W_U", "unembed.b_U": "b_U",
}
OURS_TO_TL = {v: k for k, v in TL_TO_OURS.items()}
_TL_BUFFERS = (".mask", ".IGNORE")  # HookedTransformer buffers, not weights
_HF_ACT = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_TL_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "solu_ln": "solu_ln"}


@dataclass
class Converted:
    """A model in our format, not yet written: config, our-named state dict, tokenizer JSON, card notes."""
    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer_json: str
    card: dict
    peer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the source library's own forward: ids -> logits


# -- shared checks -------------------------------------------------------------------------------------
def _one_layer(n: int, src: str) -> None:
    if n != 1:
        raise UserError(f"{src}: a {n}-layer model; handmodel reverse-engineers one-layer models only (n_layers=1)")


def _complete(cfg: ModelConfig, state: dict[str, torch.Tensor], src: str, unit_ln: bool = False) -> dict[str, torch.Tensor]:
    """Fill absent biases with zeros (and, for LNPre, LN gains with ones); check every shape against ours."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in OneLayerTransformer(cfg).state_dict().items()}
    out = {}
    for k, shape in want.items():
        if k in state:
            t = state[k].detach().to(torch.float32).contiguous()
            if tuple(t.shape) != shape:
                raise UserError(f"{src}: {OURS_TO_TL.get(k, k)} has shape {tuple(t.shape)}, expected {shape} "
                                "from the config; the weights and the config come from different models")
            out[k] = t
        elif math.prod(shape) == 0:  # an attention-only model's empty MLP
            out[k] = torch.zeros(shape)
        elif (unit_ln and k in ("ln1.weight", "ln2.weight", "ln_final.weight")) or (cfg.d_mlp == 0 and k == "ln2.weight"):
            out[k] = torch.ones(shape)
        elif k.startswith("b_") or k.endswith(".bias"):
            out[k] = torch.zeros(shape)
        else:
            raise UserError(f"{src}: weights lack {OURS_TO_TL.get(k, k)}; the checkpoint is incomplete")
    bad = [k for k, t in out.items() if not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{src}: {OURS_TO_TL.get(bad[0], bad[0])} holds NaN or inf; the checkpoint is corrupt")
    return out


def _vocab_size_of(tokenizer_json: str) -> int:
    """The token count load_checkpoint will see (same formula), so a mismatch is caught at import."""
    d = json.loads(tokenizer_json)
    return len(set(d["model"]["vocab"].values()) | set(range(len(d.get("added_tokens", [])))))


def _check_tokenizer(tokenizer_json: str, vocab: int, src: str) -> None:
    try:
        n = _vocab_size_of(tokenizer_json)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        raise UserError(f"{src}: the tokenizer is not a tokenizers JSON with a model.vocab (BPE/WordLevel); "
                        "pass --tokenizer tokenizer.json") from None
    if n != vocab:
        raise UserError(f"{src}: the tokenizer has {n} tokens but the model's vocabulary is {vocab}; "
                        "pass the tokenizer the model was trained with (--tokenizer tokenizer.json)")


# -- TransformerLens ------------------------------------------------------------------------------------
def from_tl(tl_cfg: dict, sd: dict[str, torch.Tensor], tokenizer_json: str, src: str) -> Converted:
    """A TransformerLens config (HookedTransformerConfig / TransformerBridgeConfig fields) + property state dict."""
    g = tl_cfg.get
    _one_layer(int(g("n_layers", 0)), src)
    unsupported = [f for f in ("gated_mlp", "final_rms", "parallel_attn_mlp", "shortformer_pos", "post_embedding_ln",
                               "use_qk_norm") if g(f)]
    if (g("positional_embedding_type") or "standard") != "standard":
        unsupported.append(f"positional_embedding_type={g('positional_embedding_type')}")
    norm = g("normalization_type", g("normalization", "LN"))
    if norm not in ("LN", "LNPre"):
        unsupported.append(f"normalization_type={norm}")
    act = (g("act_fn") or "relu").lower()
    if not g("attn_only") and act not in _TL_ACT:
        unsupported.append(f"act_fn={act}")
    if (g("n_key_value_heads") or g("n_heads")) != g("n_heads"):
        unsupported.append("grouped-query attention")
    if unsupported:
        raise UserError(f"{src}: {', '.join(unsupported)} is not supported; handmodel's reference is a pre-LN "
                        "transformer with standard positions and a relu/gelu/gelu_new/solu_ln MLP")
    d_model, n_heads = int(g("d_model")), int(g("n_heads"))
    d_head = int(g("d_head") or d_model // n_heads)  # TransformerLens's own defaults for absent fields
    if n_heads * d_head != d_model:
        raise UserError(f"{src}: n_heads*d_head = {n_heads}*{d_head} != d_model={d_model}; handmodel needs d_head = d_model/n_heads")
    scaled = bool(g("use_attn_scale", True))
    scale = g("attn_scale", -1.0)
    if scaled and scale not in (None, -1, -1.0) and not math.isclose(float(scale), math.sqrt(d_head)):
        raise UserError(f"{src}: attn_scale={scale} is neither sqrt(d_head) nor 1; not supported")
    window = 0
    if g("use_local_attn") and (g("attn_types") or ["global"])[0] == "local":
        window = int(g("window_size"))
    cfg = ModelConfig(vocab_size=int(g("d_vocab")), n_ctx=int(g("n_ctx")), d_model=d_model, n_heads=n_heads,
                      d_mlp=0 if g("attn_only") else int(g("d_mlp") or 4 * d_model), ln_eps=float(g("eps", 1e-5)),
                      act_fn="relu" if g("attn_only") else _TL_ACT[act], scale_attn=scaled, window=window)
    state = {}
    for k, t in sd.items():
        if k.endswith(_TL_BUFFERS):
            continue
        if k.startswith("blocks.") and not k.startswith("blocks.0."):
            _one_layer(1 + max(int(x.split(".")[1]) for x in sd if x.startswith("blocks.")), src)
        if k not in TL_TO_OURS:
            raise UserError(f"{src}: weight {k!r} is not a one-layer TransformerLens parameter this import knows; "
                            "refusing rather than dropping it")
        state[TL_TO_OURS[k]] = t
    _check_tokenizer(tokenizer_json, cfg.vocab_size, src)
    card = {"imported_from": src, "format": "TransformerLens property state dict (unprocessed: no fold_ln/centring)",
            "act_fn": cfg.act_fn, "attn_only": cfg.d_mlp == 0, "normalization": norm,
            "unembed_bias": "unembed.b_U" in sd}
    return Converted(cfg, _complete(cfg, state, src, unit_ln=norm == "LNPre"), tokenizer_json, card)


def to_tl(model: OneLayerTransformer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our model -> (TransformerLens config dict, property-format state dict), for TL 4 boot_native and TL 3.x.

    Unscaled attention is folded into W_Q/b_Q (TL-native always scales); local attention has no TL-native form.
    """
    cfg = model.cfg
    if cfg.window and cfg.window < cfg.n_ctx:
        raise UserError(f"this model uses local attention (window {cfg.window}); TransformerLens's native model has "
                        "none, so an export would compute a different function")
    tl_cfg = {"n_layers": 1, "d_model": cfg.d_model, "d_head": cfg.d_head, "n_heads": cfg.n_heads,
              "d_mlp": cfg.d_mlp or None, "d_vocab": cfg.vocab_size, "n_ctx": cfg.n_ctx, "act_fn": cfg.act_fn,
              "eps": cfg.ln_eps, "normalization_type": "LN", "attn_only": cfg.d_mlp == 0,
              "positional_embedding_type": "standard"}
    sd = {}
    for k, t in model.state_dict().items():
        if cfg.d_mlp == 0 and (k in ("W_in", "b_in", "W_out", "b_out", "ln2.weight", "ln2.bias")):
            continue  # TL's attn_only block has no MLP and no ln2
        t = t.detach().cpu().clone().contiguous()
        if not cfg.scale_attn and k in ("W_Q", "b_Q"):
            t = t * math.sqrt(cfg.d_head)  # q.k == (sqrt(d_head) q).k / sqrt(d_head)
        sd[OURS_TO_TL[k]] = t
    return tl_cfg, sd


def read_tl_folder(folder: Path, tokenizer_json: str | None) -> Converted:
    """A folder holding a TL config.json and a property-format state dict (.safetensors, or .pth/.pt)."""
    tl_cfg = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*final.pth")) or \
        sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
    if not files:
        raise UserError(f"{folder}: no weights (*.safetensors, *final.pth, *.pth) beside config.json")
    try:
        sd = load_file(str(files[0])) if files[0].suffix == ".safetensors" else \
            torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{files[0]}: unreadable weights ({str(e)[:100]})") from None
    if tokenizer_json is None:
        tokenizer_json = _folder_tokenizer(folder, tl_cfg.get("tokenizer_name"))
    return from_tl(tl_cfg, sd, tokenizer_json, str(folder))


# -- Hugging Face (GPT-2, GPT-Neo) ---------------------------------------------------------------------
def from_hf_model(hf, tokenizer_json: str, src: str) -> Converted:
    """A transformers GPT2LMHeadModel / GPTNeoForCausalLM (one layer) -> our format."""
    c = hf.config
    kind = c.model_type
    if kind not in ("gpt2", "gpt_neo"):
        raise UserError(f"{src}: model_type {kind!r} is not supported; import GPT-2 or GPT-Neo one-layer models")
    _one_layer(c.n_layer if kind == "gpt2" else c.num_layers, src)
    act = c.activation_function
    if act not in _HF_ACT:
        raise UserError(f"{src}: activation {act!r} is not supported (relu, gelu, gelu_new)")
    D, H = c.hidden_size, c.num_attention_heads
    Dh = D // H
    inner = (c.n_inner if kind == "gpt2" else c.intermediate_size) or 4 * D
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    per_head_in = lambda w: w.reshape(D, H, Dh).permute(1, 0, 2)  # [D, H*Dh] -> [H, D, Dh]
    s = {"W_E": sd["wte.weight"], "W_pos": sd["wpe.weight"], "ln1.weight": sd["h.0.ln_1.weight"],
         "ln1.bias": sd["h.0.ln_1.bias"], "ln2.weight": sd["h.0.ln_2.weight"], "ln2.bias": sd["h.0.ln_2.bias"],
         "ln_final.weight": sd["ln_f.weight"], "ln_final.bias": sd["ln_f.bias"],
         "W_U": hf.get_output_embeddings().weight.T}
    window = 0
    if kind == "gpt2":  # Conv1D: weights are [in, out]
        if getattr(c, "add_cross_attention", False):
            raise UserError(f"{src}: cross-attention GPT-2 is not a causal LM handmodel can study")
        w, b = sd["h.0.attn.c_attn.weight"], sd["h.0.attn.c_attn.bias"]
        for i, n in enumerate("QKV"):
            s[f"W_{n}"] = per_head_in(w[:, i * D:(i + 1) * D])
            s[f"b_{n}"] = b[i * D:(i + 1) * D].reshape(H, Dh)
        s["W_O"], s["b_O"] = sd["h.0.attn.c_proj.weight"].reshape(H, Dh, D), sd["h.0.attn.c_proj.bias"]
        s["W_in"], s["b_in"] = sd["h.0.mlp.c_fc.weight"], sd["h.0.mlp.c_fc.bias"]
        s["W_out"], s["b_out"] = sd["h.0.mlp.c_proj.weight"], sd["h.0.mlp.c_proj.bias"]
        scaled = bool(c.scale_attn_weights)  # scale_attn_by_inverse_layer_idx divides layer 0 by 1: no effect
    else:  # GPT-Neo: nn.Linear, weights are [out, in]; no q/k/v biases; attention never scaled
        a = "h.0.attn.attention."
        for n in "QKV":
            s[f"W_{n}"] = per_head_in(sd[f"{a}{n.lower()}_proj.weight"].T)
        s["W_O"], s["b_O"] = sd[f"{a}out_proj.weight"].T.reshape(H, Dh, D), sd[f"{a}out_proj.bias"]
        s["W_in"], s["b_in"] = sd["h.0.mlp.c_fc.weight"].T, sd["h.0.mlp.c_fc.bias"]
        s["W_out"], s["b_out"] = sd["h.0.mlp.c_proj.weight"].T, sd["h.0.mlp.c_proj.bias"]
        scaled = False
        if c.attention_layers[0] == "local":
            window = int(c.window_size)
    lm_bias = getattr(hf.get_output_embeddings(), "bias", None)
    if lm_bias is not None:
        s["b_U"] = lm_bias
    cfg = ModelConfig(vocab_size=c.vocab_size, n_ctx=c.max_position_embeddings, d_model=D, n_heads=H, d_mlp=inner,
                      ln_eps=float(c.layer_norm_epsilon), act_fn=_HF_ACT[act], scale_attn=scaled, window=window)
    _check_tokenizer(tokenizer_json, cfg.vocab_size, src)
    tied = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    card = {"imported_from": src, "format": f"Hugging Face {type(hf).__name__} (unprocessed weights)",
            "act_fn": cfg.act_fn, "attention": f"local, window {window}" if window else "global",
            "attention_scaled": scaled, "tied_embeddings": tied, "unembed_bias": lm_bias is not None}
    return Converted(cfg, _complete(cfg, s, src), tokenizer_json, card, peer=lambda ids: hf(ids).logits)


def read_hf_folder(folder: Path, tokenizer_json: str | None) -> Converted:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise UserError(f"{folder}: reading a Hugging Face model needs transformers: pip install -e '.[interop]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI prints one line, not transformers' loading bars
    hf_logging.set_verbosity_error()  # nor its config warnings (e.g. a bos id outside a small test vocabulary)

    try:
        c = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"{folder}: not a Hugging Face model folder ({str(e).splitlines()[0][:100]})") from None
    n = getattr(c, "n_layer", None) or getattr(c, "num_layers", None) or getattr(c, "num_hidden_layers", 0)
    _one_layer(int(n), str(folder))  # before loading: a big multi-layer model is refused cheaply
    hf = AutoModelForCausalLM.from_pretrained(folder).float().eval()  # .float(): transformers 5 keeps the file's dtype
    if tokenizer_json is None:
        tokenizer_json = _folder_tokenizer(folder, None)
    return from_hf_model(hf, tokenizer_json, str(folder))


def _folder_tokenizer(folder: Path, hub_name: str | None) -> str:
    """tokenizer.json from the folder, else the fast tokenizer transformers builds from its files or hub name."""
    if (folder / "tokenizer.json").exists():
        return (folder / "tokenizer.json").read_text()
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(hub_name or folder).backend_tokenizer.to_str()
    except Exception:
        raise UserError(f"{folder}: no tokenizer found (no tokenizer.json{', and ' + hub_name + ' unreachable' if hub_name else ''}); "
                        "pass --tokenizer tokenizer.json") from None


# -- entry points --------------------------------------------------------------------------------------
def resolve(source: str) -> Path:
    """A folder, or `hf:owner/name` downloaded from the Hugging Face hub (needs the network)."""
    if not source.startswith("hf:"):
        p = Path(source)
        if not (p / "config.json").exists():
            raise UserError(f"{p}: no config.json; pass a TransformerLens or Hugging Face model folder, or hf:owner/name")
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source[3:], allow_patterns=[
            "*.json", "*.txt", "*.model", "*.safetensors", "*final.pth", "pytorch_model.bin"]))
    except Exception as e:
        raise UserError(f"{source}: hub download failed ({str(e).splitlines()[0][:120]}); check the name and the network") from None


def read_any(source: str, tokenizer: Path | None = None) -> Converted:
    folder = resolve(source)
    if tokenizer is not None and not tokenizer.is_file():
        raise UserError(f"{tokenizer}: tokenizer file not found; pass a tokenizers JSON (tokenizer.json)")
    tok = tokenizer.read_text() if tokenizer else None
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / 'config.json'}: not valid JSON ({e}); restore it from the model's source") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{folder / 'config.json'}: expected a JSON object")
    if "model_type" in cfg:
        return read_hf_folder(folder, tok)
    if "d_vocab" in cfg and "n_layers" in cfg:
        return read_tl_folder(folder, tok)
    raise UserError(f"{folder / 'config.json'}: neither a Hugging Face config (model_type) nor a TransformerLens one "
                    "(d_vocab, n_layers)")


@torch.inference_mode()
def max_logprob_gap(conv: Converted, model: OneLayerTransformer, batch: int = 4, T: int = 64, seed: int = 0) -> float:
    """max |log p_ours - log p_peer| on random token batches: the import's self-check against the source library."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, conv.cfg.vocab_size, (batch, min(T, conv.cfg.n_ctx)), generator=g)
    ours = model(ids).log_softmax(-1)
    theirs = conv.peer(ids).float().log_softmax(-1)
    return float((ours - theirs).abs().max())


def write_ours(conv: Converted, out: Path) -> None:
    """Write `conv` as our checkpoint folder (load_checkpoint reads it back with every check)."""
    with torch.device("meta"):
        model = OneLayerTransformer(conv.cfg)
    model.load_state_dict(conv.state, assign=True)
    save_checkpoint(model, out, conv.tokenizer_json, conv.card)


def write_tl(model: OneLayerTransformer, tokenizer_json: str, out: Path) -> None:
    """TL config.json + property-format model.safetensors + tokenizer.json."""
    tl_cfg, sd = to_tl(model)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(tl_cfg, indent=2) + "\n")
    (out / "tokenizer.json").write_text(tokenizer_json)
