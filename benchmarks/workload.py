"""The shared workload: checkpoint, eval token batches from the corpus, cached reference log-probs,
and the ruleset (the shipped rules/ or, when absent, a generated one)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .machine import ROOT

DEFAULT_CHECKPOINT = ROOT / "reference" / "default"
DEFAULT_RULES = ROOT / "rules"
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "tinystories" / "valid.txt"
DEFAULT_TRAIN = DEFAULT_CORPUS.with_name("train.txt")


def add_pass_args(ap, seqs: int, seqs_help: str) -> None:
    """--rules, --corpus, --train-corpus and --seqs, as the scripts timing one engine pass take them
    (engine_pass, phases, lineprof)."""
    ap.add_argument("--rules", type=Path, default=DEFAULT_RULES)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--train-corpus", type=Path, default=DEFAULT_TRAIN)
    ap.add_argument("--seqs", type=int, default=seqs, help=seqs_help)


@dataclass
class Workload:
    ckpt: Path
    ckpt_hash: str
    oracle: object  # reference.oracle.Oracle
    vocab: list[str]
    corpus: Path
    train_corpus: Path | None
    seqs: list[np.ndarray]  # the benchmark's token sequences (first stories of the corpus, chunked to n_ctx)
    batches: list[tuple[int, int]]  # [lo, hi) ranges of seqs, each about `batch_tokens` tokens
    batch_tokens: int
    ref16: np.ndarray  # [N, V] float16 reference log-probs of seqs (what verify caches)
    rules_dir: Path
    rules_source: str
    rules: object  # handmodel.CompiledRules
    hm: object  # handmodel.HandModel
    work: Path
    corpus_stats: dict = field(default_factory=dict)
    _rank: np.ndarray | None = None
    _direct: np.ndarray | None = None
    _files: dict | None = None

    @property
    def n_tokens(self) -> int:
        return int(sum(len(s) for s in self.seqs))

    @property
    def V(self) -> int:
        return len(self.vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.oracle.cfg.n_ctx)

    def files(self) -> dict:
        """tokens / offsets / ref16 as .npy files for the child-process probes (written once per run)."""
        if self._files is None:
            d = self.work / f"workload-{os.getpid()}"
            d.mkdir(parents=True, exist_ok=True)
            out = {"tokens": d / "tokens.npy", "offsets": d / "offsets.npy", "ref16": d / "ref16.npy"}
            np.save(out["tokens"], np.concatenate(self.seqs).astype(np.int32))
            np.save(out["offsets"], np.concatenate([[0], np.cumsum([len(s) for s in self.seqs])]).astype(np.int64))
            np.save(out["ref16"], self.ref16)
            self._files = {k: str(v) for k, v in out.items()}
        return self._files

    def cleanup(self) -> None:
        if self._files is not None:
            shutil.rmtree(Path(self._files["tokens"]).parent, ignore_errors=True)
            self._files = None

    def generated_rules(self, scale: float, seed: int = 0) -> Path:
        """benchmarks/genrules.py ruleset at `scale`, values from the reference's direct path, cached."""
        from handmodel import vocab_fingerprint

        from .genrules import generate

        fp = vocab_fingerprint(self.vocab).replace(":", "-")
        src = hashlib.sha256(Path(__file__).with_name("genrules.py").read_bytes()).hexdigest()[:8]
        d = self.work / "genrules" / f"{fp}-{self.ckpt_hash}-g{src}-scale{scale:g}-seed{seed}"
        if (d / "done.json").exists():
            return d
        if self._direct is None:
            self._direct = np.asarray(self.oracle.direct_path(), dtype=np.float32)
        if d.exists():
            shutil.rmtree(d)
        t = time.perf_counter()
        counts = generate(d, self.vocab, scale=scale, seed=seed, bigram_logits=self._direct, rank=self._rank)
        counts["generate_s"] = round(time.perf_counter() - t, 3)
        (d / "done.json").write_text(json.dumps(counts))
        return d


def _batches(seqs: list[np.ndarray], batch_tokens: int) -> list[tuple[int, int]]:
    out, lo, n = [], 0, 0
    for i, s in enumerate(seqs):
        if n and n + len(s) > batch_tokens:
            out.append((lo, i))
            lo, n = i, 0
        n += len(s)
    out.append((lo, len(seqs)))
    return out


def build(checkpoint: Path, rules: Path, corpus: Path, train_corpus: Path | None, n_tokens: int, batch_tokens: int,
          work: Path, log=print) -> Workload:
    from handmodel import HandModel, load_rules
    from reference.corpus import encode_stories, read_stories
    from reference.oracle import Oracle
    from verify.ledger.data import checkpoint_info, chunk

    ck = checkpoint_info(checkpoint)  # validates the folder (clear error when the model is not trained yet)
    oracle = Oracle.load(ck.path)
    vocab = list(oracle.vocab)
    corpus = Path(corpus)
    stories = read_stories(corpus)
    all_seqs, _ = chunk(encode_stories(oracle.tokenizer, stories), ck.n_ctx)
    total = int(sum(len(s) for s in all_seqs))
    seqs, n = [], 0
    for s in all_seqs:
        if n >= n_tokens:
            break
        seqs.append(s)
        n += len(s)
    counts = np.bincount(np.concatenate(all_seqs), minlength=len(vocab))
    log(f"workload: {n:,} tokens in {len(seqs)} sequences (first stories of {corpus}; the file has {total:,})")
    batches = _batches(seqs, batch_tokens)
    t = time.perf_counter()
    ref16 = np.concatenate([lp.astype(np.float16) for lp in oracle.log_probs(seqs)])
    log(f"reference log-probs for the workload (float16, as verify caches them): {time.perf_counter() - t:.1f} s")

    w = Workload(ckpt=ck.path, ckpt_hash=ck.hash, oracle=oracle, vocab=vocab, corpus=corpus, train_corpus=train_corpus,
                 seqs=seqs, batches=batches, batch_tokens=batch_tokens, ref16=ref16, rules_dir=Path(rules),
                 rules_source="", rules=None, hm=None, work=work,
                 corpus_stats={"corpus_tokens": total, "corpus_sequences": len(all_seqs)})
    w._rank = np.argsort(-counts, kind="stable")
    rules = Path(rules)
    if rules.exists():
        w.rules_dir, w.rules_source = rules, f"{rules}"
    else:
        w.rules_dir = w.generated_rules(1)
        w.rules_source = (f"{rules} not found: using a GENERATED ruleset (benchmarks/genrules.py, scale 1, values from "
                          "the reference's direct path) -- a workload of realistic shape, not a model of the reference")
    log(f"rules: {w.rules_source}")
    t = time.perf_counter()
    w.rules = load_rules(w.rules_dir, vocab)
    w.hm = HandModel(w.rules)
    log(f"compiled {len(w.rules.rule_ids)} rules in {time.perf_counter() - t:.1f} s")
    return w
