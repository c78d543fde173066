"""The options of `handmodel suggest`, in one place: each default and its help text live here, the CLI's
flags are made from them, and `suggest` writes the options it ran with next to the draft (OPTIONS_FILE)
so that `handmodel suggest --config FILE` redrafts the same ruleset. No numpy here: the CLI imports it."""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from handmodel.errors import UserError

# Not *.toml: load_rules reads every *.toml of a rules folder as a rule file. The text is TOML.
OPTIONS_FILE = "suggest.conf"


def _opt(default, help: str, flag: str | None = None):
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class SuggestOptions:
    budget: int = _opt(90_000, "Numbers for per-token bigram exceptions (rows of frequent tokens get more).")
    classes: int = _opt(64, "Token classes proposed by clustering next-token rows (0: none).")
    class_k: int = _opt(96, "Entries per class-level bigram row.")
    k_max: int = _opt(256, "Most entries in one token's bigram row.")
    heads: bool = _opt(True, "Draft \\[\\[head]] + \\[\\[head_out]] rules for every reference head.")
    sources: int = _opt(300, "Source tokens per head that get a \\[\\[head_out]] rule (most attended first).")
    k_out: int = _opt(24, "Entries per \\[\\[head_out]] row.")
    scores: int = _opt(400, "Source-token attention scores per head.")
    positions: int = _opt(32_768, "Training positions used to fit heads (memory ~ 8 bytes x positions x vocabulary).")
    rounds: int = _opt(4, "Moment-matching rounds for \\[\\[head_out]] rows.")
    min_count: int = _opt(20, "Tokens rarer than this in the training text get no class/score/source.")
    neurons: int = _opt(32, "\\[\\[neuron]] rules for the most context-dependent reference neurons.")
    copy: bool = _opt(True, "Draft one copying rule per head (a story word attended to becomes likelier).")
    target: Optional[str] = _opt(None, "Existing rules: spend the numbers where they leave the most KL (worst positions first).")
    joint_steps: int = _opt(0, "After moment matching, fit every number (neurons included) jointly by gradient descent "
                               "for this many steps (jointfit.py; ~2.3 s a step on the shipped model).")
    joint_positions: int = _opt(262_144, "Training positions the joint fit streams over (reference recomputed per batch).")
    query_scores: int = _opt(400, "Joint fit: query-dependent attention entries { now = @class, src = @class } kept per head (0: none).")
    neuron_classes: int = _opt(0, "Joint fit: class-level entries per neuron and kind (current-token class in `now`, "
                                  "attention mass on a class in `attend`, a whole class in `next`), fitted dense over the "
                                  "classes then cut to this many of each (0: none).")
    prune_cuts: int = _opt(4, "Joint fit: prune the query and neuron-class entries in this many cuts between 1/8 and 2/5 "
                              "of the steps (see --prune-window), kept counts falling cubically to the final sizes (1: one cut at a third).")
    prune_window: Optional[tuple[float, float]] = _opt(None, "Joint fit: START:END, the fractions of the steps between which "
                                                             "the cuts fall (default 0.125:0.4; a later start keeps the fit dense longer).")
    shared_out: int = _opt(0, "Joint fit: output patterns (\\[\\[weights]] tables) the neurons share: a neuron adds x × pattern "
                              "to the logits (0: none; needs --neurons, --shared-size, --shared-refs).")
    shared_read: int = _opt(0, "Joint fit: read patterns per head the neurons share: a neuron's input gains x × the head's "
                               "attention weighted by the pattern (0: none).")
    shared_size: int | tuple[int, int] = _opt(0, "Joint fit: tokens kept per shared pattern (fitted dense over the vocabulary, "
                                                 "then cut like the class entries); OUT:READ keeps OUT per output pattern and READ per read pattern.")
    shared_refs: int = _opt(0, "Joint fit: pattern references kept per neuron and kind (output patterns; read patterns over all heads).")
    faithful: float = _opt(0.0, "Joint fit: weight λ of the faithfulness anchors (anchors.py): each [[head]] pulled toward its "
                                "reference head's attention, each [[neuron]]'s activation and write toward its reference neuron's, "
                                "each [[head_out]] row toward the head's OV output for its source, each bigram row toward the "
                                "current token's token-alone write, the prior toward the mean output (0: the plain fit, unchanged).")
    # Internal knobs (no flag; settable in the options file)
    att_positions: int = _opt(16_384, "Training positions of the attention fit.")
    att_steps: int = _opt(100, "Steps of the attention fit.")
    joint_lr: float = _opt(0.01, "Joint fit learning rate.")
    held_positions: int = _opt(8192, "Held-out training positions the joint fit reports on.")

    def __post_init__(self):
        if self.target is not None:  # a path; kept as text so the options file can hold it
            object.__setattr__(self, "target", str(self.target))
        if isinstance(self.shared_size, list):
            object.__setattr__(self, "shared_size", tuple(self.shared_size))

    @property
    def shared(self) -> tuple:
        """(output patterns, read patterns, size, references): the joint fit's shared-pattern settings."""
        return self.shared_out, self.shared_read, self.shared_size, self.shared_refs

    def to_toml(self, header: str) -> str:
        """The options as TOML, each with its help as a comment; options left at None are commented out."""
        lines = [f"# {line}" for line in header.splitlines()] + [""]
        for f in fields(self):
            v = getattr(self, f.name)
            lines.append(f"# {f.metadata['help']}".replace("\\[", "["))
            lines.append(f"# {f.name} = (unset)" if v is None else f"{f.name} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: Path) -> "SuggestOptions":
        """Read an options file (what suggest wrote, perhaps edited); unknown names and wrong types are refused."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text)
        except FileNotFoundError:
            raise UserError(f"{path}: options file not found; pass the {OPTIONS_FILE} that suggest wrote") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a TOML options file ({e})") from None
        known = {f.name: f for f in fields(cls)}
        values = {}
        for k, v in data.items():
            line = next((i + 1 for i, s in enumerate(text.splitlines()) if s.split("=")[0].strip() == k), 1)
            if k not in known:
                raise UserError(f"{path}:{line}: unknown option '{k}'; known: {', '.join(known)}")
            values[k] = _check_type(k, v, known[k].default, f"{path}:{line}")
        return cls(**values)

    def replace(self, **changes) -> "SuggestOptions":
        return type(self)(**{**asdict(self), **changes})


DEFAULTS = SuggestOptions()
HELP = {f.name: f.metadata["help"] for f in fields(SuggestOptions)}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)


def _check_type(name: str, v, default, where: str):
    """The file's value in the option's own type (a pair stays a tuple; an int is a fine float)."""
    if isinstance(v, list):
        if name not in ("prune_window", "shared_size") or len(v) != 2:
            raise UserError(f"{where}: {name} = {v!r}: a list is only allowed as a pair in prune_window or shared_size")
        kind = float if name == "prune_window" else int
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise UserError(f"{where}: {name} = {v!r}: expected two numbers")
        return tuple(kind(x) for x in v)
    if name == "prune_window":
        raise UserError(f"{where}: prune_window = {v!r}: expected [START, END], e.g. [0.3, 0.65]")
    if name == "target":
        if not isinstance(v, str):
            raise UserError(f"{where}: target = {v!r}: expected a rules folder path (a string)")
        return v
    want = type(default)
    ok = isinstance(v, want) and (want is bool or not isinstance(v, bool))
    if want is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if not ok:
        raise UserError(f"{where}: {name} = {v!r}: expected {'true/false' if want is bool else want.__name__}")
    return v
