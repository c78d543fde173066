"""The KL ledger: rule groups added cumulatively, ablations, and where the remaining gap sits.

Everything here returns plain dicts/lists (what `--json` prints); verify/reports/render.py draws them.
Over 400 lines: the row cache (keys, checked load/store) lives with the ledger that reads it (incremental
rows: incremental.py).

Definitions (also printed by `handmodel verify --help`):
- KL = mean over eval positions of KL(p_ref || p_hand) = sum_v p_ref(v) (log p_ref(v) - log p_hand(v)),
  reference first, nats/token, from log-softmax outputs. All positions count, including each
  sequence's last one (its distribution is defined; only its true next token is not).
- 95% CI: percentile bootstrap over sequences (resample sequences with replacement, fixed seed;
  KL of a resample = its summed KL / its position count).
- CE_hand, CE_ref = mean -log p(true next token) over positions that have a next token.
- unexplained loss = CE_hand - CE_ref.
- explained = 1 - KL_hand / KL_unigram (unigram = the reference's mean next-token distribution).
- top-1 = share of positions where argmax p_hand = argmax p_ref.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 1000
BOOT_SEED = 0


def boot_weights(n_seqs: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """[n_boot, n_seqs] multiplicities of a sequence-level bootstrap (same for every row: paired)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_seqs, np.full(n_seqs, 1.0 / n_seqs), size=n_boot).astype(np.float64)


def mean_ci(kl: np.ndarray, offsets: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    kl = np.asarray(kl, np.float64)
    sums = np.add.reduceat(kl, offsets[:-1])
    lens = np.diff(offsets).astype(np.float64)
    boots = (weights @ sums) / (weights @ lens)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(kl.mean()), float(lo), float(hi)


def summarize(name: str, m: dict, ref, weights: np.ndarray, kl_unigram: float | None,
              n_rules: int | None = None, n_numbers: int | None = None, has_agree: bool = True) -> dict:
    """One ledger/baseline row from per-position arrays m['kl'], m['ce'], m['agree']."""
    kl = np.asarray(m["kl"], np.float64)
    if not np.all(np.isfinite(kl)):
        bad = int(np.nonzero(~np.isfinite(kl))[0][0])
        raise FloatingPointError(f"{name}: KL is not finite at eval position {bad}; the hand model returned "
                                 "-inf/NaN log-probs (every token needs probability > 0)")
    mean, lo, hi = mean_ci(kl, ref.offsets, weights)
    hn = ref.has_next
    ce_hand = float(np.asarray(m["ce"], np.float64)[hn].mean())
    ce_ref = float(np.asarray(ref.ce, np.float64)[hn].mean())
    row = {"name": name, "kl": mean, "kl_lo": lo, "kl_hi": hi, "ce_hand": ce_hand, "ce_ref": ce_ref,
           "unexplained": ce_hand - ce_ref,
           "explained": (1.0 - mean / kl_unigram) if kl_unigram else None,
           "top1": float(np.mean(m["agree"])) if has_agree else None}
    if n_rules is not None:
        row["rules"] = int(n_rules)
        row["numbers"] = int(n_numbers)
    return row


def group_masks(rules) -> list[tuple[str, np.ndarray]]:
    """(label, mask) per ledger row: no rules, then each rule group added in file order."""
    g = np.asarray(rules.rule_group)
    rows = [("(no rules)", np.zeros(len(g), bool))]
    for i, name in enumerate(rules.groups):
        rows.append((f"+ {name}", g <= i))
    return rows


ROW_CACHE_VERSION = 5  # 2: keyed by what load_rules compiled (not file bytes); 3: not by docs or lines;
# 4: rows carry their rules' span records (verify/ledger/incremental.py); 5: and how each position stored its outputs


def row_keys(rules, masks: list[np.ndarray], ref) -> list[str | None]:
    """A content key per ledger row: the logits under a row's mask depend only on the rules it switches
    on (switched-off rules contribute nothing, and a head that is off gives its readers nothing), on
    the classes and weighted sets, and on the eval set. So a row's key hashes the compiled form of each
    of its rules and of every token set: exactly what load_rules read, however the files were written
    (editing the last rule file recomputes only the rows that include it)."""
    import hashlib

    per_rule = rule_digests(rules)
    head = _row_context(rules, ref)
    keys = []
    for m in masks:
        hk = hashlib.sha256(head.encode())
        for i in np.flatnonzero(m):
            hk.update(per_rule[i])
        keys.append(hk.hexdigest()[:24])
    return keys


def _row_context(rules, ref) -> str:
    """What every row key hashes besides its rules: engine, eval set, vocabulary, heads, token sets."""
    return repr((ROW_CACHE_VERSION, _engine_sha(), ref.meta.get("key"), len(rules.vocab), rules.n_heads,
                 sets_digest(rules)))


def rule_digests(rules) -> list[bytes]:
    """sha256 per rule of what it computes: its compiled form without its doc, file, line and group (so a
    comment, a doc or a rule moved down a line changes nothing): handmodel.compiled.rule_digest, kept on
    the rules object (and in the compiled-ruleset cache): the ledger, the verified ledger and the verdict
    keys all ask."""
    if hasattr(rules, "rule_digests"):
        return rules.rule_digests()
    from handmodel.compiled import rule_digest

    got = getattr(rules, "_rule_digests", None)
    if got is None or len(got) != len(rules.rules):
        got = [rule_digest(r) for r in rules.rules]
        rules._rule_digests = got  # a derived cache on a stand-in rules object
    return got


def sets_digest(rules) -> str:
    """sha256 of every token set the rules read: class names, members, weighted sets' weights."""
    import hashlib

    sets = rules.sets
    h = hashlib.sha256(repr((sets.class_names, sets.class_entries)).encode())
    for mem, w in zip(sets.class_members, sets.class_weights):
        h.update(np.ascontiguousarray(mem, np.int64).tobytes())
        h.update(b"|" if w is None else np.ascontiguousarray(w, np.float64).tobytes())
        h.update(b";")
    return h.hexdigest()


_ENGINE_SHA: str | None = None


# What the hand model's numbers depend on, given the resolved rules and token sets (which row keys hash
# themselves): the kernels, the engine, and compiled.py from this marker on (build_arrays: resolved rules ->
# the kernels' arrays), and passargs.py (the order the kernels receive those arrays in). Reading, resolving and
# caching rule files (compiled.load_rules, resolve.py, rulefile.py, rulecache.py) and the twin/explain/writer
# modules are left out: editing them keeps the rows.
ENGINE_SOURCES = ("engine.py", "kernels.py", "compiled.py", "passargs.py")
ARRAYS_MARKER = b"# Flat arrays"


def _engine_sha() -> str:
    """The hand model's numerical source (ENGINE_SOURCES): a changed engine never reuses old rows."""
    global _ENGINE_SHA
    if _ENGINE_SHA is None:
        import hashlib
        from pathlib import Path

        import handmodel

        h = hashlib.sha256()
        for name in ENGINE_SOURCES:
            src = (Path(handmodel.__file__).parent / name).read_bytes()
            if name == "compiled.py" and ARRAYS_MARKER in src:
                src = src[src.index(ARRAYS_MARKER):]
            h.update(name.encode() + b":" + src)
        _ENGINE_SHA = h.hexdigest()[:16]
    return _ENGINE_SHA


ROW_FIELDS = ("kl", "ce", "agree")


def _row_sha(m: dict, extra: tuple[str, ...] = ()) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in ROW_FIELDS + tuple(sorted(extra)):
        a = np.ascontiguousarray(m[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _load_row(ref, key: str | None, extras: bool = False):
    """A cached row, checked: it must name this key, cover this eval set's positions and match its
    checksum. Anything else (swapped, truncated, garbage) is reported, deleted and recomputed.
    `extras`: (row, its span records (incremental.Specs arrays, may be empty)) instead of the row."""
    from verify.ledger.integrity import damaged

    f = ref.dir / "ledger" / f"{key}.npz" if key else None
    if f is None or not f.exists():
        return None
    n = len(ref.tokens)
    try:
        with np.load(f, allow_pickle=False) as z:
            m = {k: z[k] for k in ROW_FIELDS}
            ex = {k: z[k] for k in z.files if k.startswith("sp_")}
            stored_key, sha = str(z["key"]), str(z["sha"])
        if stored_key != key:
            why = f"it holds the row of key {stored_key[:24]!r}"
        elif any(m[k].shape != (n,) for k in ROW_FIELDS):
            why = f"shape {m['kl'].shape}, the eval set has {n} positions"
        elif sha != _row_sha({**m, **ex}, tuple(ex)):
            why = "checksum mismatch"
        else:
            return (m, ex) if extras else m
    except Exception as e:  # noqa: BLE001 -- any unreadable entry is rebuilt, never used
        why = f"unreadable: {type(e).__name__}: {str(e)[:80]}"
    damaged(f, why)
    return None


def _store_row(ref, key: str | None, m: dict, extra: dict[str, np.ndarray] | None = None) -> None:
    """`extra`: span records (names starting sp_) stored with the row and covered by its checksum."""
    import os

    if key is None:
        return
    f = ref.dir / "ledger" / f"{key}.npz"
    extra = extra or {}
    try:
        f.parent.mkdir(exist_ok=True)
        tmp = f.with_name(f".{key}.tmp{os.getpid()}.npz")  # per process: concurrent runs never share a temp
        np.savez(tmp, key=np.array(key), sha=np.array(_row_sha({**m, **extra}, tuple(extra))),
                 **{k: m[k] for k in ROW_FIELDS}, **extra)
        tmp.replace(f)
    except OSError:
        pass


def cached_metrics(hm, rules, ref, masks: list[np.ndarray], cache: bool = True,
                   labels: list[str] | None = None) -> list[dict]:
    """Per-position metrics under each mask: rows whose rules did not change since the last run on this eval
    set come from the row cache (row_keys). `labels` name each row's lineage (the same row of the ledger
    across edits): a missing row whose last predecessor differs from it only in rules with limited spans
    is that row with those spans recomputed (verify/ledger/incremental.py: exact). The others are computed
    together (HandModel.stream_metrics_rows: one engine pass for all rows that share the bigram rules)."""
    from verify.ledger import incremental as I
    from verify.ledger.integrity import clean_stale
    from verify.ledger.refstats import RefStatsStore

    for folder in (ref.dir, ref.dir / "ledger"):  # temporaries of killed runs (row and baseline writes)
        clean_stale(folder)
    keys = row_keys(rules, masks, ref) if cache else [None] * len(masks)
    got = [_load_row(ref, k) for k in keys]
    todo = [i for i, m in enumerate(got) if m is None]
    labels = labels if cache and labels is not None else None
    if todo:
        head = I.context_digest(_row_context(rules, ref)) if cache else None
        specs = I.specs_of(rules, rule_digests(rules)) if cache else None
        bases = []
        if labels is not None:
            pos = I._Positions(rules.sets, ref.tokens, ref.offsets)
            olds: dict = {}  # find_base and find_gate read the same predecessor rows: each is read and checked once
            load = lambda k: olds[k] if k in olds else olds.setdefault(k, _load_row(ref, k, extras=True))  # noqa: E731
            bases = [b for i in todo
                     if (b := I.find_base(ref, rules.sets, i, labels[i], keys[i], head, specs, masks[i], pos, load))]
        spliced = I.splice(hm, ref, masks, bases, ROW_FIELDS) if bases else None
        if spliced is not None:
            for b, m in zip(bases, spliced):
                got[b.row] = m
        rest = [i for i in todo if got[i] is None]
        if rest:
            store = RefStatsStore(ref.dir) if cache else None  # the reference's statistics, across processes
            # an edit of neurons' numbers: their old rows stand wherever those neurons stay off (incremental.find_gate)
            gate = I.find_gate(ref, rules, rest, labels, keys, head, specs, masks, load) if labels is not None else None
            for i, m in zip(rest, hm.stream_metrics_rows(ref.seqs, ref.logp, [masks[i] for i in rest],
                                                         ref_key=ref.content_key, stats_store=store,
                                                         gate=None if gate is None else gate.gate)):
                got[i] = m if gate is None else I.merge_kept(m, gate.olds[gate.rows.index(i)], ROW_FIELDS)
        for i in todo:
            extra = None if specs is None else {**specs.to_arrays(masks[i]), "sp_head": head,
                                                "sp_dense": np.ascontiguousarray(got[i]["dense"])}
            _store_row(ref, keys[i], got[i], extra)
    if labels is not None:
        for label, k in zip(labels, keys):
            I.write_lineage(ref, label, k)
    return got


def lineage_scope(rules) -> str:
    """What a row's lineage (verify/ledger/incremental.py) is kept per, besides its label: this engine and the
    folders the rules were read from. Two rules folders verified on one eval set (the shipped rules and an
    experiment), or two checkouts sharing one cache, each splice onto their own last rows instead of replacing
    each other's pointer with a row the other cannot splice onto (another engine) or that is far from it."""
    from pathlib import Path

    folders = sorted({str(Path(f).parent.resolve()) for f in set(rules.rule_files)})  # one per file, not rule
    return "\0" + _engine_sha() + "\0" + "\0".join(folders)


def lineage_labels(rules, masks: list[tuple[str, np.ndarray]], ledger: str = "all:") -> list[str]:
    """Each row's lineage label (incremental.py): the ledger it is in, its group label, this rules folder's scope."""
    scope = lineage_scope(rules)
    return [ledger + label + scope for label, _ in masks]


def run_ledger(hm, rules, ref, kl_unigram: float, weights: np.ndarray, final_only: bool = False, cache: bool = True,
               within: np.ndarray | None = None):
    """-> (rows, per-position metrics of the last row (all rules on)). `within` [n_rules] bool: only these rules
    may be on (the verified ledger: the same groups with every unverified rule off, nothing refitted)."""
    masks = group_masks(rules)
    if final_only:
        masks = masks[-1:]
    if within is not None:
        masks = [(label, m & within) for label, m in masks]
    got = cached_metrics(hm, rules, ref, [m for _, m in masks], cache,
                         labels=lineage_labels(rules, masks, "verified:" if within is not None else "all:"))
    numbers = np.asarray(rules.rule_numbers)
    rows = [summarize(label, m, ref, weights, kl_unigram, int(mask.sum()), int(numbers[mask].sum()))
            for (label, mask), m in zip(masks, got)]
    return rows, got[-1]


def touched_spans(rules, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per rule, (sequence indices, prefix lengths): the only positions where switching it off can change
    a log-prob lie in seqs[q][:end] (the engine is causal, so recomputing that prefix alone is exact). A
    bigram row acts up to the last occurrence of its current token; a head_out up to the last current
    token in `now` at or after the first source in `src` (a skip-trigram: strictly after its first
    `earlier`). Priors, heads and neurons (which may fire with no written input) span every position."""
    V, n = rules.vocab_size, len(seqs)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    first = np.full((n, V), np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full((n, V), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)
        pos = np.arange(len(s))
        np.minimum.at(first[i], s, pos)
        last[i, s] = pos  # fancy assignment keeps the last write per token
    memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def span(sid: int) -> tuple[np.ndarray, np.ndarray]:
        """(first, last) position of a token of set sid in each sequence (max int / -1 when absent)."""
        if sid not in memo:
            if sid == rules.sets.ALL:
                memo[sid] = (np.zeros(n, np.int64), lens - 1)
            else:
                m = rules.sets.members(sid)
                memo[sid] = (first[:, m].min(1), last[:, m].max(1))
        return memo[sid]

    every = (np.arange(n), lens)
    out = []
    for r in rules.rules:
        if r.kind == "bigram":
            end = np.full(n, -1, np.int64)
            for now, _ in r.rows:
                end = np.maximum(end, span(now)[1])
            ok = end >= 0
        elif r.kind in ("head_out", "skip"):
            end = span(r.now)[1]
            f = span(r.src)[0]
            ok = (end > f) if r.kind == "skip" else (end >= f)
            ok &= end >= 0
        else:
            out.append(every)
            continue
        idx = np.flatnonzero(ok)
        out.append((idx, end[idx] + 1))
    return out


def ablation_row(rules, i: int, kl_without: float, kl_full: float) -> dict:
    return {"rule": rules.rule_ids[i], "file": str(rules.rule_files[i]), "group": rules.groups[int(rules.rule_group[i])],
            "kl_without": kl_without, "delta": kl_without - kl_full, "hurts": kl_without < kl_full,
            "doc": rules.rule_docs[i]}


def run_ablation(hm, rules, ref, kl_full: float, kl_pos: np.ndarray | None = None, only=None) -> list[dict]:
    """KL increase when only that rule is off, sorted (largest first); negative = removal helps.

    Exact, but only the positions a rule can touch are recomputed (touched_spans: the prefix of each
    sequence up to its last possible firing): elsewhere the per-position KL with every rule on
    (`kl_pos`) stands. A prior, head or neuron costs a full pass; most bigram rows and head_outs a
    fraction of one. `only`: rule indices to ablate (default: all). verify/probe.fast_ablation gives the
    same numbers in a handful of passes; this is its slow, obvious twin."""
    n = len(rules.rule_ids)
    only = set(range(n)) if only is None else set(only)
    seqs = list(ref.seqs)
    if kl_pos is None:
        kl_pos = hm.stream_metrics(seqs, ref.logp)["kl"]
    ptr = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=ptr[1:])
    csum = np.concatenate([[0.0], np.cumsum(kl_pos, dtype=np.float64)])
    total, N = float(csum[-1]), int(ptr[-1])
    out = []
    for i, (idx, end) in enumerate(touched_spans(rules, seqs)):
        if i not in only:
            continue
        mask = np.ones(n, bool)
        mask[i] = False
        if len(idx) == len(seqs) and np.array_equal(end, ptr[1:] - ptr[:-1]):
            kl = float(np.mean(hm.stream_metrics(seqs, ref.logp, mask=mask)["kl"]))
        elif len(idx) == 0:
            kl = total / N
        else:
            rows = np.concatenate([np.arange(ptr[q], ptr[q] + e) for q, e in zip(idx, end)])
            part = hm.stream_metrics([seqs[q][:e] for q, e in zip(idx, end)], ref.logp[rows], mask=mask)["kl"]
            old = float(np.sum(csum[ptr[idx] + end] - csum[ptr[idx]]))
            kl = (total - old + float(part.sum())) / N
        out.append(ablation_row(rules, i, kl, kl_full))
    out.sort(key=lambda r: -r["delta"])
    return out


def topk(logp_row: np.ndarray, vocab: list[str], k: int = 5) -> list[dict]:
    r = np.asarray(logp_row, np.float32)
    idx = np.argpartition(-r, k)[:k]
    idx = idx[np.argsort(-r[idx])]
    return [{"token": vocab[i], "id": int(i), "p": float(np.exp(r[i]))} for i in idx]


def context_text(vocab: list[str], seq: np.ndarray, t: int, width: int = 12) -> str:
    return "".join(vocab[int(x)] for x in seq[max(0, t - width + 1): t + 1])


def worst_positions(hm, ref, kl: np.ndarray, vocab: list[str], k: int, mask=None) -> list[dict]:
    kl = np.asarray(kl, np.float64)
    k = min(k, len(kl))
    if k <= 0:
        return []
    top = np.argpartition(-kl, k - 1)[:k]
    top = top[np.argsort(-kl[top])]
    sid = ref.seq_id
    nxt = ref.next_tokens
    hand_cache: dict[int, np.ndarray] = {}
    out = []
    for pos in top:
        s = int(sid[pos])
        t = int(pos - ref.offsets[s])
        if s not in hand_cache:
            hand_cache[s] = hm.log_probs(ref.seqs[s], mask=mask)
        out.append({"position": int(pos), "seq": s, "t": t, "kl": float(kl[pos]),
                    "context": context_text(vocab, ref.seqs[s], t),
                    "current": vocab[int(ref.tokens[pos])],
                    "next": vocab[int(nxt[pos])] if nxt[pos] >= 0 else None,
                    "ref_top5": topk(ref.logp[pos], vocab), "hand_top5": topk(hand_cache[s][t], vocab)})
    return out


def gap_by(ref, kl: np.ndarray, vocab: list[str], by: str, k: int = 10) -> list[dict]:
    """Total residual KL aggregated by current token (by='current') or true next token (by='next')."""
    kl = np.asarray(kl, np.float64)
    if by == "current":
        keys, w = ref.tokens.astype(np.int64), kl
    else:
        nxt = ref.next_tokens
        keep = nxt >= 0
        keys, w = nxt[keep], kl[keep]
    V = len(vocab)
    tot = np.bincount(keys, weights=w, minlength=V)
    cnt = np.bincount(keys, minlength=V)
    grand = float(kl.sum())
    order = np.argsort(-tot)[:k]
    return [{"token": vocab[i], "id": int(i), "total": float(tot[i]), "count": int(cnt[i]),
             "mean": float(tot[i] / cnt[i]), "share": float(tot[i] / grand) if grand > 0 else 0.0}
            for i in order if cnt[i] > 0]
