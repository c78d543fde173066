"""A generated, realistic-shaped ruleset for benchmarking (not a model of anything: a workload).

Shape at scale 1 (what a hand-written ruleset for a 4096-token one-layer model plausibly looks like):
- prior: the 256 most likely tokens (unigram backoff);
- classes: ~12 token classes (by regex) and class-default bigram rows;
- bigram: a top-16-per-token table for every token, split into 16 rules of 256 rows (~65k numbers);
- heads: a previous-token head (+ `rows_ov` head_out rules, 8 targets each) and a content head that
  attends to a few dozen source tokens (+ head_out rules);
- neurons: 300, each with `now` inputs, some with `present` and `attend` inputs, 6 targets each;
- skip-trigrams: 500, half with a class as `now`.
`scale` multiplies the number of contextual rules (head_out, neurons, skips, content-head scores);
the bigram table stays top-16 (a bigger table only costs build_base, once per distinct token).

Token choice follows a frequency ranking (`rank`, most likely first) so frequent tokens trigger
rules as often as they would in a real ruleset. Values come from `bigram_logits` when given (e.g. the
reference's direct path), else from a seeded random generator. Deterministic for a given seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from handmodel import vocab_fingerprint

CLASS_PATTERNS = {
    "cap": r"^ [A-Z][a-z]+$",
    "punct": r"^[.,!?;:]$",
    "quote": r"^ ?\"",
    "ing": r"ing$",
    "ed": r"ed$",
    "ly": r"ly$",
    "digit": r"[0-9]",
    "short": r"^ [a-z]{1,3}$",
    "long": r"^ [a-z]{7,}$",
    "plural": r"^ [a-z]+s$",
    "nospace": r"^[a-z]+$",
    "name_like": r"^ [A-Z][a-z]{2,6}$",
}


def quote(tok: str) -> str:
    """A token as a TOML key/string ('@'-leading tokens are written '@@...')."""
    if tok.startswith("@"):
        tok = "@" + tok
    return '"' + "".join(_ESC.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                         for ch in tok) + '"'


_ESC = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def toml_table(items) -> str:
    """(quoted key, number) pairs as a TOML inline table, numbers to 3 decimals."""
    return "{ " + ", ".join(f"{k} = {v:.3f}" for k, v in items) + " }"


def generate(out_dir: str | Path, vocab: list[str], scale: float = 1.0, seed: int = 0,
             bigram_logits: np.ndarray | None = None, rank: np.ndarray | None = None,
             top_k: int = 16) -> dict:
    """Write the ruleset as several .toml files into out_dir; returns counts (rules, numbers, bytes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.toml"):
        f.unlink()
    V = len(vocab)
    rng = np.random.default_rng(seed)
    if rank is None:
        rank = np.arange(V)
    rank = np.asarray(rank)
    zipf = 1.0 / (np.arange(1, V + 1) ** 1.05)
    zipf /= zipf.sum()

    def freq(n: int, lo: int = 0) -> np.ndarray:
        """n tokens drawn by frequency rank (Zipf), distinct when possible."""
        p = zipf[lo:] / zipf[lo:].sum()
        return rank[lo:][rng.choice(V - lo, size=n, replace=n > V - lo, p=p)]

    def targets(n: int) -> list[tuple[str, float]]:
        toks = np.unique(freq(n * 2))[:n]
        return [(quote(vocab[t]), float(rng.normal(1.0, 0.7))) for t in toks]

    fp = vocab_fingerprint(vocab)
    head = f'vocab = "{fp}"\n'
    counts = {"rules": 0, "numbers": 0}
    files: dict[str, list[str]] = {}

    def add(fname: str, text: str, numbers: int):
        files.setdefault(fname, []).append(text)
        counts["rules"] += 1
        counts["numbers"] += numbers

    # prior
    if bigram_logits is not None:
        z = bigram_logits - bigram_logits.max(1, keepdims=True)
        p = np.exp(z)
        uni = (p / p.sum(1, keepdims=True)).mean(0)
        lu = np.log(uni + 1e-12)
        top = np.argsort(-lu)[:256]
        prior = [(quote(vocab[t]), float(lu[t] - np.median(lu))) for t in top]
    else:
        prior = [(quote(vocab[t]), float(6.0 - 0.02 * i)) for i, t in enumerate(rank[:256])]
    add("00_prior.toml", f'[[prior]]\nid = "prior.unigram"\ndoc = "Unigram backoff."\nnext = {toml_table(prior)}\n', len(prior))

    # classes + class-default bigram rows
    cls = []
    for name, pat in CLASS_PATTERNS.items():
        import re
        rx = re.compile(pat)
        if any(rx.search(s) for s in vocab):
            cls.append(name)
            files.setdefault("10_classes.toml", []).append(
                f'[[class]]\nid = "{name}"\ndoc = "Tokens matching {name}."\npattern = {json.dumps(pat)}\n')
    for name in cls:
        add("15_class_bigrams.toml", f'[[bigram]]\nid = "bigram.class.{name}"\ndoc = "Default after @{name}."\n'
            f'now = "@{name}"\nnext = {toml_table(targets(24))}\n', 24)

    # bigram table: top_k per token in 16 rules of V/16 rows
    n_blocks = 16
    per = -(-V // n_blocks)
    for b in range(n_blocks):
        rows = []
        for t in range(b * per, min(V, (b + 1) * per)):
            if bigram_logits is not None:
                row = bigram_logits[t]
                idx = np.argpartition(-row, top_k)[:top_k]
                med = float(np.median(row))
                items = [(quote(vocab[j]), float(row[j] - med)) for j in idx]
            else:
                items = targets(top_k)
            rows.append(f"{quote(vocab[t])} = {toml_table(items)}")
        add(f"20_bigram_{b:02d}.toml", f'[[bigram]]\nid = "bigram.table.{b:02d}"\ndoc = "Top-{top_k} next tokens, block {b}."\n'
            "[bigram.rows]\n" + "\n".join(rows) + "\n", len(rows) * top_k)

    # heads
    add("30_heads.toml", '[[head]]\nid = "head.prev"\ndoc = "Previous-token head."\n'
        'position = { 0 = 0.5, 1 = 5.0, 2 = 1.5, default = 0.0 }\n', 4)
    n_sc = max(1, int(48 * scale))
    sc_src = np.unique(freq(n_sc * 2, lo=50))[:n_sc]
    scores = ", ".join(f'{{ src = {quote(vocab[s])}, w = {float(rng.uniform(1, 4)):.3f} }}' for s in sc_src)
    add("30_heads.toml", '[[head]]\nid = "head.content"\ndoc = "Content head: attends to names and objects."\n'
        f'position = {{ 0 = -2.0, default = 0.0 }}\nscore = [{scores}]\n', 2 + n_sc)
    n_ov = int(512 * scale)
    src = freq(n_ov)
    for i in range(n_ov):
        add("31_head_out.toml", f'[[head_out]]\nid = "ov.prev.{i}"\ndoc = "Previous token writes its continuations."\n'
            f'head = "head.prev"\nsrc = {quote(vocab[src[i]])}\nnext = {toml_table(targets(8))}\n', 8)
    n_ovc = int(64 * scale)
    for i in range(n_ovc):
        s = sc_src[i % len(sc_src)]
        add("32_head_out_content.toml", f'[[head_out]]\nid = "ov.content.{i}"\ndoc = "Attended name is repeated."\n'
            f'head = "head.content"\nsrc = {quote(vocab[s])}\nnext = {toml_table(targets(4))}\n', 4)

    # neurons
    n_nr = int(300 * scale)
    for i in range(n_nr):
        now = freq(int(rng.integers(1, 5)))
        parts = [f"now = {toml_table([(quote(vocab[t]), float(rng.uniform(0.5, 2))) for t in np.unique(now)])}"]
        nums = len(np.unique(now)) + 1 + 6
        if i % 3 == 0:
            pr = np.unique(freq(2, lo=20))
            parts.append(f"present = {toml_table([(quote(vocab[t]), float(rng.uniform(0.3, 1))) for t in pr])}")
            nums += len(pr)
        if i % 4 == 0:
            at = np.unique(freq(2))
            parts.append('attend = { "head.prev" = ' + toml_table([(quote(vocab[t]), float(rng.uniform(1, 2))) for t in at]) + " }")
            nums += len(at)
        add("40_neurons.toml", f'[[neuron]]\nid = "neuron.{i}"\ndoc = "A conjunction of current and earlier tokens."\n'
            f"threshold = {float(rng.uniform(0.5, 1.5)):.3f}\n" + "\n".join(parts) + f"\nnext = {toml_table(targets(6))}\n", nums)

    # skip-trigrams
    n_sk = int(500 * scale)
    for i in range(n_sk):
        e = freq(1, lo=30)[0]
        now = f'"@{cls[i % len(cls)]}"' if (i % 2 and cls) else quote(vocab[freq(1)[0]])
        add("50_skips.toml", f'[[skip]]\nid = "skip.{i}"\ndoc = "Earlier token raises a later continuation."\n'
            f"earlier = {quote(vocab[e])}\nnow = {now}\nnext = {toml_table(targets(4))}\n", 4)

    nbytes = 0
    for fname, parts in files.items():
        text = head + "\n".join(parts)
        (out / fname).write_text(text, encoding="utf-8")
        nbytes += len(text.encode("utf-8"))
    counts.update(files=len(files), toml_bytes=nbytes, scale=scale)
    return counts
