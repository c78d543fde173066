"""Rich tables: one run's results, and `compare A.json B.json` (B / A per metric)."""
from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from .results import SECTIONS, all_metrics


def fmt(v: float, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if unit == "tok/s":
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "bytes":
        return f"{v / 2**20:,.1f} MiB" if v >= 2**20 else f"{v / 1024:,.1f} KiB"
    if unit == "x":
        return f"{v:.2f}x" if v < 100 else f"{v:,.0f}x"
    if unit == "slope":
        return f"{v:+.2f}"
    return f"{v:,.4g}"


def _iqr(m: dict) -> str:
    return "" if m["n"] <= 1 else f"{fmt(m['q1'], m['unit'])} – {fmt(m['q3'], m['unit'])}"


def _minmax(m: dict) -> str:
    return "" if m["n"] <= 1 else f"{fmt(m['min'], m['unit'])} – {fmt(m['max'], m['unit'])}"


def _target_ok(m: dict) -> str:
    t = m.get("target")
    if not t:
        return ""
    v = m["median"]
    try:
        if t.startswith(">="):
            goal = float(t[2:].strip().rstrip("xs ").strip())
            return f"{t} [green]ok[/]" if v >= goal else f"{t} [red]below[/]"
        if t.startswith("<="):
            goal = float(t[2:].strip().rstrip("xs ").strip())
            return f"{t} [green]ok[/]" if v <= goal else f"{t} [red]above[/]"
    except ValueError:
        pass
    return t


def render(res: dict, console: Console | None = None) -> None:
    con = console or Console(highlight=False)
    mi = res.get("machine", {})
    wl = res.get("workload", {})
    t = Table(title=f"handmodel benchmarks{' (--quick)' if res.get('quick') else ''}: hand model vs reference",
              caption=(f"{mi.get('cpu_model')} · {mi.get('cores_usable')} cores · load {mi.get('loadavg_start')}→"
                       f"{mi.get('loadavg_end')} · python {mi.get('python')} numpy {mi.get('numpy')} numba "
                       f"{mi.get('numba')} torch {mi.get('torch')} · git {str(mi.get('git_commit'))[:10]}"
                       f"{' (dirty)' if mi.get('git_dirty') else ''} · {res.get('elapsed_s', 0):.0f} s"),
              show_lines=False)
    t.add_column("metric")
    t.add_column("median", justify="right")
    t.add_column("IQR", justify="right")
    t.add_column("min – max", justify="right")
    t.add_column("n", justify="right")
    t.add_column("target / note")
    for why in mi.get("under_load") or []:
        con.print(f"[bold red]MEASURED UNDER LOAD[/]: {why}")
    for name, sec in res["sections"].items():
        t.add_row(f"[bold]{sec.get('title', SECTIONS.get(name, name))}[/]", "", "", "", "", "")
        for m in sec["metrics"]:
            note = _target_ok(m) or m.get("note", "")
            if m.get("target") and m.get("note"):
                note += f" · {m['note']}"
            t.add_row("  " + m["label"], fmt(m["median"], m["unit"]), _iqr(m), _minmax(m), str(m["n"]), note)
    con.print(f"[bold]workload[/]: {wl.get('checkpoint')} (V={wl.get('vocab_size')}, n_ctx={wl.get('n_ctx')}, "
              f"{wl.get('params', 0):,} params) · {wl.get('tokens', 0):,} tokens of {wl.get('corpus')} · "
              f"rules: {wl.get('rules_source')} ({wl.get('n_rules')} rules)")
    con.print(t)
    for name, sec in res["sections"].items():
        for n in sec.get("notes", []):
            con.print(f"[dim]{name}: {n}[/]")


def compare(a: dict, b: dict, console: Console | None = None, a_name: str = "A", b_name: str = "B") -> list[dict]:
    """Per metric present in both: B / A of the medians; 'better' from the metric's direction."""
    con = console or Console(highlight=False)
    am = {m["id"]: m for m in all_metrics(a)}
    bm = {m["id"]: m for m in all_metrics(b)}
    t = Table(title=f"benchmark comparison: {b_name} / {a_name}")
    for c in ("metric", a_name, b_name, "B/A", ""):
        t.add_column(c, justify="left" if c in ("metric", "") else "right")
    rows = []
    for mid, ma in am.items():
        mb = bm.get(mid)
        if mb is None:
            continue
        va, vb = ma["median"], mb["median"]
        r = vb / va if va not in (0, None) and vb is not None else float("nan")
        verdict = ""
        if math.isfinite(r) and ma["unit"] != "slope":
            if ma["better"] == "higher":
                verdict = "better" if r > 1.05 else "worse" if r < 0.95 else "same"
            elif ma["better"] == "lower":
                verdict = "better" if r < 0.95 else "worse" if r > 1.05 else "same"
        rows.append({"id": mid, "a": va, "b": vb, "ratio": r, "verdict": verdict})
        colour = {"better": "green", "worse": "red"}.get(verdict, "dim")
        t.add_row(mid, fmt(va, ma["unit"]), fmt(vb, mb["unit"]), f"{r:.3f}" if math.isfinite(r) else "-",
                  f"[{colour}]{verdict}[/]" if verdict else "")
    only = sorted(set(am) ^ set(bm))
    wa, wb = a.get("workload", {}), b.get("workload", {})
    diff = [k for k in ("checkpoint_hash", "tokens", "n_rules", "rules_source") if wa.get(k) != wb.get(k)]
    if a.get("quick") != b.get("quick"):
        diff.append("quick")
    con.print(t)
    if diff:
        con.print(f"[yellow]note[/]: the two runs differ in {', '.join(diff)}: ratios compare different workloads")
    if only:
        con.print(f"[dim]in one file only: {', '.join(only)}[/]")
    return rows
