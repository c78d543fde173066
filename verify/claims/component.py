"""Component checks: every rule answers to the reference component it names (docs/claims.md,
"Component checks (verified ledger)"; issue 20).

For each rule kind a READOUT check (the rule's own quantity against the component's, on the same
contexts) and an INTERVENTION check (taking the rule's logit write out of the reference's own distribution
moves log p the way mean-ablating the component moves the reference's; both sides start from p_ref, so the
verdict reads the rule and the reference, never the rest of the hand model). Each check reduces to a ratio of sums over
contexts (windows); its verdict comes from a percentile bootstrap over windows: pass when the whole
95% interval is at or above the kind's threshold, fail when it is wholly below, undecided otherwise
(or when fewer than MIN_WINDOWS windows hold an example). A rule passes when all its checks pass,
fails when one fails, is undecided otherwise; a rule naming no component gets "no component".

Contexts: windows of valid.txt (or stories sampled from the reference), never train.txt: the caller
passes them (verify/claims/verified.py reads valid.txt).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Callable

import numpy as np

from . import hand_side as H

# -- thresholds: one per kind and check, the same for every rule (docs/claims.md says why) ------------
READOUT_CORR = 0.5  # neuron: Pearson r of activations; bigram: of the row and the component's logit write (r² ≥ 25%)
READOUT_OVERLAP = 0.5  # [[head]]: mean Σ_s min(a_ref, a_hand): the two patterns share most of their mass
READOUT_COSINE = 0.5  # prior / head_out next: cosine of the logit offsets on the written tokens
COPY_Z = 2.0  # head_out copy: the head's OV output puts the copied token ≥ 2 s.d. above the vocabulary mean
READOUT_COPY_RATE = 0.5  # ... at at least half of the source occurrences
INTERVENTION = 0.5  # every kind: concordance 2Σxy/(Σx²+Σy²) of the two Δlog p vectors (direction and size)
MIN_MASS = 0.05  # head_out: a position counts when the hand head puts at least this attention on the sources
MIN_WINDOWS = 5  # fewer windows holding an example: undecided (too few contexts)
N_BOOT = 400
PER_WINDOW = 4  # intervention positions sampled per window and rule (the ablated passes cost V per position)


@dataclass
class CheckResult:
    name: str  # readout | readout.copy | intervention
    statistic: str  # what `value` is
    threshold: float
    value: float | None  # on all contexts
    lo: float | None  # 95% bootstrap interval over windows
    hi: float | None
    windows: int  # windows holding an example
    items: int  # positions (or source occurrences) measured
    verdict: str  # pass | fail | undecided


@dataclass
class ComponentVerdict:
    id: str
    kind: str
    component: str | None  # e.g. "neuron 617", "head 2 OV of '.'", None: names no component
    verdict: str  # pass | fail | undecided | no component
    checks: list[CheckResult] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ComponentVerdict":
        return cls(**{**d, "checks": [CheckResult(**c) for c in d["checks"]]})


# -- statistics from per-window sums ---------------------------------------------------------------
def _stat(kind: str, s: np.ndarray) -> np.ndarray:
    """s [..., k] sums -> the statistic (NaN where undefined)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "corr":  # n, Σx, Σy, Σx², Σy², Σxy
            n, sx, sy, sxx, syy, sxy = np.moveaxis(s, -1, 0)
            cov = sxy - sx * sy / n
            return cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
        if kind == "cosine":  # Σxy, Σx², Σy²
            return s[..., 0] / np.sqrt(s[..., 1] * s[..., 2])
        if kind == "concordance":
            return 2 * s[..., 0] / (s[..., 1] + s[..., 2])
        if kind == "mean":  # n, Σx
            return s[..., 1] / s[..., 0]
    raise ValueError(kind)


STAT_TEXT = {"corr": "Pearson r", "cosine": "cosine", "concordance": "concordance 2Σxy/(Σx²+Σy²)", "mean": "mean"}


def _pair_sums(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if kind == "corr":
        return np.array([len(x), x.sum(), y.sum(), x @ x, y @ y, x @ y])
    return np.array([x @ y, x @ x, y @ y])


def verdict_of(name: str, kind: str, threshold: float, per_window: dict[int, np.ndarray], items: int,
               seed: int) -> CheckResult:
    """The check's verdict from its per-window sums (bootstrap over the windows that hold an example)."""
    if not per_window:
        return CheckResult(name, STAT_TEXT[kind], threshold, None, None, None, 0, 0, "undecided")
    S = np.stack(list(per_window.values()))
    value = float(_stat(kind, S.sum(0)))
    W = len(S)
    rng = np.random.default_rng(seed)
    boots = _stat(kind, rng.multinomial(W, np.full(W, 1.0 / W), size=N_BOOT).astype(np.float64) @ S)
    boots = boots[np.isfinite(boots)]
    if W < MIN_WINDOWS or len(boots) < N_BOOT // 2 or not np.isfinite(value):
        lo = hi = None
        v = "undecided"
    else:
        lo, hi = (float(b) for b in np.percentile(boots, [2.5, 97.5]))
        v = "pass" if lo >= threshold else "fail" if hi < threshold else "undecided"
    return CheckResult(name, STAT_TEXT[kind], threshold, value if np.isfinite(value) else None, lo, hi, W, items, v)


# -- which component a rule names (verify/claims' mapping: check.ref_head / ref_neuron, or the id) --
def _claim(rule, raw: dict, tok_id: dict):
    from verify.claims import parse_claim

    return parse_claim(raw, f"{rule.file}:{rule.line}", rule.id, tok_id)


def ref_index(oracle, rule, raw: dict, tok_id: dict, what: str) -> int | None:
    """The reference head / neuron a rule names, or None when it names none (or one that does not exist)."""
    from verify.claims import CannotCheck, Checker

    try:
        return Checker._ref_index(SimpleNamespace(o=oracle), rule, _claim(rule, raw, tok_id), what)
    except CannotCheck:
        return None


@dataclass
class Target:
    """A rule and the component it names."""
    index: int  # rule index (ledger order)
    rule: object
    component: str | None
    ref: int | None  # reference head (head, head_out) or neuron (neuron)


def targets(oracle, rules, checks: dict[str, dict]) -> list[Target]:
    """Every rule with the component it names (prior: the mean output; bigram: the current token's
    token-alone path, i.e. the direct path and the MLP's current-token part; skip: none)."""
    vec_heads = [r for r in rules.rules if r.kind == "head"]
    tok_id = rules.sets.tok_id
    head_ref = {h: ref_index(oracle, r, checks.get(r.id, {}), tok_id, "head") for h, r in enumerate(vec_heads)}
    out = []
    for i, r in enumerate(rules.rules):
        raw = checks.get(r.id, {})
        ref, comp = None, None
        if r.kind == "prior":
            comp = "the reference's output (unembedding bias and mean)"
        elif r.kind == "bigram":
            comp = "the current token's token-alone path (direct + MLP, attention held)"
        elif r.kind == "head":
            ref = head_ref[vec_heads.index(r)]
            comp = None if ref is None else f"head {ref} attention"
        elif r.kind == "head_out":
            ref = head_ref.get(r.head)
            comp = None if ref is None else f"head {ref} OV of {rules.sets.name(r.src)}"
        elif r.kind == "neuron":
            ref = ref_index(oracle, r, raw, tok_id, "neuron")
            comp = None if ref is None else f"neuron {ref}"
        out.append(Target(i, r, comp, ref))
    return out


def _seed(rule_id: str, check: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{rule_id}/{check}".encode()).digest()[:4], "little")


def _centred(d: np.ndarray) -> np.ndarray:
    """[k, V] centred over the vocabulary: a log-prob difference as a logit write (log Z drops out)."""
    return d - d.mean(1, keepdims=True)


def _dlogp(lp: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Change of log-probs [k, V] when logits lose the contribution d (the rule switched off). The interventions
    pass the REFERENCE's log-probs as lp: log Z at a position is set by the whole distribution there, and on the
    hand model's it is set by every other rule, so a true rule was judged by what the rest of the ruleset put on
    its tokens (research/README.md, "The log Z confound")."""
    z = lp.astype(np.float64) - d
    m = z.max(1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(1, keepdims=True))) - lp


def _pick(rng, pos: np.ndarray, k: int) -> np.ndarray:
    return pos if len(pos) <= k else np.sort(rng.choice(pos, k, replace=False))
