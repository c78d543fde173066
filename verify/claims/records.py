"""The claims' records: the `check` table of a rule (Claim) and how it is read, the outcome of one
context, the result of one rule, and how a rule is tested (Plan). The claims themselves: docs/claims.md."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from handmodel.errors import UserError

CHECK_KEYS = {"margin", "fraction", "min_weight", "together", "ref_head", "ref_neuron", "share", "level", "feature", "helps", "neutral", "distance",
              "expect", "why"}
HEAD_RE = re.compile(r"(?:^|[._\-])head[._\-]?(\d+)(?=$|[._\-])")
NEURON_RE = re.compile(r"(?:^|[._\-])neuron[._\-]?(\d+)(?=$|[._\-])")
DEFAULT_EXAMPLES = 40
MAX_PREFIX = 40  # longest generated prefix (tokens); contexts stay short so each example is a quick forward


class NoClaim(Exception):
    """The rule makes no testable claim (reported as 'no claim')."""


class CannotCheck(Exception):
    """The claim cannot be tested as written (reported as 'error', with how to fix it)."""


@dataclass
class Claim:
    margin: float = 0.0
    fraction: float = 0.8
    min_weight: float = 0.0
    together: bool = False
    ref_head: int | None = None
    ref_neuron: int | None = None
    share: float | None = None
    level: float = 0.0
    feature: bool = False
    helps: bool = False
    neutral: int | None = None
    distance: int | None = None
    expect: str = "pass"
    why: str = ""


@dataclass
class Outcome:
    ok: bool
    effect: float  # the per-context number compared with the claim (min over targets)
    detail: str = ""
    skip: bool = False  # not an example of the claim (a `helps` rule that does not act here): drawn again


@dataclass
class RuleResult:
    id: str
    kind: str
    where: str
    status: str  # pass | fail | xfail | xpass | no claim | error
    claimed: str = ""
    measured: str = ""
    examples: int = 0
    share: float | None = None
    median_effect: float | None = None
    counterexample: str | None = None
    counter_detail: str | None = None
    shrunk: bool = False
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "xfail", "no claim")

    @property
    def holds(self) -> bool:
        """The claim held on the reference (independently of `expect`)."""
        return self.status in ("pass", "xpass")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"ok": self.ok}


@dataclass
class Plan:
    """How one rule is tested: a hypothesis strategy of cases, the check of one case, its rendering."""
    strategy: object
    evaluate: Callable[[object], Outcome]
    render: Callable[[object], str]
    claimed: str
    unit: str = "nats"


# -- reading `check` tables (the engine ignores them; rulefile only checks they are flat tables) ---

def read_checks(rules_path: Path) -> dict[str, dict]:
    from handmodel.compiled import rule_file_paths
    from handmodel.rulefile import NOT_RULES, read_rule_file

    out: dict[str, dict] = {}
    for f in rule_file_paths(Path(rules_path)):
        _, entries = read_rule_file(f)
        for e in entries:
            if e.kind not in NOT_RULES:
                out[e.id] = dict(e.body.get("check", {}))
    return out


def parse_claim(raw: dict, where: str, rid: str, tok_id: dict[str, int]) -> Claim:
    c = Claim()

    def bad(what: str, fix: str) -> UserError:
        return UserError(f"{where}: rule '{rid}': check.{what}; {fix}")

    for k, v in raw.items():
        if k not in CHECK_KEYS:
            close = difflib.get_close_matches(k, sorted(CHECK_KEYS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(sorted(CHECK_KEYS))}"
            raise UserError(f"{where}: rule '{rid}': unknown check key '{k}'; {hint}")
        if k in ("expect", "why", "neutral"):
            if not isinstance(v, str):
                raise bad(f"{k} must be a string", f'write {k} = "..."')
        elif not isinstance(v, (int, float)) or isinstance(v, bool):
            raise bad(f"{k} must be a number", f"write {k} = 0.5")
        if k in ("ref_head", "ref_neuron", "distance") and (int(v) != v or v < (1 if k == "distance" else 0)):
            raise bad(f"{k} must be a whole number {'≥ 1' if k == 'distance' else '≥ 0'} (got {v})", f"write {k} = 1")
    if "margin" in raw:
        c.margin = float(raw["margin"])
    if "fraction" in raw:
        c.fraction = float(raw["fraction"])
        if not 0.0 < c.fraction <= 1.0:
            raise bad(f"fraction must be in (0, 1] (got {c.fraction})", "write fraction = 0.8 (1.0 = every context)")
    if "min_weight" in raw:
        c.min_weight = abs(float(raw["min_weight"]))
    if "together" in raw:
        if raw["together"] not in (0, 1):
            raise bad(f"together must be 0 or 1 (got {raw['together']})", "write together = 1 to claim the targets as pools")
        c.together = bool(raw["together"])
    for k, fix in (("feature", "write feature = 1 to claim the neuron's behaviour"),
                   ("helps", "write helps = 1 to claim that the rule corrects the hand model toward the reference")):
        if k in raw:
            if raw[k] not in (0, 1):
                raise bad(f"{k} must be 0 or 1 (got {raw[k]})", fix)
            setattr(c, k, bool(raw[k]))
    for k in ("ref_head", "ref_neuron", "distance"):
        if k in raw:
            setattr(c, k, int(raw[k]))
    if "share" in raw:
        c.share = float(raw["share"])
        if not 0.0 <= c.share <= 1.0:
            raise bad(f"share must be in [0, 1] (got {c.share})", "write share = 0.5")
    if "level" in raw:
        c.level = float(raw["level"])
    if "neutral" in raw:
        if raw["neutral"] not in tok_id:
            close = difflib.get_close_matches(raw["neutral"], list(tok_id), n=3)
            raise bad(f"neutral {raw['neutral']!r} is not a token", ("did you mean " + ", ".join(map(repr, close)) + "?")
                      if close else "tokens are case- and space-sensitive (' the' has a leading space)")
        c.neutral = tok_id[raw["neutral"]]
    if "expect" in raw:
        if raw["expect"] not in ("pass", "fail", "none"):
            raise bad(f"expect must be \"pass\", \"fail\" or \"none\" (got {raw['expect']!r})",
                      'write expect = "fail", why = "..." for a known-false rule')
        c.expect = raw["expect"]
    c.why = str(raw.get("why", ""))
    return c


def kl_last(lp_ref: np.ndarray, lp_hand: np.ndarray) -> float:
    """KL(p_ref ‖ p_hand) of one position from two log-prob vectors [V], in log space (terms with
    p_ref = 0 count 0; float rounding below 0 is clipped)."""
    p = np.exp(lp_ref)
    d = np.where(p > 0, lp_ref - lp_hand, 0.0)
    return max(0.0, float(p @ d))
