"""`handmodel check-components`: every rule against the reference component it names, and the verified
ledger (verify/claims/verified.py; docs/claims.md "Component checks (verified ledger)").

Registered on the `handmodel` app in verify/cli/__init__.py. `verify` never runs these checks: it reads their
cached verdicts (rules without a current one count as unverified); this command computes the missing ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from handmodel.errors import UserError

from verify.claims.verified import DEFAULT_WINDOWS, WINDOW_LEN

from . import options as O


def run_verified(checkpoint: Optional[Path], rules: Optional[Path], corpus: Optional[Path], windows: int,
                 train_corpus: Optional[Path], compute: bool = True, log=print) -> dict:
    """Component verdicts for the rules (cached per rule; only rules without a current verdict are checked;
    with compute=False they stay unverified and the status says so), then verify's result on `corpus` with its
    `verified` section and every rule's verdict under `component_verdicts`."""
    from verify.claims import verified as VF
    from verify.ledger.evaluate import evaluate

    corpus = Path(corpus) if corpus is not None else O.DEFAULT_CORPUS
    if not corpus.exists():
        raise UserError(f"{corpus}: eval text not found; pass --corpus ../shared/corpus/tinystories/valid.txt")
    rules_dir = Path(rules) if rules is not None else O.DEFAULT_RULES
    ev = evaluate(checkpoint, rules_dir, corpus, 0, 0, train_corpus, log=log, ledger_rows=False)
    ctx = VF.valid_contexts(ev.ckpt, corpus, windows, WINDOW_LEN)
    lk = VF.lookup_verdicts(ev.ckpt, ev.rules, rules_dir, ctx, compute=compute, log=log)
    ev.verified = VF.verified_ledger(ev, rules_dir, corpus, windows, final_only=True, lookup=lk, contexts=ctx)
    res = ev.to_json()
    res["component_verdicts"] = [v.to_dict() for v in lk.verdicts]
    return res


def check_components_cmd(
    checkpoint: Path = O.CHECKPOINT,
    rules: Path = O.RULES,
    corpus: Path = O.CORPUS,
    windows: int = typer.Option(DEFAULT_WINDOWS, "--windows", help=f"Context windows of {WINDOW_LEN} tokens the checks read."),
    train_corpus: Path = O.TRAIN_CORPUS,
    json_file: Optional[Path] = typer.Option(None, "--json-out", help="Write verdicts and the verified ledger as JSON."),
    show: int = typer.Option(0, "--show", help="Also print the first K rules of each verdict."),
):
    """Check every rule against the reference component it names (readout + intervention, docs/claims.md)
    and print the verified ledger: rules whose check fails, is undecided or missing are switched off."""
    from rich.console import Console
    from rich.table import Table

    O.check_rules(rules)
    O.check_out_file(json_file, "--json-out")
    train_corpus = O.given(train_corpus, O.DEFAULT_TRAIN)
    console = Console(highlight=False)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    res = run_verified(checkpoint, rules, corpus, windows, train_corpus, log=log)
    ver = res["verified"]
    t = Table(title=f"component checks ({ver['status']}; {ver['contexts']['windows']} windows of {ver['contexts']['path']})")
    for c in ("kind", "pass", "fail", "undecided", "no component"):
        t.add_column(c, justify="right" if c != "kind" else "left")
    for kind, row in ver["counts"].items():
        t.add_row(kind, *(str(row[c]) for c in ("pass", "fail", "undecided", "no component")))
    console.print(t)
    rate = ver["kl_weighted_pass_rate"]
    f, a = ver["final"], res["final"]
    console.print(f"verified: {100 * f['explained']:.1f}% explained (all rules {100 * a['explained']:.1f}%), top-1 "
                  f"{100 * f['top1']:.1f}% (all rules {100 * a['top1']:.1f}%), {f['numbers']:,} numbers, KL {f['kl']:.4f} "
                  f"[{f['kl_lo']:.4f}, {f['kl_hi']:.4f}]; {ver['n_verified']} of {ver['n_rules']} rules verified; "
                  f"KL-weighted pass rate {'n/a' if rate is None else f'{100 * rate:.1f}%'}")
    if show:
        for verdict in ("pass", "fail", "undecided"):
            for v in [v for v in res["component_verdicts"] if v["verdict"] == verdict][:show]:
                checks = "; ".join(f"{c['name']} {c['value'] if c['value'] is None else round(c['value'], 3)} "
                                   f"[{c['lo'] if c['lo'] is None else round(c['lo'], 3)}, "
                                   f"{c['hi'] if c['hi'] is None else round(c['hi'], 3)}] {c['verdict']}" for c in v["checks"])
                console.print(f"{verdict:9s} {v['id']} ({v['component']}): {checks}")
    if json_file is not None:
        Path(json_file).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

