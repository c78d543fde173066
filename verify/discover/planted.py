"""Synthetic text with planted regularities, for testing the discovery tools (and for demos).

Every story is a walk on a fixed bigram table over a small word list; one skip-trigram is planted on
top: half the stories start with the word A, and if A occurred earlier in the story, then after B comes C (instead of B's bigram
successors). A reference trained on this text for a few seconds learns both; `suggest` must find
them again. The text is generated here, never copied from any corpus.
"""
from __future__ import annotations

import random
from pathlib import Path

WORDS = [" dog", " cat", " sun", " hat", " big", " red", " ran", " sat", " up", " on", " the", " and",
         " zap", " blue", " moon", "."]
A, B, C = " zap", " blue", " moon"
A_TOKEN = "zap"  # stories are stripped, so the story-initial A is the token "zap" (no leading space)
# planted bigram table: word -> [(next, prob)]; every word has two successors, 0.75 / 0.25
BIGRAMS: dict[str, list[tuple[str, float]]] = {
    " the": [(" dog", 0.75), (" big", 0.25)],
    " big": [(" cat", 0.75), (" hat", 0.25)],
    " dog": [(" ran", 0.75), (" sat", 0.25)],
    " cat": [(" blue", 0.75), (" sat", 0.25)],
    " hat": [(" blue", 0.75), (" on", 0.25)],
    " ran": [(" up", 0.75), (" and", 0.25)],
    " sat": [(" on", 0.75), (" and", 0.25)],
    " up": [(".", 0.75), (" and", 0.25)],
    " on": [(" the", 0.75), (" red", 0.25)],
    " red": [(" sun", 0.75), (" hat", 0.25)],
    " sun": [(".", 0.75), (" blue", 0.25)],
    " and": [(" the", 0.75), (" red", 0.25)],
    " blue": [(" hat", 0.75), (" sun", 0.25)],  # ... unless A came earlier: then C
    " moon": [(".", 0.75), (" and", 0.25)],
    " zap": [(" the", 0.75), (" red", 0.25)],
    ".": [(" the", 0.75), (" red", 0.25)],
}
P_C = 0.95  # P(C | B, A earlier)


def make_planted_stories(n: int, seed: int = 0, length: int = 28) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice([" the", " zap"])
        words = [w]
        seen_a = w == A
        while len(words) < length:
            if w == B and seen_a and rng.random() < P_C:
                w = C
            else:
                nxt, probs = zip(*BIGRAMS[w])
                w = rng.choices(nxt, probs)[0]
            seen_a |= w == A
            words.append(w)
        out.append("".join(words).strip())
    return out


def write_planted_corpus(folder: Path, n_train: int = 1500, n_valid: int = 100) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.txt", n_train, 1), ("valid.txt", n_valid, 2)):
        (folder / name).write_text("".join(f"{s}\n<|endoftext|>\n" for s in make_planted_stories(n, seed)), encoding="utf-8")
    return folder


def train_planted(folder: Path, steps: int = 500, quiet: bool = True) -> Path:
    """Corpus in folder/corpus, checkpoint in folder/ckpt (skipped if already there). Returns folder/ckpt."""
    from reference.model import ModelConfig
    from reference.train import TrainConfig, train

    ckpt = folder / "ckpt"
    if (ckpt / "model.safetensors").exists() and (ckpt / "card.json").exists():
        return ckpt
    corpus = write_planted_corpus(folder / "corpus")
    cfg = TrainConfig(corpus=str(corpus / "train.txt"), valid=str(corpus / "valid.txt"), out=str(ckpt), vocab_size=300,
                      model=ModelConfig(vocab_size=0, n_ctx=32, d_model=48, n_heads=2, d_mlp=96), steps=steps,
                      batch_size=32, lr=2e-2, warmup=20, eval_every=100, eval_tokens=2048, ckpt_every=10_000,
                      seed=0, threads=1)
    train(cfg, resume=False, progress=False, log=(lambda *_: None) if quiet else print)
    return ckpt
