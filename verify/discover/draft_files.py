"""Turn drafts (bigrams.py, heads.py) into rule files a person reads and edits.

Every rule gets an id, a provisional one-line doc in English and a provenance comment (where its
numbers came from and, when known, how much KL it should remove). Numbers are written with 3
decimals; tokens are spelled with handmodel.writer.q so they always read back as the same token.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from handmodel import vocab_fingerprint
from handmodel.writer import inline_table, name_part, num, q

from .bigrams import BigramDraft


# Every drafted rule says it makes no claim yet (`handmodel check-rules` reports "no claim" instead of
# testing a fitted correction as if a person had asserted it); the researcher states the claim
# (margin, fraction, ...) when they adopt the rule. See docs/claims.md.
DRAFT_CHECK = 'check = { expect = "none", why = "drafted by suggest: a fitted correction, no claim stated yet" }\n'


def _show(tok: str) -> str:
    return repr(tok)


def ranked(support: np.ndarray, delta: np.ndarray, counts: np.ndarray | None, sign: float = 1.0) -> np.ndarray:
    """Indices of the entries pushed in direction `sign`, most consequential first: |w| × √(training count)
    of the token (a large number on a token that almost never occurs changes little; docs name the ones a
    reader will meet)."""
    d = np.asarray(delta, dtype=np.float64) * sign
    imp = d * (np.sqrt(np.asarray(counts, np.float64)[support] + 1.0) if counts is not None else 1.0)
    order = np.argsort(-imp)
    return order[d[order] > 0]


def _top_desc(vocab, row, counts=None, n=4) -> str:
    return ", ".join(f"{_show(vocab[row.support[i]])} ({row.delta[i]:+.1f})" for i in ranked(row.support, row.delta, counts)[:n])


class FileSet:
    def __init__(self, out: Path, vocab: list[str], provenance: str):
        self.out = Path(out)
        self.vocab = vocab
        self.fp = vocab_fingerprint(vocab)
        self.provenance = provenance
        self.files: dict[str, list[str]] = {}  # file name -> rule blocks (written in file-name order)
        self.headers: dict[str, str] = {}

    def start(self, fname: str, group: str | None, about: str) -> None:
        lines = [f"# {line}" for line in about.strip().splitlines()]
        lines.append(f"# drafted by `handmodel suggest` ({self.provenance}); edit freely: ids, docs and numbers are yours")
        lines.append(f'vocab = "{self.fp}"')
        if group:
            lines.append(f'group = "{group}"')
        self.headers[fname] = "\n".join(lines) + "\n"
        self.files[fname] = []  # (re)starting a file drops what it held

    def add(self, fname: str, text: str) -> None:
        self.files[fname].append(text)

    def write(self) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        paths = []
        for fname, blocks in sorted(self.files.items()):
            p = self.out / fname
            p.write_text(self.headers[fname] + "\n" + "\n".join(blocks), encoding="utf-8")
            paths.append(p)
        return paths


def write_bigram_files(fs: FileSet, d: BigramDraft, counts: np.ndarray, per_token_rules: int = 200) -> None:
    """00_prior, 10_classes, 20_bigram_classes, 30_bigram_tokens (one rule per frequent token, the rest
    grouped by class so ablation stays readable)."""
    V = fs.vocab
    fs.start("00_prior.toml", "prior", "Unigram prior: the reference's average next-token log-probability (log of its\n"
             "mean next-token distribution over training positions). Every row below starts from it.")
    items = [(q(V[t]), float(d.prior[t])) for t in range(len(V))]
    fs.add("00_prior.toml", "[[prior]]\nid = \"prior.unigram\"\n"
           "doc = \"Before context is read, each token is as likely as the reference predicts it on average.\"\n"
           + DRAFT_CHECK + f"next = {inline_table(items)}\n")

    fs.start("10_classes.toml", None, "Token classes: tokens after which the reference predicts alike (k-means on the\n"
             "oracle-bigram rows, Hellinger distance). Named after their most frequent members.")
    for name, mem in zip(d.class_names, d.class_members):
        top = mem[np.argsort(-counts[mem])][:6]
        doc = f"{len(mem)} tokens after which the next token is predicted alike, e.g. " + ", ".join(_show(V[t]) for t in top)
        toks = ", ".join(q(V[t]) for t in mem)
        fs.add("10_classes.toml", f"[[class]]\nid = \"{name}\"\ndoc = {q(doc)}\ntokens = [{toks}]\n")

    fs.start("20_bigram_classes.toml", "bigram: class rows", "Class-level default rows: what follows any token of a class\n"
             "(the class's pooled oracle-bigram row, sparsified to its largest KL contributions).")
    for k, (name, row) in enumerate(zip(d.class_names, d.class_rows)):
        if not len(row.support):
            continue
        items = [(q(V[t]), float(w)) for t, w in zip(row.support, row.delta)]
        fs.add("20_bigram_classes.toml",
               f"[[bigram]]\nid = \"after.{name}\"\ndoc = {q(f'After a @{name} token the reference favours ' + _top_desc(V, row, counts))}\n"
               + DRAFT_CHECK + f"now = \"@{name}\"\nnext = {inline_table(items)}\n")

    fs.start("30_bigram_tokens.toml", "bigram: token rows", "Per-token exceptions on top of the class row: where the\n"
             "reference's prediction after one token differs from its class (largest KL contributions first).")
    order = sorted(d.token_rows, key=lambda c: -counts[c])
    solo = order[:per_token_rules]
    used_ids: set[str] = set()
    for c in solo:
        row = d.token_rows[c]
        rid = f"after.{name_part(V[c])}"
        while rid in used_ids:
            rid += "_"
        used_ids.add(rid)
        items = [(q(V[t]), float(w)) for t, w in zip(row.support, row.delta)]
        cls = f" (class @{d.class_names[d.label[c]]})" if d.label[c] >= 0 else ""
        fs.add("30_bigram_tokens.toml",
               f"# seen {int(counts[c])} times in the training text{cls}\n"
               f"[[bigram]]\nid = \"{rid}\"\ndoc = {q(f'After {_show(V[c])} the reference favours ' + _top_desc(V, row, counts))}\n"
               + DRAFT_CHECK + f"now = {q(V[c])}\nnext = {inline_table(items)}\n")
    rest: dict[int, list[int]] = {}
    for c in order[per_token_rules:]:
        rest.setdefault(int(d.label[c]), []).append(c)
    for lab in sorted(rest, key=lambda k: -sum(counts[c] for c in rest[k])):
        cs = rest[lab]
        name = d.class_names[lab] if lab >= 0 else "unclassed"
        body = []
        for c in cs:
            row = d.token_rows[c]
            body.append(f"{q(V[c])} = {inline_table((q(V[t]), float(w)) for t, w in zip(row.support, row.delta))}")
        doc = (f"Rarer tokens of @{name}: where each one's next-token prediction departs from the class row"
               if lab >= 0 else "Tokens too rare to cluster: their own next-token rows")
        fs.add("30_bigram_tokens.toml", f"[[bigram]]\nid = \"rare.{name}\"\ndoc = {q(doc)}\n" + DRAFT_CHECK
               + "[bigram.rows]\n" + "\n".join(body) + "\n")


__all__ = ["FileSet", "write_bigram_files", "num"]
