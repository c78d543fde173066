"""The CLI's one vocabulary: every option that more than one command takes is defined here, once, and
every default path is made by `project_path` — relative to the project root, never to the working
directory, and printed resolved in `--help`. The checks of output paths run before any work starts.

  --rules         a rules folder (every *.toml in it) or one .toml file; default: the project's rules/
  --checkpoint    a checkpoint folder; default: the shipped reference/default
  --corpus        held-out text: what every reported number is measured on (valid.txt)
  --train-corpus  training text: what every fitted or counted number comes from (train.txt)
  --out           where the command writes (a file or a folder, said by each command); its parent must exist
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from handmodel.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def project_path(*parts: str) -> Path:
    """A default path, relative to the project root (so a command means the same from any directory)."""
    return ROOT.joinpath(*parts).resolve()


DEFAULT_RULES = project_path("rules")
DEFAULT_CHECKPOINT = project_path("reference", "default")
DEFAULT_CORPUS = project_path("..", "shared", "corpus", "tinystories", "valid.txt")
DEFAULT_TRAIN = project_path("..", "shared", "corpus", "tinystories", "train.txt")

RULES = typer.Option(DEFAULT_RULES, "--rules", help="Rules folder (every *.toml in it, in name order) or one .toml file.")
CHECKPOINT = typer.Option(DEFAULT_CHECKPOINT, "--checkpoint",
                          help="Checkpoint folder (config.json, model.safetensors, tokenizer.json; the shipped model by default).")
CORPUS = typer.Option(DEFAULT_CORPUS, "--corpus",
                      help="Held-out text (a .txt or a folder of them): every reported number is measured on it.")
TRAIN_CORPUS = typer.Option(DEFAULT_TRAIN, "--train-corpus",
                            help="Training text (a .txt or a folder of them): every fitted or counted number comes from it.")
JSON = typer.Option(False, "--json", help="Machine output: JSON to stdout instead of tables.")

OUT_HELP = "Output {what}; its parent folder must exist (checked before any work)."


def out_option(default, what: str):
    """`--out`: one meaning everywhere (where the command writes); what it names and its default differ."""
    return typer.Option(default, "--out", help=OUT_HELP.format(what=what))


def given(path: Optional[Path], default: Path) -> Optional[Path]:
    """The path to use: a default that is absent (a fresh clone without ../shared) becomes None, so the command
    can fall back (e.g. to stories sampled from the reference); a path the user named must exist."""
    if path is None or (Path(path) == default and not default.exists()):
        return None
    return Path(path)


def check_rules(path: Path, folder: str = "") -> Path:
    """--rules must exist; `folder`: why this command needs a folder rather than one file ('' = either)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: rules folder not found; pass --rules DIR (a folder of *.toml rule files)")
    if folder and not path.is_dir():
        raise UserError(f"{path}: --rules must be a folder here ({folder}); pass --rules DIR")
    if not path.is_dir() and path.suffix != ".toml":
        raise UserError(f"{path}: --rules must be a folder of *.toml rule files or one .toml file")
    return path


def check_out_file(path: Optional[Path], flag: str = "--out") -> None:
    """A file the command will write: refuse now, not after minutes of work."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: {flag} names a folder; pass a file path")
    if not path.parent.is_dir():
        raise UserError(f"{path}: {flag}'s folder {path.parent} does not exist; create it or pick another path")


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """A folder the command will create or fill."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {flag} names a file; pass a folder")
    if not path.exists() and not path.parent.is_dir():
        raise UserError(f"{path}: {flag}'s parent folder {path.parent} does not exist; create it or pick another path")


def check_number(value: Optional[float], flag: str) -> None:
    if value is not None and math.isnan(value):
        raise UserError(f"{flag} nan: expected a number (nan compares false, so the gate would always pass)")
