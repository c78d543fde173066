"""Typer commands for rule discovery, registered in verify/cli.py. Imports stay inside the functions so
`handmodel --help` never loads torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

DEFAULT_CORPUS = "../shared/corpus/tinystories/train.txt"  # same as common.DEFAULT_CORPUS (kept here: no numpy at import)

inspect_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                          help="Read the reference: what a token, a head or a neuron does (rich tables or --json).")

CKPT = typer.Option(None, "--checkpoint", help="Checkpoint folder (default: the shipped model in reference/default).")
CORPUS = typer.Option(DEFAULT_CORPUS, "--corpus", help="Text sampled for statistics (only its start is read).")
TOKENS = typer.Option(16384, "--tokens", help="How many corpus tokens to run through the reference.")
K = typer.Option(10, "-k", "--top", help="Rows per table.")
JSON = typer.Option(False, "--json", help="Print JSON instead of tables.")
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


def _q(tok: str) -> str:
    return repr(tok)


@inspect_app.command("token")
def inspect_token_cmd(token: str = typer.Argument(..., help='Token as written in the vocabulary, e.g. " dog" (or #id).'),
                      checkpoint: Optional[Path] = CKPT, corpus: str = CORPUS, tokens: int = TOKENS, k: int = K,
                      min_count: int = MINC, as_json: bool = JSON):
    """Direct-path predictions after a token, heads attending from/to it, neurons it drives."""
    from reference.oracle import Oracle

    from verify.discover.common import resolve_token
    from verify.discover.inspect import inspect_token

    o = Oracle.load(checkpoint)
    d = inspect_token(o, resolve_token(o.vocab, token), corpus, k=k, n_tokens=tokens, min_count=min_count)

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
def inspect_head_cmd(head: int = typer.Argument(..., help="Head index."), checkpoint: Optional[Path] = CKPT,
                     corpus: str = CORPUS, tokens: int = TOKENS, k: int = K, min_count: int = MINC,
                     max_dist: int = typer.Option(16, help="Distances shown in the positional profile."),
                     as_json: bool = JSON):
    """Positional profile, top QK pairs, top OV effects and the skip-trigram "bugs" of one head."""
    from reference.oracle import Oracle

    from verify.discover.inspect import inspect_head

    o = Oracle.load(checkpoint)
    d = inspect_head(o, head, corpus, k=k, n_tokens=tokens, min_count=min_count, max_dist=max_dist)

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
def inspect_neuron_cmd(neuron: int = typer.Argument(..., help="Neuron index."), checkpoint: Optional[Path] = CKPT,
                       corpus: str = CORPUS, tokens: int = TOKENS, k: int = K, min_count: int = MINC,
                       as_json: bool = JSON):
    """Top-activating tokens and contexts, output effect, and the loss cost of zero-ablating one neuron."""
    from reference.oracle import Oracle

    from verify.discover.inspect import inspect_neuron

    o = Oracle.load(checkpoint)
    d = inspect_neuron(o, neuron, corpus, k=k, n_tokens=tokens, min_count=min_count)

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


def suggest_cmd(out: Path = typer.Argument(..., help="Folder to write the draft rule files into (new or empty)."),
                checkpoint: Optional[Path] = CKPT,
                corpus: str = typer.Option(DEFAULT_CORPUS, "--corpus", help="TRAINING text the numbers are fitted on (never valid.txt)."),
                budget: int = typer.Option(90_000, "--budget", help="Numbers for per-token bigram exceptions (rows of frequent tokens get more)."),
                classes: int = typer.Option(64, "--classes", help="Token classes proposed by clustering next-token rows (0: none)."),
                class_k: int = typer.Option(96, "--class-k", help="Entries per class-level bigram row."),
                k_max: int = typer.Option(256, "--k-max", help="Most entries in one token's bigram row."),
                heads: bool = typer.Option(True, "--heads/--no-heads", help="Draft \\[\\[head]] + \\[\\[head_out]] rules for every reference head."),
                n_src: int = typer.Option(300, "--sources", help="Source tokens per head that get a \\[\\[head_out]] rule (most attended first)."),
                k_out: int = typer.Option(24, "--k-out", help="Entries per \\[\\[head_out]] row."),
                n_scores: int = typer.Option(400, "--scores", help="Source-token attention scores per head."),
                positions: int = typer.Option(32_768, "--positions", help="Training positions used to fit heads (memory ~ 8 bytes x positions x vocabulary)."),
                rounds: int = typer.Option(4, "--rounds", help="Moment-matching rounds for \\[\\[head_out]] rows."),
                min_count: int = typer.Option(20, "--min-count", help="Tokens rarer than this in the training text get no class/score/source."),
                neurons: int = typer.Option(32, "--neurons", help="\\[\\[neuron]] rules for the most context-dependent reference neurons."),
                copy: bool = typer.Option(True, "--copy/--no-copy", help="Draft one copying rule per head (a story word attended to becomes likelier)."),
                target: Optional[Path] = typer.Option(None, "--target", help="Existing rules: spend the numbers where they leave the most KL (worst positions first)."),
                joint_steps: int = typer.Option(0, "--joint-steps", help="After moment matching, fit every number (neurons included) jointly by gradient descent for this many steps (jointfit.py; ~2.3 s a step on the shipped model)."),
                joint_positions: int = typer.Option(262_144, "--joint-positions", help="Training positions the joint fit streams over (reference recomputed per batch)."),
                query_scores: int = typer.Option(400, "--query-scores", help="Joint fit: query-dependent attention entries { now = @class, src = @class } kept per head (0: none)."),
                neuron_classes: int = typer.Option(0, "--neuron-classes", help="Joint fit: class-level entries per neuron and kind (current-token class in `now`, attention mass on a class in `attend`, a whole class in `next`), fitted dense over the classes then cut to this many of each (0: none)."),
                prune_cuts: int = typer.Option(4, "--prune-cuts", help="Joint fit: prune the query and neuron-class entries in this many cuts between 1/8 and 2/5 of the steps (see --prune-window), kept counts falling cubically to the final sizes (1: one cut at a third)."),
                prune_window: Optional[str] = typer.Option(None, "--prune-window", help="Joint fit: START:END, the fractions of the steps between which the cuts fall (default 0.125:0.4; a later start keeps the fit dense longer)."),
                shared_out: int = typer.Option(0, "--shared-out", help="Joint fit: output patterns (\\[\\[weights]] tables) the neurons share: a neuron adds x × pattern to the logits (0: none; needs --neurons, --shared-size, --shared-refs)."),
                shared_read: int = typer.Option(0, "--shared-read", help="Joint fit: read patterns per head the neurons share: a neuron's input gains x × the head's attention weighted by the pattern (0: none)."),
                shared_size: str = typer.Option("0", "--shared-size", help="Joint fit: tokens kept per shared pattern (fitted dense over the vocabulary, then cut like the class entries); OUT:READ keeps OUT per output pattern and READ per read pattern."),
                shared_refs: int = typer.Option(0, "--shared-refs", help="Joint fit: pattern references kept per neuron and kind (output patterns; read patterns over all heads)."),
                as_json: bool = JSON):
    """Draft a whole ruleset from the reference for a person to edit: unigram prior, token classes,
    class and per-token bigram rows, and per head a \\[\\[head]] (fitted to its attention) with \\[\\[head_out]]
    rules (fitted by moment matching). Each rule has an id, a provisional doc and a provenance comment."""
    from handmodel.errors import UserError
    from reference.oracle import Oracle

    from verify.discover.suggest import suggest

    if not Path(corpus).exists():
        raise UserError(f"--corpus {corpus}: not found; pass the training text (train.txt)")
    o = Oracle.load(checkpoint)
    log = (lambda m: None) if as_json else (lambda m: typer.echo(m, err=True))
    d = suggest(o, out, Path(corpus), budget=budget, n_classes=classes, class_k=class_k, k_max=k_max, with_heads=heads,
                n_src=n_src, k_out=k_out, n_scores=n_scores, positions=positions, rounds=rounds, min_count=min_count,
                n_neurons=neurons, target=target, copy=copy, joint_steps=joint_steps, joint_positions=joint_positions,
                n_query=query_scores, neuron_classes=neuron_classes, prune_cuts=prune_cuts,
                prune_window=_fraction_pair(prune_window, "--prune-window"),
                shared=(shared_out, shared_read, _size_pair(shared_size, "--shared-size"), shared_refs), log=log)

    def render(con, d):
        con.print(f"wrote {out}: {d['rules']} rules, {d['numbers']:,} numbers, {d['classes']} classes in {d['seconds']} s")
        if d.get("history"):
            con.print(_table("training-sample KL(ref ‖ hand) by stage", ["stage", "KL"],
                             [[h["stage"], f"{h['train_kl']:.4f}"] for h in d["history"]], ("KL",)))
        con.print(f"next: handmodel verify --rules {out}")

    _emit(d, as_json, render)


def fit_cmd(rules: Path = typer.Argument(..., help="Rule folder (every *.toml) or one .toml file: numbers are rewritten in place."),
            only: Optional[List[str]] = typer.Option(None, "--only", help="Fit only these rule ids (repeat, or comma-separate)."),
            checkpoint: Optional[Path] = CKPT,
            corpus: str = typer.Option(DEFAULT_CORPUS, "--corpus", help="TRAINING text to fit on (never valid.txt)."),
            tokens: int = typer.Option(4096, "--tokens", help="Training positions used (memory grows with tokens × vocabulary)."),
            steps: int = typer.Option(30, "--steps", help="L-BFGS iterations (each lowers the KL or fit stops)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Report the KL change without writing the files."),
            as_json: bool = JSON):
    """Calibrate the numbers of hand-written rule files to minimise KL(p_ref ‖ p_hand) on training text.

    Structure is never added or removed; comments, order and formatting of the files are kept. A [[weights]]
    set's own weights are not fitted (they stay as written): the numbers of the rules referencing it are."""
    from reference.oracle import Oracle

    from verify.discover.fit import fit_rules

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
