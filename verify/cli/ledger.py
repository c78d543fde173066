"""`handmodel verify`, `report` and `catalog`: the commands that measure a ruleset (verify/ledger/evaluate.py)
and print or write what they measured (verify/reports/). Module-level imports stay light (no torch, no
numba): the CLI imports this module on every command, and a warm verify must never import torch at all."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from handmodel.errors import UserError
from verify.ledger.evaluate import Evaluation, evaluate

from . import options as O

DEFAULT_WINDOWS = 64  # = verify.claims.verified.DEFAULT_WINDOWS (not imported: it would pull numpy into every command)

# Measured on the tiny test model and (when present) the shipped model; see README / issue 4.
FLOAT16_NOTE = ("Reference log-probs are cached as float16 (+ exact float32 reference CE and entropy); "
                "the KL error this costs is measured when the cache is built and printed in the footer "
                "(typically < 1e-3 nats/token).")

DEFINITIONS = f"""Measure how much of the reference each rule group explains (the KL ledger).

[b]Eval set[/b]: --corpus PATH (default: the project's ../shared/corpus/tinystories/valid.txt, which every
reported number uses) or --sampled N stories sampled from the reference with --seed S (also the fallback,
32 stories, when the default --corpus is absent). Stories longer than the context are split into
context-length chunks (the header says how many).

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


SAMPLED = typer.Option(None, "--sampled", help="Measure on N stories sampled from the reference (seed --seed) instead of "
                                               "--corpus; without it, 32 when the default --corpus is absent.")
SEED = typer.Option(0, "--seed", help="Sampling seed of --sampled.")
FALLBACK_SAMPLED = 32
DEFAULT_REPORT = O.project_path("runs", "report.html")


def _since_process_start() -> float | None:
    """Seconds since this process started (Linux /proc), so the footer includes interpreter start-up."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except Exception:
        return None


def _measure(checkpoint: Path, rules: Path, corpus: Path, sampled: Optional[int], seed: int, train_corpus: Path,
             log, **kw) -> Evaluation:
    """Resolve the shared options (eval set, training text) and evaluate."""
    if sampled is not None:
        if corpus != O.DEFAULT_CORPUS:
            raise UserError(f"--corpus {corpus} and --sampled {sampled}: pass one of them (the eval set)")
        corpus_path = None
    else:
        corpus_path = O.given(corpus, O.DEFAULT_CORPUS)
        if corpus_path is None:
            sampled = FALLBACK_SAMPLED
            log(f"{O.DEFAULT_CORPUS} not found: measuring on {sampled} stories sampled from the reference")
    return evaluate(checkpoint, rules, corpus_path, sampled if sampled is not None else FALLBACK_SAMPLED, seed,
                    O.given(train_corpus, O.DEFAULT_TRAIN), log=log, **kw)


def verdict_source(rules: Path, checkpoint: Path, corpus: Path, sampled: Optional[int],
                   windows: int = DEFAULT_WINDOWS) -> tuple[Optional[Path], str]:
    """(the text whose windows the cached component verdicts are about, the check-components command that
    computes them): the eval corpus when one is given (--corpus, never a training text), else the default
    valid.txt (with --sampled too); None when there is none."""
    named = sampled is None and corpus is not None and Path(corpus).exists() and "train" not in Path(corpus).name
    valid = Path(corpus) if named else O.given(O.DEFAULT_CORPUS, O.DEFAULT_CORPUS)
    cmd = "handmodel check-components" + ("" if Path(rules) == O.DEFAULT_RULES else f" --rules {rules}") + \
        ("" if Path(checkpoint) == O.DEFAULT_CHECKPOINT else f" --checkpoint {checkpoint}") + \
        ("" if valid is None or Path(valid).resolve() == O.DEFAULT_CORPUS.resolve() else f" --corpus {valid}") + \
        ("" if windows == DEFAULT_WINDOWS else f" --windows {windows}")
    return valid, cmd


def verified_section(ev: Evaluation, rules: Path, checkpoint: Path, corpus: Path, sampled: Optional[int], windows: int,
                     final_only: bool = False):
    """The verified ledger from cached component verdicts (verdict_source says which)."""
    from verify.claims.verified import verified_ledger

    valid, cmd = verdict_source(rules, checkpoint, corpus, sampled, windows)
    return verified_ledger(ev, Path(rules), valid, windows, final_only=final_only, check_cmd=cmd)


def verify_cmd(
    checkpoint: Path = O.CHECKPOINT,
    rules: Path = O.RULES,
    corpus: Path = O.CORPUS,
    sampled: Optional[int] = SAMPLED,
    seed: int = SEED,
    train_corpus: Path = O.TRAIN_CORPUS,
    ablate: bool = typer.Option(False, "--ablate", help="Per rule: KL increase when only that rule is off (sorted; rules whose removal helps are flagged)."),
    worst: int = typer.Option(0, "--worst", help="Show the K positions with the largest KL and the gap by current / next token."),
    fail_above: Optional[float] = typer.Option(None, "--fail-above", help="Exit 1 if the final KL exceeds this (CI gate)."),
    json_stdout: bool = O.JSON,
    json_file: Optional[Path] = typer.Option(None, "--json-out", help="Also write the JSON to this file (tables still printed)."),
    ledger_rows: bool = typer.Option(True, "--ledger/--final-only", help="Evaluate every cumulative rule group (default) or only all rules on (faster)."),
    wide: bool = typer.Option(False, "--wide", help="Every column of the ledger and baseline tables (also when COLUMNS ≥ 120)."),
    verified: bool = typer.Option(True, "--verified/--no-verified", help="Also the verified ledger: every rule whose "
                                  "cached component verdict (`handmodel check-components`) is not a pass switched off."),
    windows: int = typer.Option(DEFAULT_WINDOWS, "--windows", help="The verdicts to read: those check-components "
                                "computed on this many windows of valid.txt (its --windows)."),
    watch: bool = typer.Option(False, "--watch", help="Stay running and verify again each time a rule file in "
                               "--rules is saved (Ctrl-C ends). The process stays warm: an edited number is "
                               "measured in about a second."),
):
    t_cmd = time.perf_counter()
    O.check_number(fail_above, "--fail-above")
    O.check_rules(rules)
    O.check_out_file(json_file, "--json-out")
    if watch and (json_stdout or json_file is not None):
        raise UserError("--watch prints the tables again after each save; drop --json / --json-out (or --watch)")
    to_stdout = json_stdout
    from rich.console import Console

    console = Console(stderr=to_stdout, highlight=False)
    if wide:  # room for every column: a narrower terminal wraps the long lines instead of rich cutting cells
        console.width = max(console.width, 160)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731

    def once(before: float):
        """Measure and print: (the Evaluation, True when --fail-above failed). `before`: seconds to count before
        this run (the first run's footer includes interpreter start-up; a watch's later runs count from the save)."""
        t_run = time.perf_counter()
        ev = _measure(checkpoint, rules, corpus, sampled, seed, train_corpus, log, ablate=ablate, worst=worst,
                      ledger_rows=ledger_rows)
        if verified:
            t1 = time.perf_counter()
            ev.verified = verified_section(ev, rules, checkpoint, corpus, sampled, windows, final_only=not ledger_rows)
            ev.timings["verified"] = round(time.perf_counter() - t1, 3)
        res = ev.to_json()
        res["wall_seconds"] = round(before + time.perf_counter() - t_run, 3)
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
            from verify.reports.render import render

            render(console, res, wide=wide)
        if res["failed"]:
            console.print(f"[bold red]FAIL[/bold red]: final KL {final:.4f} > --fail-above {fail_above}")
        return ev, res["failed"]

    if watch:
        from .watch import stamp

        since = stamp(Path(rules))  # before the first read: a save during the first run counts
    age = _since_process_start()
    ev, failed = once(age if age is not None else time.perf_counter() - t_cmd)
    if watch:
        from .watch import serve

        serve(Path(rules), lambda: once(0.0), console, since, warm=lambda: _warm_kernels(ev))
    elif failed:
        raise typer.Exit(1)


verify_cmd.__doc__ = DEFINITIONS


def _warm_kernels(ev: Evaluation) -> None:
    """Load numba and the cached kernels now, while the user reads the ledger (~0.6 s; a first run whose rows all
    came from the row cache never called a kernel), so the first edit that recomputes positions does not pay it:
    the KL path on the first few positions of the eval set."""
    n = min(8, len(ev.ref.seqs[0])) if ev.ref.seqs else 0
    if n:
        ev.hand.stream_metrics([ev.ref.seqs[0][:n]], ev.ref.logp[:n])


def report_cmd(
    out: Path = O.out_option(DEFAULT_REPORT, "HTML file (self-contained, no network)"),
    checkpoint: Path = O.CHECKPOINT,
    rules: Path = O.RULES,
    corpus: Path = O.CORPUS,
    sampled: Optional[int] = SAMPLED,
    seed: int = SEED,
    train_corpus: Path = O.TRAIN_CORPUS,
    max_tokens: int = typer.Option(3000, "--max-tokens", help="Eval tokens shown in the coloured text (the first ones, whole sequences)."),
):
    """Write one self-contained HTML report: the ledger as a chart, and the eval text coloured by residual
    KL (hover or click a token: reference vs hand top-5 and the rules that fired there, each marked verified
    or not by the cached `check-components` verdicts)."""
    from rich.console import Console

    if out == DEFAULT_REPORT:
        out.parent.mkdir(exist_ok=True)  # runs/ is the project's (git-ignored) place for outputs
    O.check_out_file(out)
    O.check_rules(rules)
    console = Console(highlight=False)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    ev = _measure(checkpoint, rules, corpus, sampled, seed, train_corpus, log)
    from verify.reports.report import write_report

    vi = _verdicts(ev, checkpoint, rules, corpus, sampled)
    n = write_report(out, ev, max_tokens=max_tokens, verdicts=vi)
    console.print(f"wrote {out} ({n} tokens shown, {out.stat().st_size / 1e6:.1f} MB); {vi.note}")


def _verdicts(ev: Evaluation, checkpoint: Path, rules: Path, corpus: Path, sampled: Optional[int]):
    """The cached component verdicts per rule for the report and the catalog (verify/reports/verdicts.py)."""
    from verify.reports.verdicts import cached_verdicts

    valid, cmd = verdict_source(rules, checkpoint, corpus, sampled)
    return cached_verdicts(ev.ckpt, ev.rules, Path(rules), valid, cmd)


def catalog_cmd(rules: Path = O.RULES,
                out: Optional[Path] = O.out_option(None, "Markdown file (default: RULES/CATALOG.md; the long-tail image "
                                                         "long_tail.svg goes beside it)"),
                checkpoint: Path = O.CHECKPOINT, corpus: Path = O.CORPUS, sampled: Optional[int] = SAMPLED,
                seed: int = SEED, train_corpus: Path = O.TRAIN_CORPUS,
                json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write verify's JSON (ledger + ablation + long tail) here."),
                points: int = typer.Option(20, "--long-tail-points", help="Log-spaced prefix sizes of the long-tail curve "
                                           "(one engine pass each, per curve; 0: no curve).")):
    """Write the rule catalog (every rule: doc, numbers, KL removed by ablation), grouped as in the files, and
    the long tail: KL explained against the first n rules switched on (largest ΔKL first), for every rule
    and for the verified rules only (cached `check-components` verdicts), drawn to long_tail.svg."""
    import json
    import sys

    from rich.console import Console

    from verify.reports.catalog import catalog_markdown

    O.check_rules(rules, folder="" if out is not None else "the catalog is written to RULES/CATALOG.md, or pass --out FILE")
    if points < 0:
        raise UserError(f"--long-tail-points {points}: pass 0 (no curve) or a positive number of prefix sizes")
    path = out or Path(rules) / "CATALOG.md"
    svg = path.parent / "long_tail.svg"
    O.check_out_file(path)
    if points:
        O.check_out_file(svg, "the long-tail image (beside --out)")
    O.check_out_file(json_out, "--json-out")
    console = Console(highlight=False, stderr=True)
    log = lambda m: console.print(f"[dim]{m}[/dim]")  # noqa: E731
    ev = _measure(checkpoint, rules, corpus, sampled, seed, train_corpus, log, ablate=True)
    res = ev.to_json()
    lt = None
    if points:
        import numpy as np

        from verify.reports.longtail import long_tail, long_tail_svg

        vi = _verdicts(ev, checkpoint, rules, corpus, sampled)
        kl_uni = next(b["kl"] for b in res["baselines"] if b["name"] == "unigram")
        lt = long_tail(ev.hand, ev.rules, ev.ref, kl_uni, res["ablation"], np.array(vi.verified(ev.rules.rule_ids)),
                       k=points, verdicts_note=vi.note, log=log)
        res["long_tail"] = lt.to_json()
        res["timings"]["long tail"] = lt.seconds
        svg.write_text(long_tail_svg(lt, res["header"]["eval_set"]), encoding="utf-8")
    cmd = "handmodel catalog " + " ".join(a for a in sys.argv[2:]) if len(sys.argv) > 2 else "handmodel catalog"
    text = catalog_markdown(res, ev.rules, Path(rules), cmd.strip(), long_tail=lt, svg_name=svg.name)
    path.write_text(text, encoding="utf-8")
    if json_out is not None:
        json_out.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {path} ({len(res['ablation'])} rules, ablation in {res['timings'].get('ablation', 0):.1f} s)")
    if lt is not None:
        console.print(f"wrote {svg}: long tail, {len(lt.points)} points ({lt.passes} engine passes, {lt.seconds:.1f} s)")
        for c in ("all", "verified"):
            got = ", ".join(f"{int(100 * x.level)}%: " + ("not reached" if x.n_rules is None else
                            f"{x.n_rules:,} rules / {x.n_numbers:,} numbers") for x in lt.levels if x.curve == c)
            console.print(f"  {c}: {got}")
