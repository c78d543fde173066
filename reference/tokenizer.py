"""Byte-level BPE tokenizer trained with the `tokenizers` library; `<|endoftext|>` is its special token."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from handmodel.errors import UserError

from .corpus import EOT


def train_tokenizer(stories: list[str], vocab_size: int = 4096) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text round-trips
        show_progress=False,
    )
    tok.train_from_iterator(stories, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: tokenizer file not found; a checkpoint folder must contain tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable tokenizers JSON ({str(e).splitlines()[0][:120]}); retrain or re-save it") from None
