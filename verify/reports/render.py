"""Rich tables for `handmodel verify` (drawn from the dict that --json prints)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _f(x, fmt=".4f", none="-"):
    return none if x is None else format(x, fmt)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _tok(s: str | None) -> str:
    return "∅" if s is None else repr(s)[1:-1]


WIDE = 120  # below this many columns (an 80-column terminal, a CI log) the metric tables drop to NARROW


def metric_table(title: str, rows: list[dict], ledger: bool, wide: bool = True) -> Table:
    """Every column when wide; else row, KL, 95% CI, explained, top-1 and (ledger) numbers, which fit 80
    columns: CE_hand, CE_ref and the unexplained loss are in --json and --wide."""
    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("row" if ledger else "baseline", overflow="fold")
    t.add_column("KL", justify="right", no_wrap=True)
    t.add_column("95% CI", justify="right", no_wrap=True)
    if wide:
        t.add_column("CE_hand", justify="right")
        t.add_column("CE_ref", justify="right")
        t.add_column("unexpl.", justify="right")
    t.add_column("explained" if wide else "expl.", justify="right", no_wrap=True)
    t.add_column("top-1", justify="right", no_wrap=True)
    if ledger:
        if wide:
            t.add_column("rules", justify="right")
        t.add_column("numbers", justify="right", no_wrap=True)
    for r in rows:
        cells = [r["name"], _f(r["kl"]), f"[{r['kl_lo']:.4f}, {r['kl_hi']:.4f}]"]
        if wide:
            cells += [_f(r["ce_hand"]), _f(r["ce_ref"]), _f(r["unexplained"], "+.4f")]
        cells += [_pct(r["explained"]), _pct(r["top1"])]
        if ledger:
            cells += [str(r["rules"]), str(r["numbers"])] if wide else [str(r["numbers"])]
        t.add_row(*cells)
    return t


def render(console: Console, res: dict, wide: bool = False) -> None:
    """`wide` (or a console of WIDE columns or more): the full metric tables."""
    wide = wide or console.width >= WIDE
    h = res["header"]
    console.print(f"[bold]eval set[/bold]   {h['eval_set']}")
    split = f"; {h['n_split']} sequences longer than n_ctx={h['n_ctx']} split into chunks" if h["n_split"] else ""
    console.print(f"[bold]tokens[/bold]     {h['n_tokens']:,} positions in {h['n_sequences']} sequences{split}")
    console.print(f"[bold]checkpoint[/bold] {h['checkpoint']} (hash {h['checkpoint_hash']})")
    console.print(f"[bold]rules[/bold]      {h['rules']} ({h['n_rules']} rules in {h['n_groups']} groups)")
    console.print(f"[bold]baselines[/bold]  fitted on {h['train_text']}")
    console.print(metric_table("Baselines (KL(p_ref ‖ q), nats/token)", res["baselines"], ledger=False, wide=wide))
    console.print(metric_table("Ledger: rule groups added cumulatively", res["ledger"], ledger=True, wide=wide))
    if "verified" in res and len(res["verified"]["ledger"]) > 1:
        console.print(metric_table("Verified ledger: the same groups, every rule whose component check does not pass "
                                   "switched off", res["verified"]["ledger"], ledger=True, wide=wide))
    if "ablation" in res:
        t = Table(title="Ablation: KL increase with only that rule off (largest first)", title_justify="left")
        for c in ("rule", "group", "ΔKL", "KL without", ""):
            t.add_column(c, justify="right" if c in ("ΔKL", "KL without") else "left")
        for a in res["ablation"]:
            flag = "[bold red]removal improves KL[/bold red]" if a["hurts"] else ""
            t.add_row(a["rule"], a["group"], f"{a['delta']:+.5f}", f"{a['kl_without']:.4f}", flag)
        console.print(t)
    if "worst" in res:
        t = Table(title=f"Worst {len(res['worst'])} positions (largest KL)", title_justify="left", show_lines=True)
        for c in ("KL", "context ⟶ next", "reference top-5", "hand top-5"):
            t.add_column(c)
        for w in res["worst"]:
            ctx = Text(_tok(w["context"]))
            ctx.append(" ⟶ ", style="dim")
            ctx.append(_tok(w["next"]), style="bold")
            fmt = lambda top: "\n".join(f"{e['p']:.3f} {_tok(e['token'])}" for e in top)  # noqa: E731
            t.add_row(f"{w['kl']:.3f}", ctx, fmt(w["ref_top5"]), fmt(w["hand_top5"]))
        console.print(t)
        for key, title in (("gap_by_current", "current token"), ("gap_by_next", "true next token")):
            t = Table(title=f"Gap by {title} (summed KL over positions)", title_justify="left")
            for c in ("token", "total KL", "share", "count", "mean KL"):
                t.add_column(c, justify="left" if c == "token" else "right")
            for g in res[key]:
                t.add_row(_tok(g["token"]), f"{g['total']:.1f}", _pct(g["share"]), str(g["count"]), f"{g['mean']:.3f}")
            console.print(t)
    p = res.get("float16_precision") or {}
    f = res["final"]
    console.print(f"[bold]final[/bold] KL {f['kl']:.4f} nats/token [{f['kl_lo']:.4f}, {f['kl_hi']:.4f}], "
                  f"explained {_pct(f['explained'])}, unexplained loss {f['unexplained']:+.4f}, top-1 {_pct(f['top1'])}")
    if "verified" in res:
        v = res["verified"]
        fv, rate = v["final"], v["kl_weighted_pass_rate"]
        console.print(f"[bold]verified[/bold] KL {fv['kl']:.4f} [{fv['kl_lo']:.4f}, {fv['kl_hi']:.4f}], explained "
                      f"{_pct(fv['explained'])}, top-1 {_pct(fv['top1'])}, {v['n_verified']:,} of {v['n_rules']:,} rules "
                      f"({fv['numbers']:,} numbers); KL-weighted pass rate {'n/a' if rate is None else _pct(rate)}")
        style = "" if v["status"] in ("cached", "computed") else "[yellow]"
        console.print(f"{style}component verdicts: {v['note']}{'[/yellow]' if style else ''}")
    prec = (f"; float16 cache KL error ≤ {max(p.get('kl_err_vs_eval_mean', 0), p.get('kl_err_vs_tempered', 0)):.1e} "
            f"nats/token (measured on {p.get('positions', 0)} positions)") if p else ""
    tim = ", ".join(f"{k} {v:.2f}s" for k, v in res["timings"].items())
    console.print(f"[dim]wall time {res['wall_seconds']:.2f}s ({tim}){prec}[/dim]")
