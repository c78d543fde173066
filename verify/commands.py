"""`handmodel verify` and `handmodel report`. Module-level imports stay light (no torch, no numba):
the CLI imports this module on every command, and a warm verify must never import torch at all."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from handmodel.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = ROOT.parent / "shared" / "corpus" / "tinystories" / "train.txt"
DEFAULT_RULES = ROOT / "rules"

# Measured on the tiny test model and (when present) the shipped model; see README / issue 4.
FLOAT16_NOTE = ("Reference log-probs are cached as float16 (+ exact float32 reference CE and entropy); "
                "the KL error this costs is measured when the cache is built and printed in the footer "
                "(typically < 1e-3 nats/token).")

DEFINITIONS = f"""Measure how much of the reference each rule group explains (the KL ledger).

[b]Eval set[/b]: --corpus PATH (every reported number uses ../shared/corpus/tinystories/valid.txt) or,
without --corpus, --sampled N stories sampled from the reference with --seed S. Stories longer than the
context are split into context-length chunks (the header says how many).

[b]Definitions[/b] (nats/token):
- [b]KL[/b] = mean over eval positions of KL(p_ref ‖ p_hand) = Σ_v p_ref(v)·(log p_ref(v) − log p_hand(v)),
  reference first, from log-softmax outputs; every position counts. 95% CI: bootstrap over sequences
  (1000 resamples, fixed seed).
- [b]CE_hand / CE_ref[/b] = mean −log p(true next token), over positions that have a next token.
- [b]unexplained loss[/b] = CE_hand − CE_ref.
- [b]explained[/b] = 1 − KL_hand / KL_unigram (fraction of KL explained; unigram baseline below).
- [b]top-1[/b] = share of positions where argmax p_hand = argmax p_ref.
- [b]rules / numbers[/b] = rules switched on so far / explicit numbers they write.
[b]Baselines[/b]: uniform; unigram = the reference's mean next-token distribution over train positions;
oracle bigram = per current token, the mean of the reference's next-token distributions over train
positions with that token (the best any bigram table can do; unseen tokens fall back to the unigram).
Fitted on --train-corpus, never on the eval text.
[b]Ledger[/b]: rule groups added cumulatively in file order (the rest masked off).

[b]Cache[/b]: reference log-probs and baselines are computed once (torch) and cached under
$HANDMODEL_CACHE (default ~/.cache/handmodel), keyed by checkpoint hash + eval text hash + tokenizer.
{FLOAT16_NOTE}"""


# Options shared by verify, report and catalog (one definition: same names, defaults and help everywhere).
CHECKPOINT_OPT = typer.Option(None, "--checkpoint", help="Checkpoint folder (default: the shipped model in reference/default).")
RULES_OPT = typer.Option(None, "--rules", help="Rules folder (default: the shipped rules/).")
CORPUS_OPT = typer.Option(None, "--corpus", help="Eval text (.txt or folder). Default: stories sampled from the reference.")
SAMPLED_OPT = typer.Option(32, "--sampled", help="Without --corpus: how many stories to sample from the reference.")
SEED_OPT = typer.Option(0, "--seed", help="Without --corpus: sampling seed.")
TRAIN_OPT = typer.Option(None, "--train-corpus", help="Text the unigram / oracle bigram baselines are fitted on "
                                                      "(default ../shared/corpus/tinystories/train.txt).")


def _since_process_start() -> float | None:
    """Seconds since this process started (Linux /proc), so the footer includes interpreter start-up."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except Exception:
        return None


def _resolve_train(train_corpus: Optional[Path]) -> tuple[Optional[Path], str]:
    if train_corpus is not None:
        if not train_corpus.exists():
            raise UserError(f"{train_corpus}: --train-corpus not found; pass the training text (train.txt)")
        return train_corpus, str(train_corpus)
    if DEFAULT_TRAIN.exists():
        return DEFAULT_TRAIN, str(DEFAULT_TRAIN)
    return None, "no train text found: baselines fitted on stories sampled from the reference (pass --train-corpus)"


def evaluate(checkpoint: Optional[Path], rules_dir: Optional[Path], corpus: Optional[Path], sampled: int, seed: int,
             train_corpus: Optional[Path], ablate: bool = False, worst: int = 0, log=print,
             ledger_rows: bool = True) -> dict:
    """Everything `verify` prints, as one dict (also what --json writes)."""
    import numpy as np

    from handmodel.vocab import load_vocab

    from . import baselines as B
    from . import data as D
    from . import ledger as L

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ckpt = D.checkpoint_info(checkpoint)
    spec = D.EvalSpec(corpus=corpus, sampled=sampled, seed=seed)
    ref = D.get_ref_cache(ckpt, spec, log=log)
    timings["reference cache"] = time.perf_counter() - t0
    train, train_note = _resolve_train(train_corpus)
    t1 = time.perf_counter()
    tables = B.get_tables(ckpt, train, log=log)
    base = B.baseline_metrics(ref, tables)
    timings["baselines"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    vocab = load_vocab(ckpt.path / "tokenizer.json")
    if len(vocab) != ref.logp.shape[1]:
        raise UserError(f"{ckpt.path}: tokenizer has {len(vocab)} tokens but the cached log-probs have "
                        f"{ref.logp.shape[1]}; delete {ref.dir} and re-run")
    from handmodel import HandModel, load_rules

    rules_dir = Path(rules_dir) if rules_dir is not None else DEFAULT_RULES
    if not rules_dir.exists():
        raise UserError(f"{rules_dir}: rules folder not found; pass --rules DIR (a folder of *.toml rule files)")
    rules = load_rules(rules_dir, vocab)
    hm = HandModel(rules)
    timings["load rules"] = time.perf_counter() - t1

    weights = L.boot_weights(len(ref.offsets) - 1)
    kl_uni = float(np.mean(base["unigram"]["kl"]))
    base_rows = [L.summarize(n, base[n], ref, weights, kl_uni, has_agree=(n != "uniform")) for n in base]
    t1 = time.perf_counter()
    rows, last = L.run_ledger(hm, rules, ref, kl_uni, weights, final_only=not ledger_rows)
    timings["ledger"] = time.perf_counter() - t1
    meta = ref.meta
    out = {
        "header": {
            "eval_set": spec.describe(meta["eval"]), "eval": meta["eval"], "n_tokens": meta["n_tokens"],
            "n_sequences": meta["n_seqs"], "n_split": meta["n_split"], "n_ctx": meta["n_ctx"],
            "checkpoint": str(ckpt.path), "checkpoint_hash": ckpt.hash, "rules": str(rules_dir),
            "n_rules": len(rules.rule_ids), "n_groups": len(rules.groups), "train_text": train_note,
            "cache": str(ref.dir), "cache_built": ref.built,
        },
        "baselines": base_rows,
        "ledger": rows,
        "final": rows[-1],
        "float16_precision": meta.get("float16_precision"),
    }
    from .verified import verified_for_verify  # issue 20: the verified ledger, from cached component verdicts only

    out["verified"] = verified_for_verify(ckpt, hm, rules, rules_dir, ref, kl_uni, weights, rows, DEFAULT_TRAIN.parent / "valid.txt")
    if ablate:
        t1 = time.perf_counter()
        from .probe import fast_ablation

        out["ablation"] = fast_ablation(hm, rules, ref, rows[-1]["kl"], last["kl"], log=log)
        timings["ablation"] = time.perf_counter() - t1
    if worst > 0:
        t1 = time.perf_counter()
        out["worst"] = L.worst_positions(hm, ref, last["kl"], vocab, worst)
        out["gap_by_current"] = L.gap_by(ref, last["kl"], vocab, "current")
        out["gap_by_next"] = L.gap_by(ref, last["kl"], vocab, "next")
        timings["worst"] = time.perf_counter() - t1
    out["timings"] = {k: round(v, 3) for k, v in timings.items()}
    out["_objects"] = (ref, hm, rules, vocab, last)  # for report; dropped before JSON
    return out


def verify_cmd(
    checkpoint: Optional[Path] = CHECKPOINT_OPT,
    rules: Optional[Path] = RULES_OPT,
    corpus: Optional[Path] = CORPUS_OPT,
    sampled: int = SAMPLED_OPT,
    seed: int = SEED_OPT,
    train_corpus: Optional[Path] = TRAIN_OPT,
    ablate: bool = typer.Option(False, "--ablate", help="Per rule: KL increase when only that rule is off (sorted; rules whose removal helps are flagged)."),
    worst: int = typer.Option(0, "--worst", help="Show the K positions with the largest KL and the gap by current / next token."),
    fail_above: Optional[float] = typer.Option(None, "--fail-above", help="Exit 1 if the final KL exceeds this (CI gate)."),
    json_stdout: bool = typer.Option(False, "--json", help="Machine output: JSON to stdout (tables are not printed)."),
    json_file: Optional[Path] = typer.Option(None, "--json-out", help="Also write the JSON to this file (tables still printed)."),
    ledger_rows: bool = typer.Option(True, "--ledger/--final-only", help="Evaluate every cumulative rule group (default) or only all rules on (faster)."),
):
    t_cmd = time.perf_counter()
    to_stdout = json_stdout
    from rich.console import Console

    console = Console(stderr=to_stdout, highlight=False)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    res = evaluate(checkpoint, rules, corpus, sampled, seed, train_corpus, ablate=ablate, worst=worst, log=log,
                   ledger_rows=ledger_rows)
    res.pop("_objects")
    wall = _since_process_start()
    res["wall_seconds"] = round(wall if wall is not None else time.perf_counter() - t_cmd, 3)
    final = res["final"]["kl"]
    res["fail_above"] = fail_above
    res["failed"] = bool(fail_above is not None and final > fail_above)
    if to_stdout or json_file is not None:
        import json

        text = json.dumps(res, indent=2, ensure_ascii=False)
        if to_stdout:
            typer.echo(text)
        if json_file is not None:
            Path(json_file).write_text(text + "\n", encoding="utf-8")
    if not to_stdout:
        from .render import render

        render(console, res)
    if res["failed"]:
        console.print(f"[bold red]FAIL[/bold red]: final KL {final:.4f} > --fail-above {fail_above}")
        raise typer.Exit(1)


verify_cmd.__doc__ = DEFINITIONS


def report_cmd(
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (self-contained, no network)."),
    checkpoint: Optional[Path] = CHECKPOINT_OPT,
    rules: Optional[Path] = RULES_OPT,
    corpus: Optional[Path] = CORPUS_OPT,
    sampled: int = SAMPLED_OPT,
    seed: int = SEED_OPT,
    train_corpus: Optional[Path] = TRAIN_OPT,
    max_tokens: int = typer.Option(3000, "--max-tokens", help="Eval tokens shown in the coloured text (the first ones, whole sequences)."),
):
    """Write one self-contained HTML report: the ledger as a chart, and the eval text coloured by residual
    KL (hover or click a token: reference vs hand top-5 and the rules that fired there)."""
    from rich.console import Console

    console = Console(highlight=False)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    res = evaluate(checkpoint, rules, corpus, sampled, seed, train_corpus, log=log)
    from .report import write_report

    n = write_report(out, res, max_tokens=max_tokens)
    console.print(f"wrote {out} ({n} tokens shown, {out.stat().st_size / 1e6:.1f} MB)")
