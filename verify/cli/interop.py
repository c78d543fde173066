"""`handmodel import` and `handmodel export --to transformer-lens`: bring a one-layer model in, take ours out.

Registered on the app by verify/cli/__init__.py with `register(app)`. The converters live in reference/interop.py;
transformers / transformer-lens are optional (`pip install handmodel[interop]`) and imported only here when used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from handmodel.errors import UserError

from . import options as O


def import_cmd(
    source: str = typer.Argument(..., help="A TransformerLens folder (config.json + property-format weights), a Hugging "
                                           "Face GPT-2/GPT-Neo folder, or hf:owner/name (needs the network)."),
    out: Path = O.out_option(..., "checkpoint folder to create (then pass it as --checkpoint)"),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json to use when the source folder has none."),
    check: bool = typer.Option(True, help="Compare the imported model's log-probs with the source library's forward."),
):
    """Import a one-layer TransformerLens or Hugging Face model as a handmodel checkpoint (weights unprocessed)."""
    from reference.checkpoint import load_checkpoint
    from reference.interop import max_logprob_gap, read_any, write_ours

    O.check_out_dir(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: folder exists and is not empty; pick a new --out")
    conv = read_any(source, tokenizer)
    gap = None
    if check and conv.peer is not None:
        gap = max_logprob_gap(conv, _as_model(conv))
        conv.card["import_check"] = f"max |log-prob gap| vs the source library on 4x64 random tokens: {gap:.2e}"
        if gap > 1e-3:
            raise UserError(f"{source}: the imported model's log-probs differ from the source library's by {gap:.2e} "
                            "(> 1e-3); this architecture variant is not converted faithfully: please report it")
    write_ours(conv, out)
    model, _ = load_checkpoint(out)  # read back through every check the commands will apply
    c = model.cfg
    typer.echo(f"imported {source} -> {out}: vocab {c.vocab_size:,}, d_model {c.d_model}, {c.n_heads} heads, "
               f"{'attention-only' if c.d_mlp == 0 else f'{c.d_mlp} {c.act_fn} neurons'}, {model.n_params():,} params"
               + (f"; log-prob gap vs source {gap:.1e}" if gap is not None else ""))


def _as_model(conv):
    from reference.model import OneLayerTransformer

    m = OneLayerTransformer(conv.cfg)
    m.load_state_dict(conv.state)
    return m.eval()


def export_cmd(
    out: Path = O.out_option(..., "folder for the exported model"),
    to: str = typer.Option("transformer-lens", "--to", help="Target format (transformer-lens)."),
    checkpoint: Path = O.CHECKPOINT,
):
    """Export a checkpoint as a TransformerLens config + property-format state dict (see docs/interop.md to load it)."""
    from reference.checkpoint import load_checkpoint
    from reference.interop import write_tl

    if to != "transformer-lens":
        raise UserError(f"--to {to}: unknown export format; the one supported is transformer-lens")
    O.check_out_dir(out)
    model, _ = load_checkpoint(checkpoint)
    write_tl(model, (Path(checkpoint) / "tokenizer.json").read_text(), out)
    typer.echo(f"exported {checkpoint} -> {out} (config.json, model.safetensors, tokenizer.json); "
               "load it with the snippet in docs/interop.md")


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
    app.command("export")(export_cmd)
