"""Synthetic text with planted regularities, for testing the discovery tools and the claim checks.

Every story is a walk on a fixed bigram table over a small word list; one skip-trigram is planted on
top: half the stories start with the word A, and if A occurred earlier in the story, then after B comes C (instead of B's bigram
successors). A reference trained on this text for a few seconds learns both; `suggest` must find
them again. The text is generated here, never copied from any corpus.

Training alone does not make a neuron whose effect is large on every CPU (the trained ' the' neuron's
effect on ' dog' measured −0.00 nats on one machine and passed on another), so one neuron is set by
hand after training (`plant_neuron`): it fires on the word "the" and raises ' dog', by construction and
with a margin, and `train_planted` asserts both before any test relies on them.
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
    plant_neuron(ckpt, corpus / "train.txt")
    return ckpt


THE_WORDS = (" the", "the")  # the word 'the' mid-story and at a story start (stories are stripped)
PLANTED_TARGET = " up"  # what the planted neuron raises: never follows 'the' in the text, so it is a clean signal
PLANTED_NEURON = -1  # the last MLP neuron is overwritten
PLANTED_ACT = 3.0  # median activation of the planted neuron on 'the'
PLANTED_EFFECT = 1.0  # median log p(PLANTED_TARGET) it adds where it fires, in nats


def plant_neuron(ckpt: Path, train_txt: Path) -> None:
    """Overwrite neuron PLANTED_NEURON of the checkpoint: it fires on THE_WORDS and raises PLANTED_TARGET.

    Its input weights are a least-squares read-out of "is the current token 'the'" from LN2(x1) on training
    windows, scaled and biased so the median activation on 'the' is PLANTED_ACT and the neuron is off at
    every other position; its output row is PLANTED_TARGET's logit direction (its unembedding column
    through LN_final's gain, centred as LN_final centres), scaled until ablating the neuron lowers
    log p(PLANTED_TARGET) by PLANTED_EFFECT (median over the 'the' positions). The target's probability
    stays tiny (about 1e-4 → 3e-4), so the rest of the planted model's behaviour is unchanged. The planted
    facts are asserted on the training windows: a CPU on which they did not hold would fail here, loudly.
    """
    import numpy as np
    import torch

    from handmodel.vocab import load_vocab
    from reference.checkpoint import load_checkpoint, save_checkpoint
    from reference.corpus import read_stories, token_stream
    from reference.tokenizer import load_tokenizer

    model, card = load_checkpoint(ckpt)
    vocab = load_vocab(ckpt / "tokenizer.json")
    stream = token_stream(load_tokenizer(ckpt / "tokenizer.json"), read_stories(train_txt)[:300])
    stream = torch.from_numpy(np.asarray(stream, dtype=np.int64))
    T = model.cfg.n_ctx
    windows = stream[: len(stream) // T * T].reshape(-1, T)
    is_the = torch.isin(windows.reshape(-1), torch.tensor([vocab.index(w) for w in THE_WORDS]))
    target = vocab.index(PLANTED_TARGET)
    n = model.cfg.d_mlp - 1 if PLANTED_NEURON == -1 else PLANTED_NEURON
    with torch.no_grad():
        cache: dict = {}
        model(windows, cache=cache)
        x = model.ln2(cache["resid_mid"]).reshape(-1, model.cfg.d_model).double()  # [P, D]
        X = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        coef = torch.linalg.lstsq(X, is_the.double()[:, None], rcond=None).solution[:, 0]  # [D+1]
        score = X @ coef
        lo, hi = score[~is_the].max(), score[is_the].min()
        if not lo < hi:
            raise RuntimeError(f"planted neuron: 'the' is not linearly separable in LN2(x1) ({lo:.3f} ≥ {hi:.3f})")
        cut = (lo + hi) / 2
        scale = PLANTED_ACT / float((score[is_the] - cut).median())
        model.W_in[:, n] = (scale * coef[:-1]).float()
        model.b_in[n] = float(scale * (coef[-1] - cut))
        g = model.ln_final.weight * model.W_U[:, target]  # what the target's logit reads from LN_final's input
        direction = (g - g.mean()) / (g - g.mean()).norm()  # LN_final removes the mean over d_model
        model.W_out[n] = 0.0
        cache = {}
        model(windows, cache=cache)
        x2 = cache["resid_post"].reshape(-1, model.cfg.d_model)[is_the]  # the residual without the neuron
        base = torch.log_softmax(model.unembed(x2).double(), -1)[:, target]
        act = cache["mlp.post"][..., n].reshape(-1)[is_the]
        size = 0.25
        while True:  # grow the write until its median effect reaches PLANTED_EFFECT
            lp = torch.log_softmax(model.unembed(x2 + size * act[:, None] * direction).double(), -1)[:, target]
            effect = lp - base
            if effect.median() >= PLANTED_EFFECT or size > 100:
                break
            size *= 1.25
        model.W_out[n] = size * direction
        cache = {}
        model(windows, cache=cache)
        act_all = cache["mlp.post"][..., n].reshape(-1)
    fires, quiet = (act_all[is_the] > 1.0).double().mean(), (act_all[~is_the] > 0.0).double().mean()
    if fires < 0.99 or quiet > 0.0 or effect.median() < PLANTED_EFFECT or effect.min() < PLANTED_EFFECT / 4:
        raise RuntimeError(f"planted neuron {n}: fires on {fires:.1%} of 'the' (need 99%), on {quiet:.1%} of the rest "
                           f"(need 0), raises {PLANTED_TARGET!r} by {effect.median():.2f} nats (median; need "
                           f"{PLANTED_EFFECT}), at least {effect.min():.2f} (need {PLANTED_EFFECT / 4})")
    card = dict(card, planted_neuron={"index": n, "fires_on": list(THE_WORDS), "raises": PLANTED_TARGET,
                                      "median_effect_nats": round(float(effect.median()), 3)})
    save_checkpoint(model, ckpt, (ckpt / "tokenizer.json").read_text(), card)
