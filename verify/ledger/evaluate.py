"""One evaluation of a ruleset against the reference: the ledger, the baselines and (on request) the
ablation and the worst positions, as a typed record. `to_json()` is what `verify --json` prints; the live
objects (reference cache, hand model, compiled rules) stay as fields for the HTML report and the catalog.
Module imports stay light (no numpy, no numba): the CLI imports this module on every command."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from handmodel.errors import UserError


@dataclass
class Evaluation:
    header: dict
    baselines: list[dict]
    ledger: list[dict]
    final: dict
    float16_precision: Optional[dict]
    timings: dict[str, float]
    ref: Any = field(repr=False)      # verify.ledger.data.RefCache: the eval set and the reference's log-probs
    hand: Any = field(repr=False)     # handmodel.HandModel over `rules`
    rules: Any = field(repr=False)    # handmodel CompiledRules
    vocab: list[str] = field(repr=False)
    last: dict = field(repr=False)    # per-position arrays with all rules on ("kl", "ce", "agree")
    ckpt: Any = field(repr=False)     # verify.ledger.data.Checkpoint
    kl_unigram: float = field(repr=False)  # the unigram baseline's KL (the "explained" scale)
    ablation: Optional[list[dict]] = None
    worst: Optional[list[dict]] = None
    gap_by_current: Optional[list[dict]] = None
    gap_by_next: Optional[list[dict]] = None
    verified: Any = None  # verify.claims.verified.VerifiedLedger, when asked for

    def to_json(self) -> dict:
        """The JSON record (key order as printed since the first release: scripts diff it)."""
        out = {"header": self.header, "baselines": self.baselines, "ledger": self.ledger, "final": self.final,
               "float16_precision": self.float16_precision}
        if self.ablation is not None:
            out["ablation"] = self.ablation
        if self.worst is not None:
            out.update(worst=self.worst, gap_by_current=self.gap_by_current, gap_by_next=self.gap_by_next)
        if self.verified is not None:
            out["verified"] = self.verified.to_json()
        out["timings"] = self.timings
        return out


def evaluate(checkpoint: Optional[Path], rules_dir: Path, corpus: Optional[Path], sampled: int, seed: int,
             train_corpus: Optional[Path], ablate: bool = False, worst: int = 0, log=print,
             ledger_rows: bool = True) -> Evaluation:
    """Measure `rules_dir` (a folder or one .toml file) on `corpus` (None: `sampled` stories drawn from the
    reference with `seed`); baselines fitted on `train_corpus` (None: on stories sampled from the reference)."""
    import numpy as np

    from handmodel import HandModel, load_rules
    from handmodel.vocab import load_vocab

    from . import baselines as B
    from . import core as L
    from . import data as D

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ckpt = D.checkpoint_info(checkpoint)
    spec = D.EvalSpec(corpus=corpus, sampled=sampled, seed=seed)
    ref = D.get_ref_cache(ckpt, spec, log=log)
    timings["reference cache"] = time.perf_counter() - t0
    if train_corpus is not None and not Path(train_corpus).exists():
        raise UserError(f"{train_corpus}: --train-corpus not found; pass the training text (train.txt)")
    train_note = str(train_corpus) if train_corpus is not None else \
        "no train text found: baselines fitted on stories sampled from the reference (pass --train-corpus)"
    t1 = time.perf_counter()
    base = B.shipped_metrics(ckpt, ref) if train_corpus is None else None
    if base is not None:
        train_note = ("no train text found: baselines fitted on stories sampled from the reference, shipped with the "
                      "checkpoint for this eval set (pass --train-corpus)")
    else:
        base = B.baseline_metrics(ref, B.get_tables(ckpt, train_corpus, log=log))
    timings["baselines"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    vocab = load_vocab(ckpt.path / "tokenizer.json")
    if len(vocab) != ref.logp.shape[1]:
        raise UserError(f"{ckpt.path}: tokenizer has {len(vocab)} tokens but the cached log-probs have "
                        f"{ref.logp.shape[1]}; delete {ref.dir} and re-run")
    rules_dir = Path(rules_dir)
    if not rules_dir.exists():
        raise UserError(f"{rules_dir}: rules folder not found; pass --rules DIR (a folder of *.toml rule files)")
    rules = load_rules(rules_dir, vocab)
    hm = HandModel(rules)
    timings["load rules"] = time.perf_counter() - t1
    from handmodel.engine import kernels_cold

    def notice() -> None:  # only when a pass runs: a fully cached ledger never imports numba
        if kernels_cold():
            log("compiling the hand model's numba kernels (first run in this checkout: about a minute; cached after)")

    hm.before_first_pass = notice

    weights = L.boot_weights(len(ref.offsets) - 1)
    kl_uni = float(np.mean(base["unigram"]["kl"]))
    base_rows = [L.summarize(n, base[n], ref, weights, kl_uni, has_agree=(n != "uniform")) for n in base]
    t1 = time.perf_counter()
    rows, last = L.run_ledger(hm, rules, ref, kl_uni, weights, final_only=not ledger_rows)
    timings["ledger"] = time.perf_counter() - t1
    meta = ref.meta
    header = {
        "eval_set": spec.describe(meta["eval"]), "eval": meta["eval"], "n_tokens": meta["n_tokens"],
        "n_sequences": meta["n_seqs"], "n_split": meta["n_split"], "n_ctx": meta["n_ctx"],
        "checkpoint": str(ckpt.path), "checkpoint_hash": ckpt.hash, "rules": str(rules_dir),
        "n_rules": len(rules.rule_ids), "n_groups": len(rules.groups), "train_text": train_note,
        "cache": str(ref.dir), "cache_built": ref.built,
    }
    res = Evaluation(header=header, baselines=base_rows, ledger=rows, final=rows[-1],
                     float16_precision=meta.get("float16_precision"), timings=timings,
                     ref=ref, hand=hm, rules=rules, vocab=vocab, last=last, ckpt=ckpt, kl_unigram=kl_uni)
    if ablate:
        t1 = time.perf_counter()
        from .probe import fast_ablation

        res.ablation = fast_ablation(hm, rules, ref, rows[-1]["kl"], last["kl"], log=log)
        timings["ablation"] = time.perf_counter() - t1
    if worst > 0:
        t1 = time.perf_counter()
        res.worst = L.worst_positions(hm, ref, last["kl"], vocab, worst)
        res.gap_by_current = L.gap_by(ref, last["kl"], vocab, "current")
        res.gap_by_next = L.gap_by(ref, last["kl"], vocab, "next")
        timings["worst"] = time.perf_counter() - t1
    res.timings = {k: round(v, 3) for k, v in timings.items()}
    return res
