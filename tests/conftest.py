"""Shared fixtures. Tests that need ../shared (the corpus, which is never copied into the repo) skip on a
fresh clone with a clear reason; CI sets HANDMODEL_REQUIRE_SHARED=1, which turns that skip into a failure."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "corpus" / "tinystories"
SHIPPED = ROOT / "reference" / "default"
# the small hand-written ruleset of tests/fixtures and the vocabulary it is written for
SMALL_RULES = ROOT / "tests" / "fixtures" / "rules_small"
SMALL_VOCAB = ["<|endoftext|>", " the", " cat", " dog", " ice", " cream", " sat", ".", " cake", "@"]
# the worked example of docs/rules.md and the vocabulary it is written for
DOC_RULES = ROOT / "tests" / "fixtures" / "rules_doc_example"
DOC_VOCAB = ["<|endoftext|>", " the", " cat", " dog", " ice", " cream", " sat", " ran", "."]


def require(ok: bool, reason: str) -> None:
    """Skip the calling test with `reason` unless CI demands it, in which case fail."""
    if ok:
        return
    if os.environ.get("HANDMODEL_REQUIRE_SHARED") == "1":
        pytest.fail(f"{reason} (HANDMODEL_REQUIRE_SHARED=1 makes this a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """Folder holding train.txt and valid.txt of ../shared/corpus/tinystories."""
    require((SHARED_CORPUS / "valid.txt").exists() and (SHARED_CORPUS / "train.txt").exists(),
            f"needs the shared corpus at {SHARED_CORPUS} (absent on a fresh clone)")
    return SHARED_CORPUS


@pytest.fixture(scope="session")
def shipped_checkpoint() -> Path:
    require((SHIPPED / "model.safetensors").exists(), "shipped model not trained yet (reference/default/model.safetensors is absent)")
    return SHIPPED


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache dir so cached reference log-probs never leak between tests."""
    monkeypatch.setenv("HANDMODEL_CACHE", str(tmp_path_factory.mktemp("cache")))


# --- foundation (reference/) fixtures: tiny synthetic data and a tiny trained checkpoint ---------------
# Stories are generated here from templates (never copied from the shared corpus). They contain
# typographic quotes and emoji so the tokenizer and the byte-level vocabulary see multi-byte text.

_NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna"]
_THINGS = ["ball", "cat", "red kite", "big tree", "cake", "little boat"]
_PLACES = ["park", "garden", "beach", "forest"]
_FEELINGS = ["happy", "sad", "sleepy", "brave"]
_EMOJI = ["🙂", "🐶", "🌞", "🎈"]


def make_ref_stories(n: int, seed: int = 0) -> list[str]:
    """`n` short template stories, deterministic in `seed`."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(_NAMES, 2)
        thing, place, feel = rng.choice(_THINGS), rng.choice(_PLACES), rng.choice(_FEELINGS)
        lines = [f"Once upon a time, {a} went to the {place} with a {thing}.",
                 f"{b} saw the {thing} and said, “Can I play too?”",
                 f"{a} said, “Yes! Let’s play.” They were {feel} {rng.choice(_EMOJI)}."]
        if rng.random() < 0.5:
            lines.append(f"The end. {b} went home to the {rng.choice(_PLACES)}.")
        out.append(" ".join(lines) if rng.random() < 0.7 else "\n".join(lines))
    return out


def write_ref_corpus(path: Path, stories: list[str]) -> Path:
    """Write stories in the shared layout: each story followed by a line holding only <|endoftext|>."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Folder with train.txt (300 stories) and valid.txt (40 other stories) of synthetic text."""
    d = tmp_path_factory.mktemp("tiny_corpus")
    write_ref_corpus(d / "train.txt", make_ref_stories(300, seed=1))
    write_ref_corpus(d / "valid.txt", make_ref_stories(40, seed=2))
    return d


def tiny_train_config(corpus_dir: Path, out_dir: Path, **over):
    """A TrainConfig for a model small enough to train in about a second on one CPU thread."""
    from reference.model import ModelConfig
    from reference.train import TrainConfig

    model = ModelConfig(vocab_size=0, n_ctx=32, d_model=32, n_heads=4, d_mlp=64)
    kw = dict(corpus=str(corpus_dir / "train.txt"), valid=str(corpus_dir / "valid.txt"), out=str(out_dir), vocab_size=300,
              model=model, steps=60, batch_size=8, lr=1e-2, warmup=5, eval_every=20, eval_tokens=2048,
              ckpt_every=1000, seed=0, threads=1)
    kw.update(over)
    return TrainConfig(**kw)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    """A checkpoint folder trained by reference.train.train on the tiny corpus (60 steps)."""
    from reference.train import train

    out = tmp_path_factory.mktemp("tiny_run") / "ckpt"
    train(tiny_train_config(tiny_corpus, out), resume=False, progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def story_maker():
    """make_ref_stories(n, seed) for tests that need their own synthetic text."""
    return make_ref_stories


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_train_config(corpus_dir, out_dir, **overrides) -> TrainConfig."""
    return tiny_train_config


# -- verify/ fixtures (tests/test_verify_*.py): a tiny random reference on a tiny vocabulary ---------
# Stories are generated from templates here (never copied from ../shared/corpus).
def make_stories(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    names = ["Tom", "Lily", "Sam", "Mia", "Ben", "Sue"]
    things = ["ball", "cat", "dog", "cake", "tree", "box", "kite", "hat"]
    adjs = ["red", "big", "small", "happy", "old", "blue"]
    verbs = ["saw", "liked", "found", "had", "wanted"]
    out = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        sents = [f"Once upon a time, {a} {rng.choice(verbs)} a {rng.choice(adjs)} {rng.choice(things)}."]
        for _ in range(rng.randint(2, 6)):
            sents.append(f"{rng.choice([a, b])} {rng.choice(verbs)} the {rng.choice(adjs)} {rng.choice(things)}.")
        sents.append(f"{a} and {b} were happy.")
        out.append(" ".join(sents))
    return out


def write_corpus(path: Path, stories: list[str]) -> Path:
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


def make_tiny_checkpoint(out: Path, seed: int = 0, vocab_size: int = 300, n_ctx: int = 48, unembed_scale: float = 60.0) -> Path:
    """A random one-layer reference on a BPE vocabulary trained on the template stories; W_U is scaled
    up so its next-token distributions are far from uniform."""
    import torch

    from reference.checkpoint import save_checkpoint
    from reference.model import ModelConfig, OneLayerTransformer
    from reference.tokenizer import train_tokenizer

    tok = train_tokenizer(make_stories(200, 1), vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = OneLayerTransformer(ModelConfig(vocab_size=tok.get_vocab_size(), n_ctx=n_ctx, d_model=32, n_heads=2, d_mlp=64))
    with torch.no_grad():
        model.W_U.mul_(unembed_scale)
    save_checkpoint(model, out, tok.to_str(), {"note": "tiny random test reference"})
    return out


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(checkpoint dir, eval corpus, train corpus) for verify tests; built once per session."""
    d = tmp_path_factory.mktemp("tiny_world")
    ckpt = make_tiny_checkpoint(d / "ckpt")
    evalf = write_corpus(d / "eval.txt", make_stories(12, 2))
    train = write_corpus(d / "train.txt", make_stories(60, 3))
    return ckpt, evalf, train


# -- discovery fixtures: a tiny reference trained on text with planted regularities (tests/planted.py)
@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    from planted import train_planted

    folder = tmp_path_factory.getbasetemp() / "discover_planted"  # shared by every test_discover_* module
    ckpt = train_planted(folder)
    return ckpt, folder / "corpus" / "train.txt"


@pytest.fixture(scope="session")
def oracle(planted):
    from reference.oracle import Oracle

    return Oracle.load(planted[0])
