"""A checkpoint is a folder: model.safetensors + config.json + tokenizer.json + card.json (+ card.md).

Loading checks everything a user can get wrong and says what to do, in one line.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from handmodel.errors import UserError

from .model import BASE_FIELDS, ModelConfig, OneLayerTransformer, arch_problem

DEFAULT_DIR = Path(__file__).parent / "default"
FILES = ("model.safetensors", "config.json", "tokenizer.json")


def default_checkpoint() -> Path:
    return DEFAULT_DIR


def save_checkpoint(model: OneLayerTransformer, out: Path, tokenizer_json: str, card: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"  # write-then-rename: an interrupted save never leaves half a file
    save_file(state, str(tmp))
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    (out / "tokenizer.json").write_text(tokenizer_json)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "card.md").write_text(card_markdown(card))


def card_markdown(card: dict) -> str:
    lines = ["# Model card", ""]
    for k, v in card.items():
        if isinstance(v, dict):
            lines.append(f"- **{k}**:")
            lines += [f"  - {kk}: {vv}" for kk, vv in v.items()]
        else:
            lines.append(f"- **{k}**: {v}")
    return "\n".join(lines) + "\n"


def load_checkpoint(path: str | Path | None = None) -> tuple[OneLayerTransformer, dict]:
    """-> (model in eval mode, card). Raises UserError with a fix for every way a folder can be wrong."""
    path = Path(path) if path is not None else DEFAULT_DIR
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint folder not found; pass --checkpoint DIR (a folder made by `handmodel train`)")
    for f in FILES:
        if not (path / f).exists():
            raise UserError(f"{path}: checkpoint is missing {f}; re-run `handmodel train` or copy the whole folder")
    cfg = _read_config(path / "config.json")
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:
        raise UserError(f"{path / 'model.safetensors'}: corrupt weights file ({str(e)[:100]}); restore it or retrain") from None
    try:
        tok_vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
        n_added = len(json.loads((path / "tokenizer.json").read_text()).get("added_tokens", []))
    except Exception:
        raise UserError(f"{path / 'tokenizer.json'}: corrupt tokenizer file; copy it from the training run") from None
    n_tok = len(set(tok_vocab.values()) | set(range(n_added)))
    if n_tok != cfg.vocab_size:
        raise UserError(f"{path}: tokenizer has {n_tok} tokens but config.json says vocab_size={cfg.vocab_size}; "
                        "the tokenizer and the weights come from different runs")
    model = OneLayerTransformer(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{path}: weights do not match config.json ({first[:120]}); the files come from different runs") from None
    model.eval()
    card = json.loads((path / "card.json").read_text()) if (path / "card.json").exists() else {}
    return model, card


def _read_config(file: Path) -> ModelConfig:
    """config.json -> ModelConfig; every field present and sane, else a one-line 'corrupt config' error."""
    def bad(why: str) -> UserError:
        return UserError(f"{file}: corrupt config ({why}); restore it from the training run")

    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(str(e)) from None
    if not isinstance(d, dict):
        raise bad(f"expected a JSON object, got {type(d).__name__}")
    missing = [k for k in BASE_FIELDS if k not in d]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    for k in BASE_FIELDS:
        v = d[k]
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0) if k == "ln_eps" else \
             (isinstance(v, int) and not isinstance(v, bool) and (v > 0 or (k == "d_mlp" and v == 0)))  # 0: attn-only
        if not ok:
            raise bad(f"{k}={v!r} must be a positive {'number' if k == 'ln_eps' else 'integer'}")
    if (why := arch_problem(d)) is not None:
        raise bad(why)
    cfg = ModelConfig.from_dict(d)
    if cfg.d_model % cfg.n_heads:
        raise bad(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
    return cfg


def checkpoint_hash(path: str | Path | None = None) -> str:
    """Content hash of the weights + config + tokenizer: the cache key for everything derived from them."""
    path = Path(path) if path is not None else DEFAULT_DIR
    h = hashlib.sha256()
    for f in FILES:
        h.update(f.encode())
        h.update((path / f).read_bytes())
    return h.hexdigest()[:16]


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
