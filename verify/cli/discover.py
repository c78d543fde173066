"""Typer commands for rule discovery (verify/discover/), registered in verify/cli/__init__.py. Imports of
the discovery code stay inside the functions so `handmodel --help` never loads torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from verify.discover.suggest_options import DEFAULTS, HELP, OPTIONS_FILE, SuggestOptions

from . import options as O

inspect_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                          help="Read the reference: what a token, a head or a neuron does (rich tables or --json).")

TOKENS = typer.Option(16384, "--tokens", help="How many corpus tokens to run through the reference.")
K = typer.Option(10, "-k", "--top", help="Rows per table.")
MINC = typer.Option(3, "--min-count", help="Only tokens seen this often in the sample enter QK/OV tables.")


def _emit(data: dict, as_json: bool, render) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        from rich.console import Console

        render(Console(), data)


def _table(title: str, cols: list[str], rows: list[list], justify_right=()):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(title), title_justify="left")
    for c in cols:
        t.add_column(escape(c), justify="right" if c in justify_right else "left")
    for r in rows:
        t.add_row(*[escape(str(x)) for x in r])
    return t


def _fraction_pair(text: Optional[str], flag: str) -> Optional[tuple[float, float]]:
    """"0.3:0.65" -> (0.3, 0.65); None stays None (the command's default)."""
    from handmodel.errors import UserError

    if text is None:
        return None
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected START:END, two fractions of the steps, e.g. 0.3:0.65") from None
    return a, b


def _size_pair(text: str, flag: str) -> int | tuple[int, int]:
    """"500" -> 500; "1200:600" -> (1200, 600): tokens per output pattern and per read pattern."""
    from handmodel.errors import UserError

    try:
        sizes = [int(x) for x in text.split(":")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise UserError(f"{flag} {text!r}: expected N (tokens per shared pattern) or OUT:READ (tokens per output "
                        "pattern and per read pattern), e.g. 500 or 1200:600")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def _train_text(path: Path) -> str:
    from handmodel.errors import UserError

    if not Path(path).exists():
        raise UserError(f"--train-corpus {path}: not found; pass the training text (train.txt)")
    return str(path)


def _q(tok: str) -> str:
    return repr(tok)


@inspect_app.command("token")
def inspect_token_cmd(token: str = typer.Argument(..., help='Token as written in the vocabulary, e.g. " dog" (or #id).'),
                      checkpoint: Path = O.CHECKPOINT, train_corpus: Path = O.TRAIN_CORPUS, tokens: int = TOKENS, k: int = K,
                      min_count: int = MINC, as_json: bool = O.JSON):
    """Direct-path predictions after a token, heads attending from/to it, neurons it drives."""
    from reference.oracle import Oracle

    from verify.discover.common import resolve_token
    from verify.discover.inspect import inspect_token

    o = Oracle.load(checkpoint)
    d = inspect_token(o, resolve_token(o.vocab, token), _train_text(train_corpus), k=k, n_tokens=tokens, min_count=min_count)

    def render(con, d):
        from rich.markup import escape

        con.print(f"[bold]token[/] {escape(_q(d['token']))} (id {d['id']}), {d['occurrences']} occurrences in the sample")
        dp = d["direct_path"]
        rows = [[_q(b["token"]), f"{b['value']:+.2f}", f"{b['prob']:.3f}", _q(s["token"]), f"{s['value']:+.2f}"]
                for b, s in zip(dp["boosted"], dp["suppressed"])]
        con.print(_table(f"direct path ({dp['note']})", ["boosted next", "logit", "p", "suppressed next", "logit "],
                         rows, ("logit", "p", "logit ")))
        rows = []
        for h in d["heads"]:
            rows.append([h["head"], ", ".join(_q(x["token"]) for x in h["qk_top_sources"][:3]),
                         ", ".join(f"{_q(x['token'])} {x['mass']:.2f}" for x in h.get("from_top_sources", [])[:3]),
                         h.get("attends_from_to_prev", "-"), ", ".join(_q(x["token"]) for x in h["qk_top_destinations"][:3]),
                         h.get("attended_to_lift", "-")])
        con.print(_table("heads: attention FROM this token (as destination) and TO it (as source)",
                         ["head", "QK top sources", "corpus: attends to (mass)", "to prev", "QK top destinations",
                          "attended-to lift"], rows, ("to prev", "attended-to lift")))
        rows = [[n["neuron"], f"{n['token_alone_act']:.2f}", n["corpus_mean_act"] if n["corpus_mean_act"] is not None else "-",
                 ", ".join(_q(x) for x in n["boosts"])] for n in d["neurons"]]
        con.print(_table("neurons it drives", ["neuron", "act (token alone)", "mean act (corpus)", "neuron boosts"], rows,
                         ("act (token alone)", "mean act (corpus)")))

    _emit(d, as_json, render)


@inspect_app.command("head")
def inspect_head_cmd(head: int = typer.Argument(..., help="Head index."), checkpoint: Path = O.CHECKPOINT,
                     train_corpus: Path = O.TRAIN_CORPUS, tokens: int = TOKENS, k: int = K, min_count: int = MINC,
                     max_dist: int = typer.Option(16, help="Distances shown in the positional profile."),
                     as_json: bool = O.JSON):
    """Positional profile, top QK pairs, top OV effects and the skip-trigram "bugs" of one head."""
    from reference.oracle import Oracle

    from verify.discover.inspect import inspect_head

    o = Oracle.load(checkpoint)
    d = inspect_head(o, head, _train_text(train_corpus), k=k, n_tokens=tokens, min_count=min_count, max_dist=max_dist)

    def render(con, d):
        con.print(f"[bold]head {d['head']}[/]: {d['kind']} (attention to previous token {d['previous_token_score']:.2f}); "
                  f"{d['sample_tokens']} sample tokens, LNf scale {d['ln_scale']}")
        prof = d["profile"]
        rows = [[dist, f"{v:.3f}", "█" * int(round(v * 40))] for dist, v in enumerate(prof)]
        rows.append([f">{len(prof) - 1}", f"{d['profile_rest']:.3f}", "█" * int(round(d['profile_rest'] * 40))])
        con.print(_table("positional profile: mean attention by distance dst−src (sums to 1)", ["distance", "attn", ""],
                         rows, ("attn",)))
        con.print(_table("top QK pairs (score centred over sources)", ["destination", "source", "score"],
                         [[_q(r["dst"]), _q(r["src"]), f"{r['score']:+.2f}"] for r in d["qk_top_pairs"]], ("score",)))
        con.print(_table("top OV effects: attending to source ⇒ logit change (centred)",
                         ["source", "boosts", "logit", "source ", "suppresses", "logit "],
                         [[_q(a["src"]), _q(a["out"]), f"{a['logit']:+.2f}", _q(b["src"]), _q(b["out"]), f"{b['logit']:+.2f}"]
                          for a, b in zip(d["ov_top"], d["ov_bottom"])], ("logit", "logit ")))
        con.print(_table("implied skip-trigrams 'src … dst ⇒ out' (factorised: every dst × out combination is boosted)",
                         ["src", "dst", "out", "corpus count (src within 32)", "dst→out count", "bug?"],
                         [[_q(r["src"]), _q(r["dst"]), _q(r["out"]), r["with_src_count"], r["bigram_count"],
                           "BUG" if r["bug"] else ""] for r in d["skip_trigrams"]],
                         ("corpus count (src within 32)", "dst→out count")))

    _emit(d, as_json, render)


@inspect_app.command("neuron")
def inspect_neuron_cmd(neuron: int = typer.Argument(..., help="Neuron index."), checkpoint: Path = O.CHECKPOINT,
                       train_corpus: Path = O.TRAIN_CORPUS, tokens: int = TOKENS, k: int = K, min_count: int = MINC,
                       as_json: bool = O.JSON):
    """Top-activating tokens and contexts, output effect, and the loss cost of zero-ablating one neuron."""
    from reference.oracle import Oracle

    from verify.discover.inspect import inspect_neuron

    o = Oracle.load(checkpoint)
    d = inspect_neuron(o, neuron, _train_text(train_corpus), k=k, n_tokens=tokens, min_count=min_count)

    def render(con, d):
        a = d["ablation"]
        con.print(f"[bold]neuron {d['neuron']}[/]: fires on {d['fires_fraction']:.1%} of {d['sample_tokens']} sample tokens, "
                  f"mean {d['mean_act']:.3f}, max {d['max_act']:.3f}")
        con.print(f"zero-ablation: CE {a['ce']:.4f} → {a['ce_zero_ablated']:.4f} nats/token "
                  f"(cost {a['loss_cost']:+.5f}; KL(ref‖ablated) {a['kl_ref_to_ablated']:.5f})")
        con.print(_table("top-activating contexts ([current token] | next token)", ["act", "context"],
                         [[f"{r['act']:.2f}", r["context"]] for r in d["top_contexts"]], ("act",)))
        rows = [[_q(a["token"]), f"{a['mean_act']:.2f}", a["count"], _q(b["token"]), f"{b['act']:.2f}"]
                for a, b in zip(d["top_tokens"], d["top_tokens_alone"])]
        con.print(_table("top tokens", ["token (corpus)", "mean act", "count", "token (alone)", "act"], rows,
                         ("mean act", "count", "act")))
        con.print(_table("output effect (centred logits per unit activation)", ["boosts", "logit", "suppresses", "logit "],
                         [[_q(a["token"]), f"{a['value']:+.3f}", _q(b["token"]), f"{b['value']:+.3f}"]
                          for a, b in zip(d["output_boosted"], d["output_suppressed"])], ("logit", "logit ")))

    _emit(d, as_json, render)


def _opt(name: str, *flags: str):
    """A suggest flag whose default and help are SuggestOptions' (one place)."""
    return typer.Option(getattr(DEFAULTS, name), *(flags or ("--" + name.replace("_", "-"),)), help=HELP[name])


def suggest_cmd(ctx: typer.Context,
                out: Path = O.out_option(..., "folder for the draft rule files (new or empty)"),
                config: Optional[Path] = typer.Option(None, "--config", help=f"Options file ({OPTIONS_FILE}, which suggest writes "
                                                      "next to every draft): draft with its options; flags given here override it."),
                checkpoint: Path = O.CHECKPOINT,
                train_corpus: Path = O.TRAIN_CORPUS,
                budget: int = _opt("budget"), classes: int = _opt("classes"), class_k: int = _opt("class_k"),
                k_max: int = _opt("k_max"), heads: bool = _opt("heads", "--heads/--no-heads"),
                sources: int = _opt("sources"), k_out: int = _opt("k_out"), scores: int = _opt("scores"),
                positions: int = _opt("positions"), rounds: int = _opt("rounds"), min_count: int = _opt("min_count"),
                neurons: int = _opt("neurons"), copy: bool = _opt("copy", "--copy/--no-copy"),
                target: Optional[Path] = _opt("target"), joint_steps: int = _opt("joint_steps"),
                joint_positions: int = _opt("joint_positions"), query_scores: int = _opt("query_scores"),
                neuron_classes: int = _opt("neuron_classes"), prune_cuts: int = _opt("prune_cuts"),
                prune_window: Optional[str] = _opt("prune_window"),
                shared_out: int = _opt("shared_out"), shared_read: int = _opt("shared_read"),
                shared_size: str = typer.Option(str(DEFAULTS.shared_size), "--shared-size", help=HELP["shared_size"]),
                shared_refs: int = _opt("shared_refs"), faithful: float = _opt("faithful"),
                as_json: bool = O.JSON):
    """Draft a whole ruleset from the reference for a person to edit: unigram prior, token classes,
    class and per-token bigram rows, and per head a \\[\\[head]] (fitted to its attention) with \\[\\[head_out]]
    rules (fitted by moment matching). Each rule has an id, a provisional doc and a provenance comment.
    The options it ran with are written to OUT/suggest.conf: `--config` that file to draft the same again."""
    import sys

    from handmodel.errors import UserError
    from reference.oracle import Oracle
    from verify.discover.suggest import suggest

    O.check_out_dir(out)
    corpus = _train_text(train_corpus)
    if target is not None:
        O.check_rules(target)
    base = SuggestOptions.load(config) if config is not None else DEFAULTS
    given = {"budget": budget, "classes": classes, "class_k": class_k, "k_max": k_max, "heads": heads, "sources": sources,
             "k_out": k_out, "scores": scores, "positions": positions, "rounds": rounds, "min_count": min_count,
             "neurons": neurons, "copy": copy, "target": None if target is None else str(target),
             "joint_steps": joint_steps, "joint_positions": joint_positions, "query_scores": query_scores,
             "neuron_classes": neuron_classes, "prune_cuts": prune_cuts,
             "prune_window": _fraction_pair(prune_window, "--prune-window"), "shared_out": shared_out,
             "shared_read": shared_read, "shared_size": _size_pair(shared_size, "--shared-size"), "shared_refs": shared_refs,
             "faithful": faithful}
    # with --config, only the flags typed on this command line override the file
    # (compared by name: typer ships its own copy of click's ParameterSource)
    typed = {k: v for k, v in given.items()
             if config is None or getattr(ctx.get_parameter_source(k), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
    opts = base.replace(**typed)
    if opts.target is not None and config is not None and "target" not in typed and not Path(opts.target).exists():
        raise UserError(f"{config}: target = {opts.target!r} not found; pass --target DIR")
    o = Oracle.load(checkpoint)
    log = (lambda m: None) if as_json else (lambda m: typer.echo(m, err=True))
    d = suggest(o, out, Path(corpus), opts, log=log, command="handmodel " + " ".join(sys.argv[1:]))

    def render(con, d):
        con.print(f"wrote {out}: {d['rules']} rules, {d['numbers']:,} numbers, {d['classes']} classes in {d['seconds']} s")
        if d.get("history"):
            con.print(_table("training-sample KL(ref ‖ hand) by stage", ["stage", "KL"],
                             [[h["stage"], f"{h['train_kl']:.4f}"] for h in d["history"]], ("KL",)))
        con.print(f"options: {d['options']}")
        con.print(f"next: handmodel verify --rules {out}")

    _emit(d, as_json, render)

def fit_cmd(rules: Path = O.RULES,
            only: Optional[List[str]] = typer.Option(None, "--only", help="Fit only these rule ids (repeat, or comma-separate)."),
            checkpoint: Path = O.CHECKPOINT,
            train_corpus: Path = O.TRAIN_CORPUS,
            tokens: int = typer.Option(4096, "--tokens", help="Training positions used (memory grows with tokens × vocabulary)."),
            steps: int = typer.Option(30, "--steps", help="L-BFGS iterations (each lowers the KL or fit stops)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Report the KL change without writing the files."),
            as_json: bool = O.JSON):
    """Calibrate the numbers of hand-written rule files to minimise KL(p_ref ‖ p_hand) on training text.

    The numbers of --rules are rewritten in place. Structure is never added or removed; comments, order and
    formatting of the files are kept. A \\[\\[weights]] set's own weights are not fitted (they stay as written): the numbers of the rules referencing it are."""
    from reference.oracle import Oracle

    from verify.discover.fit import fit_rules

    O.check_rules(rules)
    corpus = _train_text(train_corpus)
    o = Oracle.load(checkpoint)  # fit_rules refuses held-out text itself (check_training_text)
    d = fit_rules(rules, o, corpus, tokens=tokens, steps=steps, only=only, dry_run=dry_run, progress=not as_json)

    def render(con, d):
        con.print(f"fitted {d['numbers_fitted']} of {d['numbers_total']} numbers on {d['positions']} training positions "
                  f"in {d['seconds']} s ({len(d['history']) - 1} L-BFGS steps)")
        con.print(f"KL(ref ‖ hand): [bold]{d['kl_before']:.5f} → {d['kl_after']:.5f}[/] nats/token")
        big = sorted(d["changes"], key=lambda c: -abs(c["after"] - c["before"]))[:10]
        con.print(_table("largest changes", ["rule", "number", "before", "after"],
                         [[c["rule"], c["key"], f"{c['before']:+.3f}", f"{c['after']:+.3f}"] for c in big], ("before", "after")))
        con.print("dry run: nothing written" if d["dry_run"] else
                  ("wrote " + ", ".join(d["written"]) if d["written"] else "no number changed"))

    _emit(d, as_json, render)
