"""The `handmodel` command. It lives in verify/ because verify is the one package allowed to reach both
the reference (torch) and the hand model; each subcommand imports only what it needs, so commands
that never touch torch (verify with a warm cache) never pay torch's import time. The options several
commands share (--rules, --checkpoint, --corpus, --train-corpus, --out) are defined once, in options.py.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from handmodel.errors import UserError

from . import options as O

DEFAULT_RUN = O.project_path("runs", "default")

app = typer.Typer(add_completion=False, rich_markup_mode="rich", no_args_is_help=True,
                  help="Reverse-engineer a one-layer transformer with hand-written rules, and measure what is explained.")


@app.callback()
def _root():
    """Reverse-engineer a one-layer transformer with hand-written rules, and measure what is explained."""


@app.command()
def train(
    out: Path = O.out_option(DEFAULT_RUN, "folder (checkpoint + training state)"),
    train_corpus: Path = O.TRAIN_CORPUS,
    corpus: Path = O.CORPUS,
    tokenizer: Optional[Path] = typer.Option(None, help="Reuse this tokenizer.json instead of training one."),
    vocab_size: int = typer.Option(4096, help="BPE vocabulary size when training a tokenizer."),
    n_ctx: int = typer.Option(256, help="Context length."),
    d_model: int = typer.Option(256, help="Residual width."),
    n_heads: int = typer.Option(4, help="Attention heads."),
    d_mlp: int = typer.Option(1024, help="MLP neurons."),
    steps: int = typer.Option(2000, help="Optimizer steps."),
    batch_size: int = typer.Option(16, help="Global batch (sequences); split across torchrun processes."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    warmup: int = typer.Option(100, help="Linear warmup steps."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay on matrices."),
    grad_clip: float = typer.Option(1.0, help="Gradient norm clip."),
    eval_every: int = typer.Option(200, help="Evaluate on the held-out text every N steps."),
    ckpt_every: int = typer.Option(500, help="Write a checkpoint every N steps."),
    seed: int = typer.Option(0, help="Seed for weights and batches (same command, same model)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    threads: int = typer.Option(0, help="Torch threads per process (0: torch's default)."),
    resume: bool = typer.Option(True, help="Continue an interrupted run found in --out."),
    progress: bool = typer.Option(True, help="Rich progress bar (off: one JSON line per eval)."),
):
    """Train a one-layer reference transformer. Under `torchrun --nproc-per-node N` it trains data-parallel.
    --train-corpus may also be 'tinystories' (the HF hub). The held-out loss is measured on --corpus; left at its
    default while --train-corpus is not, on the valid.txt beside --train-corpus (the hub's for 'tinystories')."""
    if out != DEFAULT_RUN:  # the default lives in the project's runs/, made by train
        O.check_out_dir(out)
    if str(train_corpus) != "tinystories" and not train_corpus.exists():
        raise UserError(f"{train_corpus}: no such file or folder; check the --train-corpus path")
    from reference.model import ModelConfig
    from reference.train import TrainConfig, train as run

    # --corpus at its default: TrainConfig's own rule (valid.txt beside the training text, which for the default
    # --train-corpus is the default --corpus; absent: no held-out loss)
    cfg = TrainConfig(corpus=str(train_corpus), valid=None if corpus == O.DEFAULT_CORPUS else str(corpus), out=str(out), tokenizer=str(tokenizer) if tokenizer else None,
                      vocab_size=vocab_size, model=ModelConfig(n_ctx=n_ctx, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp),
                      steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                      grad_clip=grad_clip, eval_every=eval_every, ckpt_every=ckpt_every, seed=seed, device=device,
                      threads=threads)
    card = run(cfg, resume=resume, progress=progress)
    typer.echo(f"saved {out}: train loss {card['train_loss']}, valid loss {card.get('valid_loss_full', card['valid_loss'])}")


@app.command()
def info(checkpoint: Path = O.CHECKPOINT,
         prompt: str = typer.Option("Once upon a time", help="Prompt for the sample continuation."),
         seed: int = typer.Option(0, help="Sampling seed.")):
    """Print the model card of a checkpoint and a sample continuation."""
    from rich.console import Console
    from rich.markdown import Markdown

    from reference.oracle import Oracle

    o = Oracle.load(checkpoint)
    con = Console()
    card = (o.path / "card.md").read_text() if (o.path / "card.md").exists() else "(no model card)"
    con.print(Markdown(card))
    con.print(f"[bold]checkpoint[/] {o.path}  [bold]hash[/] {o.hash}  [bold]params[/] {o.model.n_params():,}")
    con.print(f"[bold]sample[/] (top-k 40, seed {seed}): {o.sample(prompt, max_new=80, top_k=40, seed=seed)}")


@app.command()
def sample(prompt: str = typer.Option("Once upon a time", help="Text to continue."),
           checkpoint: Path = O.CHECKPOINT,
           max_new: int = typer.Option(200, help="Most tokens to generate (stops at <|endoftext|>)."),
           temperature: float = typer.Option(1.0, help="Softmax temperature; 0 = greedy."),
           top_k: int = typer.Option(0, help="Sample from the k most likely tokens only (0 = all)."),
           seed: int = typer.Option(0, help="Sampling seed (same seed, same text)."),
           n: int = typer.Option(1, help="How many samples (seeds seed, seed+1, ...).")):
    """Generate text from the reference model."""
    from reference.oracle import Oracle

    o = Oracle.load(checkpoint)
    for i in range(n):
        typer.echo(o.sample(prompt, max_new=max_new, temperature=temperature, top_k=top_k, seed=seed + i))
        if i + 1 < n:
            typer.echo("---")


@app.command()
def baselines(train_corpus: Path = O.TRAIN_CORPUS, corpus: Path = O.CORPUS, checkpoint: Path = O.CHECKPOINT,
              json_out: bool = O.JSON):
    """Count n-gram yardsticks: unigram, bigram, interpolated trigram cross-entropy on --corpus, counted on
    --train-corpus (the tokenizer is --checkpoint's)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from reference.baselines import ngram_baselines
    from reference.corpus import read_stories, token_stream
    from reference.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint / "tokenizer.json")
    tr = token_stream(tok, read_stories(str(train_corpus)))
    va = token_stream(tok, read_stories(str(corpus)))
    res = ngram_baselines(tr, va, tok.get_vocab_size())
    if json_out:
        typer.echo(json.dumps({"train_tokens": len(tr), "valid_tokens": len(va),
                               "results": [r.__dict__ for r in res]}, indent=2))
        return
    t = Table(title=f"count n-gram baselines: {len(tr):,} train tokens → {len(va):,} held-out tokens")
    t.add_column("model"), t.add_column("CE (nats/token)", justify="right"), t.add_column("interpolation weights (l3, l2, l1, l0)")
    for r in res:
        t.add_row(r.name, f"{r.ce:.3f}", ", ".join(f"{x:.3f}" for x in r.lambdas))
    Console().print(t)


# -- verify / report / catalog (ledger.py; its module imports are light, heavy ones stay inside) ---
from verify.cli.ledger import catalog_cmd, report_cmd, verify_cmd  # noqa: E402

app.command("verify")(verify_cmd)
app.command("report")(report_cmd)
app.command("catalog")(catalog_cmd)


# -- rule discovery: inspect / suggest / fit (discover.py; heavy imports stay inside) ---
from verify.cli.discover import fit_cmd, inspect_app, suggest_cmd  # noqa: E402

app.add_typer(inspect_app, name="inspect")
app.command("suggest")(suggest_cmd)
app.command("fit")(fit_cmd)

# -- check-rules: property-test each rule against the reference (check_rules.py) ---
from verify.cli.check_rules import check_rules_cmd  # noqa: E402

app.command("check-rules")(check_rules_cmd)
from verify.cli.interop import register as _register_interop  # noqa: E402  (import / export)
_register_interop(app)
from verify.cli.components import check_components_cmd  # noqa: E402  (component checks, issue 20)
app.command("check-components")(check_components_cmd)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        # the compiled-ruleset cache writes on a thread while the command goes on: done before main returns, so
        # an in-process caller (a test, a notebook) finds the cache whole; a process would wait at exit anyway
        if "handmodel.rulecache" in sys.modules:
            sys.modules["handmodel.rulecache"].flush()


def _main(argv: list[str] | None) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here instead of exiting
    except UserError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        return 2
    except typer.Abort:
        return 130
    except Exception as e:  # usage errors from typer's click: they know how to show themselves
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return e.exit_code
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
