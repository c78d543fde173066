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
    card["tokenizer_sha256"] = tokenizer_sha(tokenizer_json)  # in place: callers return the card as saved
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
    _check_shapes(path, cfg)  # before anything is allocated: a wrong n_ctx must fail fast, not after GBs
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:
        raise UserError(f"{path / 'model.safetensors'}: corrupt weights file ({str(e)[:100]}); restore it or retrain") from None
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{path / 'model.safetensors'}: tensor {name} has {n_bad} NaN/inf values; "
                            "the weights are damaged (or training diverged): restore them or retrain")
    try:
        tok_vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
        n_added = len(json.loads((path / "tokenizer.json").read_text()).get("added_tokens", []))
    except Exception:
        raise UserError(f"{path / 'tokenizer.json'}: corrupt tokenizer file; copy it from the training run") from None
    n_tok = len(set(tok_vocab.values()) | set(range(n_added)))
    if n_tok != cfg.vocab_size:
        raise UserError(f"{path}: tokenizer has {n_tok} tokens but config.json says vocab_size={cfg.vocab_size}; "
                        "the tokenizer and the weights come from different runs")
    _check_tokenizer_hash(path)
    model = OneLayerTransformer(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{path}: weights do not match config.json ({first[:120]}); the files come from different runs") from None
    model.eval()
    card = json.loads((path / "card.json").read_text()) if (path / "card.json").exists() else {}
    return model, card


def tokenizer_sha(tokenizer_json: str | bytes) -> str:
    """sha256 of tokenizer.json's bytes: recorded in the card, so a swapped tokenizer is caught."""
    b = tokenizer_json.encode("utf-8") if isinstance(tokenizer_json, str) else tokenizer_json
    return hashlib.sha256(b).hexdigest()


def _check_tokenizer_hash(path: Path) -> None:
    """A card that records its tokenizer's hash must match tokenizer.json: a foreign tokenizer of the
    same size would otherwise map every id to the wrong text without any other error."""
    try:
        card = json.loads((path / "card.json").read_text())
    except (OSError, ValueError):
        return
    want = card.get("tokenizer_sha256") if isinstance(card, dict) else None
    if want and tokenizer_sha((path / "tokenizer.json").read_bytes()) != want:
        raise UserError(f"{path / 'tokenizer.json'}: not the tokenizer this model was trained with (card.json "
                        f"records sha256 {str(want)[:12]}…); copy tokenizer.json from the training run")


def _check_shapes(path: Path, cfg: ModelConfig) -> None:
    """Tensor names and shapes in the safetensors header against config.json, with no model built (a
    model on the meta device has shapes but no memory)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path / 'model.safetensors'}: corrupt weights file ({str(e)[:100]}); restore it or retrain") from None
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in OneLayerTransformer(cfg).state_dict().items()}
    for k in sorted(set(want) | set(have)):
        if have.get(k) != want.get(k):
            what = (f"missing {k}" if k not in have else f"unexpected tensor {k}" if k not in want
                    else f"{k} is {list(have[k])}, config.json implies {list(want[k])}")
            raise UserError(f"{path}: weights do not match config.json ({what}); the files come from different runs")


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
