"""Neurons sharing weighted token sets ([[weights]]): time HandModel.stream_metrics on a synthetic ruleset.

    python benchmarks/weighted_sets.py [--tokens 16384] [--repeats 3]

The ruleset is a workload, not a model of anything: on the shipped vocabulary, a prior and a top-16 bigram
table for the 512 most frequent tokens (the base rows), a previous-token head and three content heads,
`--sets` weighted sets of `--set-size` tokens each, and `--neurons` neurons that each reference `--refs`
sets in `next`, `--refs` in `attend` (spread over the heads) and two in `now`, plus a few token entries.
Tokens are picked by frequency in the eval text, so frequent tokens trigger and are written as often as
in a real ruleset. The reference log-probs are random (the timing does not depend on their values).
Run it with PYTHONPATH pointing at another checkout to time that engine on the same workload.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from genrules import quote, toml_table  # run as a script: benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def ruleset(vocab: list[str], counts: np.ndarray, n_sets: int, set_size: int, n_neurons: int, refs: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    V = len(vocab)
    p = (counts + 1.0) / (counts + 1.0).sum()
    rank = np.argsort(-counts, kind="stable")

    def some(n: int) -> np.ndarray:
        return rng.choice(V, size=n, replace=False, p=p)

    parts = [f"[[prior]]\nid = \"prior\"\ndoc = \"Unigram.\"\nnext = {toml_table((quote(vocab[t]), float(np.log(p[t]) + 8)) for t in rank[:256])}\n"]
    rows = [f"{quote(vocab[t])} = {toml_table((quote(vocab[u]), float(rng.normal(1, 1))) for u in some(16))}" for t in rank[:512]]
    parts.append("[[bigram]]\nid = \"bigram\"\ndoc = \"Top-16 rows.\"\n[bigram.rows]\n" + "\n".join(rows) + "\n")
    parts.append('[[head]]\nid = "h0"\ndoc = "Previous token."\nposition = { 0 = 0.5, 1 = 5.0, 2 = 1.5, default = 0.0 }\n')
    for h in range(1, 4):
        score = ", ".join(f"{{ src = {quote(vocab[s])}, w = {rng.uniform(1, 4):.3f} }}" for s in some(40))
        parts.append(f'[[head]]\nid = "h{h}"\ndoc = "Content head."\nposition = {{ 0 = -1.0, 1 = 0.5, default = 0.0 }}\n'
                     f"score = [{score}]\n")
    for k in range(n_sets):
        parts.append(f'[[weights]]\nid = "w{k}"\ndoc = "Pattern {k}."\n'
                     f"tokens = {toml_table((quote(vocab[t]), float(rng.normal(0.5, 0.5))) for t in some(set_size))}\n")
    for n in range(n_neurons):
        sets = lambda m: [f'"@w{k}"' for k in rng.choice(n_sets, size=m, replace=False)]  # noqa: E731
        now = list(zip(sets(2), rng.normal(0, 1, 2))) + [(quote(vocab[t]), float(rng.normal(0, 1))) for t in some(4)]
        att = rng.integers(0, 4, refs)
        attend = ", ".join(f"h{h} = {toml_table(zip(sets(int((att == h).sum())), rng.normal(0, 1.5, refs)))}"
                           for h in range(4) if (att == h).any())
        nxt = list(zip(sets(refs), rng.normal(0, 0.3, refs))) + [(quote(vocab[t]), float(rng.normal(0, 0.3))) for t in some(4)]
        parts.append(f'[[neuron]]\nid = "n{n}"\ndoc = "Neuron {n}."\nthreshold = {rng.uniform(0.5, 1.5):.3f}\n'
                     f"now = {toml_table(now)}\nattend = {{ {attend} }}\nnext = {toml_table(nxt)}\n")
    return "\n".join(parts)


def corpus_windows(corpus: Path, n_tokens: int) -> tuple[list[str], list[np.ndarray], int]:
    """The shipped vocabulary and the first n_tokens of the corpus as windows of <= 256 tokens (n_ctx), story by
    story: (vocab, windows, tokens in them). benchmarks/dense_finish.py times on the same windows."""
    from handmodel.vocab import load_vocab
    from reference.corpus import encode_stories, read_stories
    from reference.tokenizer import load_tokenizer

    ckpt = ROOT / "reference" / "default"
    seqs, n = [], 0
    for s in encode_stories(load_tokenizer(ckpt / "tokenizer.json"), read_stories(corpus)[:2000]):
        for lo in range(0, len(s), 256):
            seqs.append(s[lo:lo + 256][: n_tokens - n])
            n += len(seqs[-1])
        if n >= n_tokens:
            break
    return load_vocab(ckpt / "tokenizer.json"), seqs, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sets", type=int, default=30)
    ap.add_argument("--set-size", type=int, default=200)
    ap.add_argument("--neurons", type=int, default=320)
    ap.add_argument("--refs", type=int, default=6)
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "tinystories" / "valid.txt")
    args = ap.parse_args()

    import handmodel

    vocab, seqs, n = corpus_windows(args.corpus, args.tokens)
    counts = np.bincount(np.concatenate(seqs), minlength=len(vocab)).astype(np.float64)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "rules.toml").write_text(ruleset(vocab, counts, args.sets, args.set_size, args.neurons, args.refs, 0), encoding="utf-8")
        rules = handmodel.load_rules(d, vocab)
    hm = handmodel.HandModel(rules)
    z = np.random.default_rng(1).normal(0, 2, size=(n, len(vocab)))
    ref = (z - np.log(np.exp(z).sum(1, keepdims=True))).astype(np.float16)
    hm.stream_metrics(seqs[:1], ref[: len(seqs[0])])  # compile (or load the numba cache) outside the timing
    t0 = time.perf_counter()
    first = hm.stream_metrics(seqs, ref)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        hm.stream_metrics(seqs, ref)
        warm.append(time.perf_counter() - t0)
    print(f"{handmodel.__file__}: {len(rules.rule_ids)} rules, {int(rules.rule_numbers.sum()):,} numbers, {n:,} tokens "
          f"in {len(seqs)} sequences; mean KL {first['kl'].mean():.4f}")
    print(f"stream_metrics: first call {cold:.2f} s (base rows built), then median {np.median(warm):.2f} s "
          f"({n / np.median(warm):,.0f} tokens/s) over {args.repeats}")


if __name__ == "__main__":
    main()
