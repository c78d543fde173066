"""Baselines every ledger row is read against: uniform, unigram, oracle bigram.

- uniform: log q(v) = -log V.
- unigram: the reference's average next-token distribution over training positions.
- oracle bigram: per current token c, the mean of the reference's next-token distributions over
  training positions whose current token is c (the best any bigram table can do under
  KL(p_ref || .)); tokens never seen in the training text fall back to the unigram.

Tables are fitted on the training text (never the eval text) and cached under
cache_dir()/baselines/<checkpoint hash>-<train text sha>/; their eval-set numbers are cached beside the
reference cache entry (ref/<key>/baseline-<...>.npz).

Without a training text the tables are fitted on FALLBACK_SAMPLED stories sampled from the reference: about
a minute on two cores, most of a fresh clone's first run. For the shipped checkpoint its metrics on the
default sampled eval set ship beside it (SHIPPED_METRICS, written by `python -m verify.ledger.baselines
--ship`); they are used only when that eval set's tokens and cached log-probs are byte for byte the ones
they were computed on (then this machine's sampler drew the same stories, and so the same fitting stories).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handmodel.errors import UserError

from .data import Checkpoint, EvalSpec, RefCache, _atomic_dir, _publish, chunk, corpus_files, file_sha, load_oracle, read_meta

FALLBACK_SAMPLED = 256  # stories sampled from the reference when there is no training text
FALLBACK_SEED = 1_000_003
TABLE_FILES = ("log_unigram.npy", "log_bigram.npy", "counts.npy")
TABLES_VERSION = 2  # 2: meta.json records each file's dtype, shape and checksum
SHIPPED_METRICS = "baselines-sampled.npz"  # in the checkpoint folder: the sampled fallback's metrics
NAMES = ("uniform", "unigram", "oracle bigram")


@dataclass
class BaselineTables:
    dir: Path
    meta: dict
    log_unigram: np.ndarray  # float32 [V]
    log_bigram: np.ndarray  # float32 [V, V] (memmap)


def _train_identity(train: Path | None) -> dict:
    if train is not None:
        return {"kind": "corpus", "path": str(train), "text_sha": file_sha(corpus_files(train))}
    return {"kind": "sampled", "n": FALLBACK_SAMPLED, "seed": FALLBACK_SEED}


def get_tables(ckpt: Checkpoint, train: Path | None, log=print, cache_root: Path | None = None) -> BaselineTables:
    from reference.corpus import cache_dir

    ident = _train_identity(train)
    tag = ident.get("text_sha") or f"sampled{ident['n']}s{ident['seed']}"
    from verify.ledger.integrity import clean_stale, damaged, discard

    d = (cache_root or cache_dir()) / "baselines" / f"{ckpt.hash}-{tag}-v{TABLES_VERSION}"
    clean_stale(d.parent)
    for attempt in range(2):
        if d.exists():
            meta, why = read_meta(d, d.name)
            if why is None:
                V = ckpt.vocab_size
                shapes = [meta["files"][f]["shape"] for f in TABLE_FILES]
                if shapes == [[V], [V, V], [V]]:
                    return BaselineTables(d, meta, np.load(d / "log_unigram.npy"), np.load(d / "log_bigram.npy", mmap_mode="r"))
                why = f"its tables have shapes {shapes}, the checkpoint's vocabulary is {V}"
            damaged(d, why)
            discard(d)
        if attempt:
            break
        log(f"baseline cache cold: fitting unigram + oracle bigram on the training text (once) -> {d}")
        _fit(ckpt, train, ident, d)
    raise UserError(f"{d}: the baseline tables just fitted do not read back intact; "
                    "check the disk under $HANDMODEL_CACHE (full? failing?) and re-run")


def _fit(ckpt: Checkpoint, train: Path | None, ident: dict, d: Path) -> None:
    import torch

    from .data import sample_sequences

    t0 = time.perf_counter()
    oracle = load_oracle(ckpt)
    if train is not None:
        from reference.corpus import encode_stories, read_stories

        seqs = encode_stories(oracle.tokenizer, read_stories(train))
    else:
        seqs = sample_sequences(oracle, FALLBACK_SAMPLED, FALLBACK_SEED)
    seqs, _ = chunk(seqs, ckpt.n_ctx)
    V = ckpt.vocab_size
    acc = torch.zeros(V, V, dtype=torch.float64)
    part = torch.zeros(V, V, dtype=torch.float32)  # flushed into float64 every few batches
    counts = torch.zeros(V, dtype=torch.float64)
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
    batch_tokens = 16384
    i = n_pos = n_batches = 0
    torch_threads = torch.get_num_threads()
    with torch.inference_mode():
        while i < len(order):
            j = i + 1
            while j < len(order) and len(seqs[order[j]]) * (j - i + 1) <= batch_tokens:
                j += 1
            group = [seqs[k] for k in order[i:j]]
            T = max(len(s) for s in group)
            ids = torch.zeros(len(group), T, dtype=torch.int64)
            valid = torch.zeros(len(group), T, dtype=torch.bool)
            for r, s in enumerate(group):
                ids[r, : len(s)] = torch.from_numpy(s.astype(np.int64))
                valid[r, : len(s)] = True
            probs = torch.log_softmax(oracle.model(ids).float(), -1).exp_()
            probs.mul_(valid[..., None])  # padding contributes nothing
            part.index_add_(0, ids.reshape(-1), probs.reshape(-1, V))
            counts += torch.bincount(ids[valid], minlength=V).double()
            n_pos += int(valid.sum())
            n_batches += 1
            if n_batches % 16 == 0:
                acc += part
                part.zero_()
            i = j
    acc += part
    uni = acc.sum(0) / n_pos
    big = torch.where(counts[:, None] > 0, acc / counts.clamp(min=1)[:, None], uni[None, :])
    log_uni = torch.log(uni.clamp(min=1e-30))
    log_uni -= torch.logsumexp(log_uni, 0)
    log_big = torch.log(big.clamp(min=1e-30))
    log_big -= torch.logsumexp(log_big, 1, keepdim=True)
    tmp = _atomic_dir(d)
    np.save(tmp / "log_unigram.npy", log_uni.float().numpy())
    np.save(tmp / "log_bigram.npy", log_big.float().numpy())
    np.save(tmp / "counts.npy", counts.numpy().astype(np.int64))
    from verify.ledger.integrity import record

    meta = {"key": d.name, "files": {f: record(tmp / f) for f in TABLE_FILES}, "checkpoint_hash": ckpt.hash, "train": ident, "n_positions": int(n_pos),
            "n_tokens_seen": int((counts > 0).sum()), "fit_seconds": round(time.perf_counter() - t0, 2),
            "torch_threads": torch_threads}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _publish(tmp, d)


def baseline_metrics(ref: RefCache, tables: BaselineTables, chunk_rows: int = 2048) -> dict[str, dict]:
    """Per-position KL (all positions), CE (positions with a next token, NaN elsewhere) and top-1 hit
    for uniform / unigram / oracle bigram on the eval set. Cached beside the reference cache."""
    f = ref.dir / f"baseline-{tables.dir.name}.npz"
    names = NAMES
    N, V = ref.logp.shape
    if f.exists():
        got = _read_metrics(f, tables.dir.name, names, N)
        if got is not None:
            return got
    if tables.log_bigram.shape != (V, V):
        raise UserError(f"baseline tables in {tables.dir} have vocabulary {tables.log_bigram.shape[0]} but the eval "
                        f"cache has {V}; delete {tables.dir} and re-run")
    tok = ref.tokens
    nxt = ref.next_tokens
    hn = nxt >= 0
    out = {n: {"kl": np.zeros(N, np.float32), "ce": np.full(N, np.nan, np.float32), "agree": np.zeros(N, bool)}
           for n in names}
    lu = tables.log_unigram.astype(np.float32)
    lb = tables.log_bigram
    logV = np.float32(np.log(V))
    for s in range(0, N, chunk_rows):
        e = min(N, s + chunk_rows)
        r = np.asarray(ref.logp[s:e], np.float32)
        p = np.exp(r)
        S = p.sum(1, dtype=np.float64)  # renormalise float16 p_ref exactly as HandModel.stream_metrics does
        pr = (p * r).sum(1, dtype=np.float64)
        arg = r.argmax(1)
        rows = np.asarray(lb[tok[s:e]], np.float32)
        fin = lambda pq: np.maximum((pr - pq) / S - np.log(S), 0.0)  # noqa: E731
        out["uniform"]["kl"][s:e] = fin(-S * logV)
        out["unigram"]["kl"][s:e] = fin(p @ lu)
        out["oracle bigram"]["kl"][s:e] = fin((p * rows).sum(1, dtype=np.float64))
        out["unigram"]["agree"][s:e] = arg == lu.argmax()
        out["oracle bigram"]["agree"][s:e] = arg == rows.argmax(1)
        m = hn[s:e]
        idx = np.nonzero(m)[0]
        out["uniform"]["ce"][s:e][m] = logV
        out["unigram"]["ce"][s:e][m] = -lu[nxt[s:e][m]]
        out["oracle bigram"]["ce"][s:e][m] = -rows[idx, nxt[s:e][m]]
    out["uniform"]["agree"][:] = False  # argmax of a uniform distribution is undefined; reported as '-'
    arrays = {f"{n}|{k}": v for n, d in out.items() for k, v in d.items()}
    tmp = f.with_name(f".{f.name}.tmp{os.getpid()}.npz")  # write, then rename: a kill never leaves half a file
    try:
        np.savez(tmp, key=np.array(tables.dir.name), sha=np.array(_metrics_sha(arrays)), **arrays)
        tmp.replace(f)
    except OSError:
        pass
    return out


def _eval_fingerprint(ref: RefCache) -> str:
    """The eval set as the metrics read it: its tokens, sequence offsets and float16 log-probs, by the records
    (dtype, shape, bytes, CRC-32) the reference cache keeps in meta.json and checks on every load
    (integrity.check_entry): nothing is hashed again here."""
    files = ref.meta.get("files") or {}
    recs = [files.get(n) for n in ("tokens.npy", "offsets.npy", "logp16.npy")]
    return json.dumps(recs, sort_keys=True, separators=(",", ":")) if all(recs) else "unrecorded"


def _shipped_key(ckpt: Checkpoint, ref: RefCache) -> str:
    ident = _train_identity(None)
    return f"{ckpt.hash}-sampled{ident['n']}s{ident['seed']}-v{TABLES_VERSION}|{_eval_fingerprint(ref)}"


def shipped_metrics(ckpt: Checkpoint, ref: RefCache) -> dict[str, dict] | None:
    """The sampled fallback's baseline metrics shipped beside the checkpoint, when they are this eval set's:
    the file must name this checkpoint, the fallback's tables and the eval set's exact bytes (tokens, offsets,
    float16 log-probs: _eval_fingerprint), and match its checksum. None otherwise (the caller fits the tables). A damaged
    file is reported, never used; it is not deleted (it is part of the checkpoint)."""
    f = ckpt.path / SHIPPED_METRICS
    if not f.exists():
        return None
    key = _shipped_key(ckpt, ref)
    try:
        with np.load(f, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None  # another eval set, machine or checkpoint: fit as usual
    except Exception:  # noqa: BLE001 -- unreadable: _read_metrics below reports it
        pass
    import sys

    def report(f, why):
        print(f"{f}: the shipped baseline metrics are damaged ({why}); fitting the baselines instead (restore the "
              f"file from the repository, or re-make it: python -m verify.ledger.baselines --ship)", file=sys.stderr)

    return _read_metrics(f, key, NAMES, len(ref.tokens), report=report)


def ship_metrics(ckpt: Checkpoint, ref: RefCache, metrics: dict[str, dict]) -> Path:
    """Write SHIPPED_METRICS beside the checkpoint for this eval set (atomic)."""
    arrays = {f"{n}|{k}": np.asarray(v) for n, d in metrics.items() for k, v in d.items()}
    f = ckpt.path / SHIPPED_METRICS
    tmp = f.with_name(f".{f.name}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, key=np.array(_shipped_key(ckpt, ref)), sha=np.array(_metrics_sha(arrays)), **arrays)
    tmp.replace(f)
    return f


def _metrics_sha(arrays: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_metrics(f: Path, key: str, names, n: int, report=None) -> dict | None:
    """Cached baseline metrics if intact (this key, n positions each, checksum); else reported (by `report`,
    default: integrity.damaged), None."""
    from verify.ledger.integrity import damaged

    report = report or damaged
    try:
        with np.load(f, allow_pickle=False) as z:
            arrays = {f"{m}|{k}": z[f"{m}|{k}"] for m in names for k in ("kl", "ce", "agree")}
            stored, sha = str(z["key"]), str(z["sha"])
        if stored != key:
            why = f"it holds the metrics of tables {stored[:40]!r}"
        elif any(a.shape != (n,) for a in arrays.values()):
            why = f"its arrays do not cover the eval set's {n} positions"
        elif sha != _metrics_sha(arrays):
            why = "checksum mismatch"
        else:
            return {m: {k: arrays[f"{m}|{k}"] for k in ("kl", "ce", "agree")} for m in names}
    except Exception as e:  # noqa: BLE001 -- any unreadable entry is recomputed, never used
        why = f"unreadable: {type(e).__name__}: {str(e)[:80]}"
    report(f, why)
    return None


def main(argv: list[str] | None = None) -> None:
    """`python -m verify.ledger.baselines --ship`: compute the shipped checkpoint's sampled-fallback baseline
    metrics on the default sampled eval set (fitting the tables if they are not cached) and write them beside it."""
    import argparse

    from .data import EvalSpec, checkpoint_info, get_ref_cache

    ap = argparse.ArgumentParser(prog="python -m verify.ledger.baselines")
    ap.add_argument("--ship", action="store_true", required=True)
    ap.add_argument("--checkpoint", default=None)
    a = ap.parse_args(argv)
    ckpt = checkpoint_info(a.checkpoint)
    ref = get_ref_cache(ckpt, EvalSpec())
    f = ship_metrics(ckpt, ref, baseline_metrics(ref, get_tables(ckpt, None)))
    print(f"wrote {f} ({f.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
