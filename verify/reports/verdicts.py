"""Component verdicts as the reports show them (issue 20): each rule verified (its component check passes)
or not verified, and why (failing, undecided, no component, missing verdict). Read from the verdict cache
only (never computed here: `handmodel check-components` computes them, ~15 CPU-minutes on the shipped
rules), so a report or catalog never imports torch for them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from handmodel.errors import UserError

# one short code per state: what the HTML page carries per rule (a CSS class draws the mark)
STATES = {"pass": "verified", "fail": "failing", "undecided": "undecided", "no component": "no component",
          "missing": "missing verdict"}


@dataclass
class VerdictInfo:
    """Where the verdicts came from and each rule's state (a STATES key)."""
    status: str  # cached | missing
    state: dict[str, str] = field(default_factory=dict)  # rule id -> pass | fail | undecided | no component | missing
    note: str = ""  # one line for the page / the catalog
    command: str = ""  # the command that computes the verdicts

    def of(self, rule_id: str) -> str:
        return self.state.get(rule_id, "missing")

    def verified(self, rule_ids) -> list[bool]:
        return [self.of(r) == "pass" for r in rule_ids]

    def n_verified(self) -> int:
        return sum(v == "pass" for v in self.state.values())


def from_verdicts(rule_ids, verdicts, status: str = "cached", command: str = "") -> VerdictInfo:
    """A VerdictInfo from ComponentVerdict records (None: every rule 'missing')."""
    if verdicts is None:
        return VerdictInfo("missing", {r: "missing" for r in rule_ids},
                           "no component verdicts cached for these rules and this checkpoint: every rule is shown as "
                           f"not verified; `{command}` computes them", command)
    got = {v.id: v.verdict for v in verdicts}
    state = {r: got.get(r, "missing") for r in rule_ids}
    n = sum(s == "pass" for s in state.values())
    return VerdictInfo(status, state, f"component verdicts ({status}): {n} of {len(state)} rules verified", command)


def cached_verdicts(ckpt, rules, rules_dir: Path, valid: Path | None, command: str) -> VerdictInfo:
    """The cached component verdicts for `rules` (read on `valid`'s windows, as check-components reads them;
    `ckpt`: the evaluation's verify.ledger.data.Checkpoint). Nothing cached, no valid text, or a text too short
    for a window: every rule 'missing', and the note names `command`, which computes them."""
    from verify.claims import verified as VF

    if valid is None or not Path(valid).exists():
        return from_verdicts(rules.rule_ids, None, command=command)
    try:
        ctx = VF.valid_contexts(ckpt, Path(valid), VF.DEFAULT_WINDOWS)
    except UserError:  # e.g. a text shorter than one window: no verdicts can exist for it
        return from_verdicts(rules.rule_ids, None, command=command)
    lk = VF.lookup_verdicts(ckpt, rules, Path(rules_dir), ctx, compute=False)
    return from_verdicts(rules.rule_ids, lk.verdicts or None, lk.status, command)
