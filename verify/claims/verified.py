"""The verified ledger: the same rule groups with every rule whose component check does not pass switched
off (not refitted), and the verdict cache that keeps it cheap (issue 20; docs/claims.md).

Verdicts are cached as JSON under `reference.corpus.cache_dir()/claims/<key>.json`, key = sha256 of
(cache version, the rules folder's content — every *.toml, since classes change what a rule means —,
the checkpoint hash, the contexts' identity, the component checks' source). An entry stores its own
key and a sha256 of its verdicts; one that does not match on read is treated as missing. A rule with no
verdict (missing, stale, undecided, failing or naming no component) counts as unverified: never guessed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handmodel.errors import UserError

CLAIMS_CACHE_VERSION = 1
DEFAULT_WINDOWS = 64  # valid.txt windows of WINDOW_LEN tokens: 8,192 positions (about 15 CPU-minutes on the shipped rules)
WINDOW_LEN = 128


def rules_hash(rules_dir: Path) -> str:
    from handmodel.compiled import rule_file_paths

    h = hashlib.sha256()
    for f in rule_file_paths(Path(rules_dir)):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:24]


def _code_hash() -> str:
    """The component checks' own source: a changed check never reuses old verdicts."""
    h = hashlib.sha256()
    for f in sorted((Path(__file__).parent / "claims").glob("*.py")):
        h.update(f.read_bytes())
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


def cache_path(key: str) -> Path:
    from reference.corpus import cache_dir

    return cache_dir() / "claims" / f"{key}.json"


def claims_key(rules_sha: str, ckpt_hash: str, contexts_identity: dict) -> str:
    blob = json.dumps({"v": CLAIMS_CACHE_VERSION, "rules": rules_sha, "ckpt": ckpt_hash, "ctx": contexts_identity,
                       "code": _code_hash()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _digest(verdicts: list[dict]) -> str:
    return hashlib.sha256(json.dumps(verdicts, sort_keys=True).encode()).hexdigest()


def load_verdicts(key: str):
    """The cached verdicts for `key`, or None (absent, damaged, or not what the key says)."""
    from .component import ComponentVerdict

    f = cache_path(key)
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        if d.get("key") != key or d.get("sha") != _digest(d["verdicts"]):
            return None
        return [ComponentVerdict.from_dict(v) for v in d["verdicts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_verdicts(key: str, verdicts, meta: dict) -> Path:
    f = cache_path(key)
    f.parent.mkdir(parents=True, exist_ok=True)
    vs = [v.to_dict() for v in verdicts]
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**meta, "key": key, "sha": _digest(vs), "verdicts": vs}, indent=1), encoding="utf-8")
    tmp.replace(f)  # atomic: a reader sees the old entry or the whole new one
    return f


def get_verdicts(ckpt, rules, rules_dir: Path, contexts: Contexts, compute: bool = True, log=None):
    """(verdicts or None, 'cached' | 'computed' | 'missing'). With compute=False a cold cache gives None
    (and torch is never imported)."""
    key = claims_key(rules_hash(rules_dir), ckpt.hash, contexts.identity)
    got = load_verdicts(key)
    if got is not None:
        return got, "cached"
    if not compute:
        return None, "missing"
    from verify.claims import read_checks

    from .measure import check_components
    from verify.ledger.data import load_oracle

    verdicts = check_components(load_oracle(ckpt), rules, read_checks(Path(rules_dir)), contexts.windows, log=log)
    store_verdicts(key, verdicts, {"rules": str(rules_dir), "checkpoint_hash": ckpt.hash, "contexts": contexts.identity})
    return verdicts, "computed"


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


def verified_for_verify(ckpt, hm, rules, rules_dir: Path, ref, kl_uni: float, weights, rows: list[dict],
                        valid: Path, windows: int = DEFAULT_WINDOWS) -> dict:
    """`verify`'s `verified` section, from cached verdicts only (verdicts come from `check-components` on
    valid.txt windows, whatever the eval set): one engine pass for the verified row (two without the
    no-rules row). Missing or stale verdicts leave every rule unverified, and the status says so. The
    KL-weighted pass rate = (KL_no rules − KL_verified) / (KL_no rules − KL_all rules): the share of the
    all-rules KL reduction that the verified rules carry."""
    from verify.ledger import core as L

    verdicts, status = None, "missing"
    if Path(valid).exists():
        verdicts, status = get_verdicts(ckpt, rules, rules_dir, valid_contexts(ckpt, valid, windows), compute=False)
    ver = verified_mask(rules, verdicts)
    numbers = np.asarray(rules.rule_numbers)
    row = L.summarize("verified rules", hm.stream_metrics(ref.seqs, ref.logp, ver), ref, weights, kl_uni, int(ver.sum()),
                      int(numbers[ver].sum()))
    if rows[0]["rules"] == 0:
        kl0 = rows[0]["kl"]
    else:
        kl0 = float(np.mean(hm.stream_metrics(ref.seqs, ref.logp, np.zeros(len(ver), bool))["kl"]))
    kla = rows[-1]["kl"]
    note = {"cached": "verdicts from the cache", "missing": "no component verdicts for these rules and this checkpoint "
            "(run `handmodel check-components`): every rule counts as unverified"}[status]
    return {"status": status, "note": note, "final": row, "kl_none": kl0, "kl_all": kla,
            "kl_weighted_pass_rate": (kl0 - row["kl"]) / (kl0 - kla) if kl0 > kla else None,
            "counts": counts(verdicts or []), "n_verified": int(ver.sum()), "n_rules": int(len(ver)),
            "unverified": [rid for rid, on in zip(rules.rule_ids, ver) if not on]}
