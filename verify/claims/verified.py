"""The verified ledger: the same rule groups with every rule whose component check does not pass switched
off (not refitted), and the verdict cache that keeps it cheap (issue 20; docs/claims.md).

Verdicts are cached **per rule**, in one JSON store per (checkpoint, contexts, checks' source) under
`reference.corpus.cache_dir()/claims/<store key>.json`. A rule's verdict is keyed by what its checks read:
its compiled form (numbers, sets, head; not its doc or its place in the file), its `check` table, every token
set, and — for a `[[head_out]]` or a `[[neuron]]` — the `[[head]]` rules whose attention it reads, for a
`[[head]]` every rule that reads it. Editing one rule makes only its own verdict (and its head's) stale;
`handmodel check-components` then checks only the rules without a current verdict. (An intervention takes
the rule's write out of the reference's own distribution, so no other rule enters its verdict.) The store holds a
sha256 of its entries; one that does not match on read is ignored as a whole. A rule with no current
verdict, or one that is failing, undecided or names no component, counts as unverified: never guessed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handmodel.errors import UserError

CLAIMS_CACHE_VERSION = 2  # 2: per-rule verdict keys in one store per checkpoint and contexts
DEFAULT_WINDOWS = 64  # valid.txt windows of WINDOW_LEN tokens: 8,192 positions (about 15 CPU-minutes on the shipped rules)
WINDOW_LEN = 128


# the component checks' source: what computes a verdict (not this module, which only caches and counts them)
CHECK_SOURCES = ("component.py", "measure.py", "hand_side.py", "ref_side.py", "records.py", "runner.py")


def _code_hash() -> str:
    """The component checks' own source, the rule semantics (handmodel/twin.py, which hand_side.py vectorises;
    a rule's compiled form is in its own key) and the reference's forward pass: a changed check never reuses
    old verdicts. The engine's kernels are not hashed: they are held equal to the twin by the engine tests
    (tests/test_handmodel_engine.py), and a speed change must not throw away 20 CPU-minutes of verdicts."""
    here = Path(__file__).parent
    root = here.parent.parent
    h = hashlib.sha256()
    for f in [here / name for name in CHECK_SOURCES] + [root / "handmodel" / "twin.py", root / "reference" / "model.py"]:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Contexts:
    """Where the checks look: windows [n, T] of an eval text (valid.txt) or of reference samples."""
    windows: np.ndarray
    identity: dict  # what they are (goes into the cache key and the report)


def valid_contexts(ckpt, corpus: Path, n_windows: int = DEFAULT_WINDOWS, T: int = WINDOW_LEN) -> Contexts:
    """Windows of an eval text (valid.txt), tokenized with the checkpoint's tokenizer (no torch)."""
    from reference.corpus import token_stream
    from reference.tokenizer import load_tokenizer
    from verify.discover.common import read_sample

    from .measure import windows_of
    from verify.ledger.data import corpus_files, file_sha

    corpus = Path(corpus)
    if "train" in corpus.name:
        raise UserError(f"{corpus}: component checks never look at training text; pass valid.txt (--corpus)")
    T = min(T, ckpt.n_ctx)
    stream = token_stream(load_tokenizer(ckpt.path / "tokenizer.json"), read_sample(corpus, n_windows * T * 8))
    win = windows_of(stream, T, n_windows)
    if len(win) < 1:
        raise UserError(f"{corpus}: fewer than {T} tokens; the component checks need at least one window")
    return Contexts(win, {"kind": "corpus", "path": corpus.name, "text_sha": file_sha(corpus_files(corpus)),
                          "windows": int(len(win)), "T": int(T)})


def cache_path(store_key: str) -> Path:
    from reference.corpus import cache_dir

    return cache_dir() / "claims" / f"{store_key}.json"


def store_key(ckpt_hash: str, contexts_identity: dict) -> str:
    """One verdict store per checkpoint, contexts and checks' source: a changed check never reuses verdicts."""
    blob = json.dumps({"v": CLAIMS_CACHE_VERSION, "ckpt": ckpt_hash, "ctx": contexts_identity, "code": _code_hash()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def rule_keys(rules, checks: dict[str, dict]) -> list[str]:
    """Per rule (ledger order), the key of its verdict: what the component checks read (module docstring)."""
    from verify.ledger.core import rule_digests, sets_digest

    canon = [d.hex() for d in rule_digests(rules)]  # a rule as its checks see it: not its doc, file or line
    chk = [json.dumps(checks.get(r.id, {}), sort_keys=True, default=str) for r in rules.rules]
    heads = {r.head: i for i, r in enumerate(rules.rules) if r.kind == "head"}
    reads: list[set[int]] = []  # per rule: the [[head]] numbers it reads
    for r in rules.rules:
        if r.kind == "head_out":
            reads.append({r.head})
        elif r.kind == "neuron":
            reads.append({h for h, _, _ in r.n_attend})
        else:
            reads.append(set())
    readers = {h: [i for i, rd in enumerate(reads) if h in rd] for h in heads}
    common = f"{len(rules.vocab)}|{rules.n_heads}|{sets_digest(rules)}"
    out = []
    for i, r in enumerate(rules.rules):
        deps = [heads[h] for h in sorted(reads[i]) if h in heads]
        if r.kind == "head":
            deps += readers.get(r.head, [])
        h = hashlib.sha256(f"{common}|{canon[i]}|{chk[i]}".encode())
        for j in deps:
            h.update(f"|{canon[j]}|{chk[j]}".encode())
        out.append(h.hexdigest()[:24])
    return out


def _digest(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def load_store(skey: str) -> dict[str, dict]:
    """{rule key: verdict dict} of a store, or {} (absent, damaged, or not what its key says)."""
    try:
        d = json.loads(cache_path(skey).read_text(encoding="utf-8"))
        if d.get("key") != skey or d.get("sha") != _digest(d["entries"]) or not isinstance(d["entries"], dict):
            return {}
        return d["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


MAX_ENTRIES = 50_000  # a store keeps the newest verdicts (edits leave stale keys behind)


def save_store(skey: str, new: dict[str, dict], meta: dict) -> Path:
    """Merge `new` into the store and write it atomically (a reader sees the old store or the whole new one;
    two writers at once may lose one's entries, which are then recomputed, never corrupted)."""
    entries = load_store(skey)
    for k in new:
        entries.pop(k, None)
    entries.update(new)
    if len(entries) > MAX_ENTRIES:
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
    f = cache_path(skey)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**meta, "key": skey, "sha": _digest(entries), "entries": entries}), encoding="utf-8")
    tmp.replace(f)
    return f


@dataclass
class VerdictLookup:
    """The current verdicts of a ruleset (ledger order, only rules that have one) and the rules without one."""
    verdicts: list  # [ComponentVerdict]
    missing: list[str] = field(default_factory=list)  # rule ids with no current verdict (never checked, or edited)
    computed: int = 0  # verdicts computed by this call

    @property
    def status(self) -> str:
        if self.computed:
            return "computed"
        return "cached" if not self.missing else "partial" if self.verdicts else "missing"


def lookup_verdicts(ckpt, rules, rules_dir: Path, contexts: "Contexts", compute: bool = True, log=None) -> VerdictLookup:
    """The rules' current verdicts from the store; with `compute`, the missing ones are checked now (only
    those: torch is imported only then) and stored."""
    from verify.claims import read_checks

    from .component import ComponentVerdict

    checks = read_checks(Path(rules_dir))
    keys = rule_keys(rules, checks)
    skey = store_key(ckpt.hash, contexts.identity)
    entries = load_store(skey)
    found: dict[int, ComponentVerdict] = {}
    for i, k in enumerate(keys):
        d = entries.get(k)
        if d is not None and d.get("id") == rules.rule_ids[i]:
            try:
                found[i] = ComponentVerdict.from_dict(d)
            except (TypeError, KeyError):
                pass
    todo = [i for i in range(len(keys)) if i not in found]
    computed = 0
    if todo and compute:
        from verify.ledger.data import load_oracle

        from .measure import check_components

        if log:
            log(f"component checks: {len(todo)} of {len(keys)} rules have no current verdict; checking them")
        got = check_components(load_oracle(ckpt), rules, checks, contexts.windows, log=log, only=set(todo))
        by_id = {v.id: v for v in got}
        new = {}
        for i in todo:
            v = by_id[rules.rule_ids[i]]
            found[i] = v
            new[keys[i]] = v.to_dict()
        save_store(skey, new, {"checkpoint_hash": ckpt.hash, "contexts": contexts.identity})
        computed, todo = len(new), []
    return VerdictLookup([found[i] for i in sorted(found)], [rules.rule_ids[i] for i in todo], computed)


def verified_mask(rules, verdicts) -> np.ndarray:
    """[n_rules] bool: on only for rules whose component check passes (no verdict: off)."""
    passed = {v.id for v in verdicts or [] if v.verdict == "pass"}
    return np.array([rid in passed for rid in rules.rule_ids], dtype=np.bool_)


def counts(verdicts) -> dict[str, dict[str, int]]:
    """{kind: {verdict: n}} in the order kinds first appear, then an 'all' row."""
    out: dict[str, dict[str, int]] = {}
    for v in verdicts:
        for k in (v.kind, "all"):
            row = out.setdefault(k, {"pass": 0, "fail": 0, "undecided": 0, "no component": 0})
            row[v.verdict] += 1
    if "all" in out:
        out["all"] = out.pop("all")  # the total last, under the kinds it sums
    return out


@dataclass
class VerifiedLedger:
    """`verify`'s `verified` section: the ledger's groups with every unverified rule off (nothing refitted)."""
    status: str  # cached | partial | missing | computed | no contexts
    note: str
    contexts: dict
    ledger: list[dict]  # the same rows as the all-rules ledger, unverified rules off
    final: dict
    kl_none: float
    kl_all: float
    kl_weighted_pass_rate: float | None  # (KL_none − KL_verified) / (KL_none − KL_all)
    counts: dict[str, dict[str, int]]
    n_verified: int
    n_rules: int
    missing: list[str]  # rules with no current verdict
    unverified: list[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def verified_ledger(ev, rules_dir: Path, valid: Path | None, windows: int = DEFAULT_WINDOWS, final_only: bool = False,
                    lookup: VerdictLookup | None = None, contexts: Contexts | None = None,
                    check_cmd: str = "handmodel check-components") -> VerifiedLedger:
    """The verified ledger of an evaluation (verify/ledger/evaluate.py) from cached verdicts only (or `lookup`,
    from check-components): verdicts are about valid.txt windows whatever the eval set. Rows come from the
    ledger's row cache (keyed by the rules switched on), so an unchanged verified set costs no engine pass.
    Missing or stale verdicts leave those rules unverified, and the note says so."""
    from verify.ledger import core as L

    rules, ref = ev.rules, ev.ref
    ctx_id: dict = {}
    if lookup is None:
        ctx = None
        if valid is not None and Path(valid).exists():
            try:
                ctx = valid_contexts(ev.ckpt, Path(valid), windows)
            except UserError:  # a text shorter than one window: no verdicts can exist for it
                ctx = None
        if ctx is None:
            lookup = VerdictLookup([], list(rules.rule_ids))
            status = "no contexts"
        else:
            ctx_id = ctx.identity
            lookup = lookup_verdicts(ev.ckpt, rules, rules_dir, ctx, compute=False)
            status = lookup.status
    else:
        status = lookup.status
        ctx_id = contexts.identity if contexts is not None else {}
    ver = verified_mask(rules, lookup.verdicts)
    weights = L.boot_weights(len(ref.offsets) - 1)
    kl_uni = float(ev.kl_unigram)
    rows, _ = L.run_ledger(ev.hand, rules, ref, kl_uni, weights, final_only=final_only, within=ver)
    if ev.ledger[0]["rules"] == 0:
        kl0 = ev.ledger[0]["kl"]
    else:
        kl0 = float(np.mean(L.cached_metrics(ev.hand, rules, ref, [np.zeros(len(ver), bool)])[0]["kl"]))
    kla, klv = ev.final["kl"], rows[-1]["kl"]
    n_miss = len(lookup.missing)
    cmd = check_cmd
    note = {"cached": "every rule has a current verdict",
            "computed": "verdicts computed now and cached",
            "partial": f"{n_miss} of {len(ver)} rules have no current verdict (edited or never checked) and count as "
                       f"unverified; `{cmd}` checks only those",
            "missing": f"no current component verdict for any rule: every rule counts as unverified; `{cmd}` computes them",
            "no contexts": "component verdicts are about valid.txt windows and no valid.txt (of at least one window) "
                           "was found (pass --corpus valid.txt): every rule counts as unverified"}[status]
    return VerifiedLedger(status, note, ctx_id, rows, rows[-1], kl0, kla,
                          (kl0 - klv) / (kl0 - kla) if kl0 > kla else None, counts(lookup.verdicts),
                          int(ver.sum()), int(len(ver)), lookup.missing,
                          [rid for rid, on in zip(rules.rule_ids, ver) if not on])
