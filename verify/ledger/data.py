"""Eval sets and the on-disk reference cache. Torch is imported only when a cache is cold.

Cache layout (under `reference.corpus.cache_dir()`, env HANDMODEL_CACHE):

    ref/<key>/meta.json      what the entry is: checkpoint hash, eval-set description, sizes, precision
    ref/<key>/tokens.npy     int32 [N] eval tokens, all sequences concatenated
    ref/<key>/offsets.npy    int64 [S+1] sequence boundaries into tokens
    ref/<key>/logp16.npy     float16 [N, V] reference next-token log-probs (memory-mapped on load)
    ref/<key>/ce.npy         float32 [N] exact reference cross-entropy on the true next token (NaN at
                             each sequence's last position: it has no next token)
    ref/<key>/ent.npy        float32 [N] exact reference entropy

key = sha256(cache version, checkpoint content hash, tokenizer hash, eval-set identity) where the
eval-set identity is the eval text's sha256 (--corpus) or (N, seed, max length) (--sampled).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handmodel.errors import UserError

CACHE_VERSION = 2  # 2: meta.json records each file's dtype, shape and checksum
CKPT_FILES = ("model.safetensors", "config.json", "tokenizer.json")
MIN_TOKENS = 64  # fewer eval positions than this give meaningless numbers
SAMPLE_MAX_LEN = 256  # sampled stories stop here (or at EOT, or at the context length)


# -- checkpoint (torch-free) -------------------------------------------------------------------
def default_checkpoint() -> Path:
    import reference  # the package __init__ is empty: no torch

    return Path(reference.__file__).parent / "default"


@dataclass
class Checkpoint:
    path: Path
    hash: str
    tokenizer_hash: str
    n_ctx: int
    vocab_size: int


def file_sha(paths, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while b := f.read(chunk):
                h.update(b)
    return h.hexdigest()[:16]


def checkpoint_info(path: str | Path | None) -> Checkpoint:
    """Validate a checkpoint folder and hash it, without torch. The hash equals
    reference.checkpoint.checkpoint_hash (same bytes, same order; tests check it)."""
    path = Path(path) if path is not None else default_checkpoint()
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint folder not found; pass --checkpoint DIR (a folder made by `handmodel train`)")
    for f in CKPT_FILES:
        if not (path / f).exists():
            raise UserError(f"{path}: checkpoint is missing {f}; re-run `handmodel train` or copy the whole folder"
                            + (" (the shipped model is still being trained?)" if path == default_checkpoint() else ""))
    h = hashlib.sha256()
    for f in CKPT_FILES:  # identical to reference.checkpoint.checkpoint_hash
        h.update(f.encode())
        h.update((path / f).read_bytes())
    try:  # the card records its tokenizer's sha256 (reference.checkpoint.save_checkpoint): a swap is caught
        want = json.loads((path / "card.json").read_text()).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        want = None
    if want and hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest() != want:
        raise UserError(f"{path / 'tokenizer.json'}: not the tokenizer this model was trained with (card.json "
                        f"records sha256 {str(want)[:12]}…); copy tokenizer.json from the training run")
    try:
        cfg = json.loads((path / "config.json").read_text())
        n_ctx, vocab_size = int(cfg["n_ctx"]), int(cfg["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path / 'config.json'}: corrupt config ({e}); restore it from the training run") from None
    return Checkpoint(path, h.hexdigest()[:16], file_sha([path / "tokenizer.json"]), n_ctx, vocab_size)


# -- eval-set specs ----------------------------------------------------------------------------
@dataclass
class EvalSpec:
    """What to evaluate on: a corpus path, or N stories sampled from the reference with a seed."""
    corpus: Path | None = None
    sampled: int = 32
    seed: int = 0

    def identity(self) -> dict:
        if self.corpus is not None:
            files = corpus_files(self.corpus)
            return {"kind": "corpus", "path": str(self.corpus), "text_sha": file_sha(files)}
        return {"kind": "sampled", "n": int(self.sampled), "seed": int(self.seed), "max_len": SAMPLE_MAX_LEN}

    def describe(self, ident: dict) -> str:
        if ident["kind"] == "corpus":
            return f"{ident['path']} (sha {ident['text_sha']})"
        return f"{ident['n']} stories sampled from the reference (seed {ident['seed']}, ≤{ident['max_len']} tokens)"


def corpus_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"{path}: folder has no *.txt files; point --corpus at a .txt file or a folder of them")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"{path}: no such file or folder; check the --corpus path")


def chunk(seqs: list[np.ndarray], n_ctx: int) -> tuple[list[np.ndarray], int]:
    """Split sequences longer than n_ctx into consecutive n_ctx pieces -> (pieces, #sequences split)."""
    out: list[np.ndarray] = []
    n_split = 0
    for s in seqs:
        if len(s) <= n_ctx:
            out.append(s)
        else:
            n_split += 1
            out += [s[i:i + n_ctx] for i in range(0, len(s), n_ctx)]
    return out, n_split


# -- the cache entry ---------------------------------------------------------------------------
@dataclass
class RefCache:
    dir: Path
    meta: dict
    tokens: np.ndarray  # int32 [N]
    offsets: np.ndarray  # int64 [S+1]
    logp: np.ndarray  # float16 [N, V] memmap
    ce: np.ndarray  # float32 [N]
    ent: np.ndarray  # float32 [N]
    built: bool = False  # True when this run computed it (cold)
    _seqs: list | None = field(default=None, repr=False)

    @property
    def seqs(self) -> list[np.ndarray]:
        if self._seqs is None:
            o = self.offsets
            self._seqs = [self.tokens[o[i]:o[i + 1]] for i in range(len(o) - 1)]
        return self._seqs

    @property
    def content_key(self) -> str | None:
        """What its log-probs are, for HandModel.stream_metrics_rows(ref_key=) to keep their statistics across the
        HandModels of one process: the key its folder was built under (checkpoint and eval set) and the checksum
        of logp16.npy that loading checked (a file rewritten and re-recorded gets a new name)."""
        rec = (self.meta.get("files") or {}).get("logp16.npy") or {}
        key, crc = self.meta.get("key"), rec.get("crc32")
        return None if key is None or crc is None else f"{key}:{crc}"

    @property
    def seq_id(self) -> np.ndarray:
        """[N] index of the sequence each position belongs to."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))

    @property
    def has_next(self) -> np.ndarray:
        """[N] bool: the position has a true next token (not its sequence's last)."""
        m = np.ones(len(self.tokens), bool)
        m[self.offsets[1:] - 1] = False
        return m

    @property
    def next_tokens(self) -> np.ndarray:
        """[N] true next token (-1 at each sequence's last position)."""
        nxt = np.full(len(self.tokens), -1, np.int64)
        hn = self.has_next
        nxt[hn] = self.tokens[1:][hn[:-1]]
        return nxt


def cache_key(ckpt: Checkpoint, ident: dict) -> str:
    # the eval set is its text (file_sha hashes the file names too), not the path as typed: `../shared/…/valid.txt`
    # and its absolute spelling share one entry
    ident = {k: v for k, v in ident.items() if k != "path"}
    blob = json.dumps({"v": CACHE_VERSION, "ckpt": ckpt.hash, "tok": ckpt.tokenizer_hash, "eval": ident}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


REF_FILES = ("tokens.npy", "offsets.npy", "logp16.npy", "ce.npy", "ent.npy")


def read_meta(d: Path, key: str | None = None) -> tuple[dict | None, str | None]:
    """(meta.json of an entry folder, None) when it and every file it records are intact (and it names
    `key`, when given), else (None, why)."""
    from verify.ledger.integrity import check_entry

    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"meta.json is unreadable ({type(e).__name__})"
    if not isinstance(meta, dict):
        return None, "meta.json is not a JSON object"
    if key is not None and meta.get("key") != key:
        return None, f"meta.json names key {str(meta.get('key'))[:24]!r}"
    why = check_entry(d, meta.get("files"))
    return (None, why) if why else (meta, None)


def _load_entry(d: Path, key: str) -> RefCache | None:
    """The entry in folder d if it is intact and is the one for key; else None (reported, discarded)."""
    from verify.ledger.integrity import damaged, discard

    meta, why = read_meta(d, key)
    if why is None:
        n, v, s = meta.get("n_tokens"), meta.get("vocab_size"), meta.get("n_seqs")
        shapes = {f: (meta["files"].get(f) or {}).get("shape") for f in REF_FILES}
        want = {"tokens.npy": [n], "offsets.npy": [s + 1 if type(s) is int else None], "logp16.npy": [n, v],
                "ce.npy": [n], "ent.npy": [n]}
        if shapes != want:
            why = f"its arrays do not fit its {n} tokens x {v} (shapes {shapes})"
    if why is None:
        offsets = np.load(d / "offsets.npy")
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
            why = "offsets.npy is not a list of sequence boundaries"
    if why is not None:
        damaged(d, why)
        discard(d)
        return None
    # mmap_mode "c" (copy-on-write, nothing is copied unless written): a writable array, so the engine's numba
    # kernels get the same argument types as for in-memory log-probs; "r" (read-only) compiled them all a second time
    return RefCache(d, meta, np.load(d / "tokens.npy"), offsets,
                    np.load(d / "logp16.npy", mmap_mode="c"), np.load(d / "ce.npy"), np.load(d / "ent.npy"))


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():  # another process won the race: keep theirs
        shutil.rmtree(tmp)
        return
    tmp.rename(final)


def get_ref_cache(ckpt: Checkpoint, spec: EvalSpec, log=print, cache_root: Path | None = None) -> RefCache:
    """The reference's log-probs on the eval set: from the cache, or computed (torch) and cached."""
    from reference.corpus import cache_dir

    root = (cache_root or cache_dir()) / "ref"
    ident = spec.identity()
    key = cache_key(ckpt, ident)
    d = root / key
    from verify.ledger.integrity import clean_stale

    clean_stale(root)
    if d.exists():
        rc = _load_entry(d, key)
        if rc is not None:
            rc.meta["eval"] = ident  # the same text as when built; reports name it as this call spelled it
            return rc
    log(f"reference cache cold: computing the reference's log-probs for this eval set (once) -> {d}")
    t0 = time.perf_counter()
    oracle = load_oracle(ckpt)
    if spec.corpus is not None:
        from reference.corpus import encode_stories, read_stories

        stories = read_stories(spec.corpus)
        seqs = encode_stories(oracle.tokenizer, stories)
    else:
        seqs = sample_sequences(oracle, spec.sampled, spec.seed)
    seqs, n_split = chunk(seqs, ckpt.n_ctx)
    n_tok = sum(len(s) for s in seqs)
    if n_tok < MIN_TOKENS:
        raise UserError(f"eval text too short: {n_tok} tokens (need at least {MIN_TOKENS}); "
                        "pass a longer --corpus or a larger --sampled")
    tmp = _atomic_dir(d)
    V = ckpt.vocab_size
    tokens = np.concatenate(seqs).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    logp16 = np.lib.format.open_memmap(tmp / "logp16.npy", mode="w+", dtype=np.float16, shape=(n_tok, V))
    ce = np.full(n_tok, np.nan, np.float32)
    ent = np.zeros(n_tok, np.float32)
    prec = {"positions": 0, "kl_err_vs_eval_mean": 0.0, "kl_err_vs_tempered": 0.0,
            "kl_abs_vs_eval_mean": 0.0, "kl_abs_vs_tempered": 0.0}
    batch = max(1, 8192 // ckpt.n_ctx) * 4
    mean_p = np.zeros(V, np.float64)
    sample_rows = []
    for b in range(0, len(seqs), batch):
        group = seqs[b:b + batch]
        lps = oracle.log_probs(group)
        for s, lp, off in zip(group, lps, offsets[b:b + len(group)]):
            T = len(s)
            logp16[off:off + T] = lp.astype(np.float16)
            p = np.exp(lp)
            ent[off:off + T] = -(p * lp).sum(1)
            ce[off:off + T - 1] = -lp[np.arange(T - 1), s[1:]]
            mean_p += p.sum(0)
            if sum(len(r) for r in sample_rows) < 4096:
                sample_rows.append(lp[: 4096])
    logp16.flush()
    del logp16
    # precision cost of storing float16: KL(p_ref || q) from float16 vs float32 log-probs, for two q's:
    # the eval set's mean distribution (a unigram-like q, KL ~ 3) and the reference tempered to 0.7
    # (a close q, like a good hand model). Only a measurement; neither is ever reported as a baseline.
    lp32 = np.concatenate(sample_rows)[:4096].astype(np.float32)
    lp16 = lp32.astype(np.float16).astype(np.float32)
    log_mean = np.log(np.maximum(mean_p / n_tok, 1e-30)).astype(np.float32)
    tempered = 0.7 * lp32
    tempered -= _logsumexp(tempered)[:, None]
    for name, q in (("eval_mean", np.broadcast_to(log_mean, lp32.shape)), ("tempered", tempered)):
        k32 = kl_rows(lp32, q)
        k16 = kl_rows(lp16, q)
        prec[f"kl_abs_vs_{name}"] = float(k32.mean())
        prec[f"kl_err_vs_{name}"] = float(abs(k16.mean() - k32.mean()))
    prec["positions"] = int(len(lp32))
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "ce.npy", ce)
    np.save(tmp / "ent.npy", ent)
    from verify.ledger.integrity import record

    files = {f: record(tmp / f) for f in REF_FILES}
    meta = {"version": CACHE_VERSION, "key": key, "files": files, "checkpoint": str(ckpt.path), "checkpoint_hash": ckpt.hash,
            "tokenizer_hash": ckpt.tokenizer_hash, "eval": ident, "n_tokens": int(n_tok), "n_seqs": len(seqs),
            "n_split": int(n_split), "n_ctx": ckpt.n_ctx, "vocab_size": V, "float16_precision": prec,
            "build_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _publish(tmp, d)
    rc = _load_entry(d, key)
    if rc is None:
        raise UserError(f"{d}: the reference cache entry just built does not read back intact; "
                        "check the disk under $HANDMODEL_CACHE (full? failing?) and re-run")
    rc.built = True
    return rc


_ORACLES: dict = {}


def load_oracle(ckpt: Checkpoint):
    """The torch reference (imported here, lazily: a warm verify never gets this far)."""
    if ckpt.path not in _ORACLES:
        from reference.oracle import Oracle

        _ORACLES[ckpt.path] = Oracle.load(ckpt.path)
    return _ORACLES[ckpt.path]


def sample_sequences(oracle, n: int, seed: int, max_len: int = SAMPLE_MAX_LEN, batch: int = 32) -> list[np.ndarray]:
    """n token sequences [EOT] story [EOT] sampled from the reference at temperature 1 (fixed seed)."""
    if n < 1:
        raise UserError(f"--sampled must be >= 1 (got {n})")
    from reference.sampling import sample_stories  # key/value cache: one position per step

    return sample_stories(oracle.model, oracle.eot, n, seed, max_len, batch=batch)


# -- small numerics shared by everything --------------------------------------------------------
def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(1)
    return m + np.log(np.exp(x - m[:, None]).sum(1))


def kl_rows(ref_logp: np.ndarray, q_logp: np.ndarray) -> np.ndarray:
    """Per-row KL(p_ref || q) = sum_v p_ref (log p_ref - log q), in log space, float64 accumulation.

    p_ref is renormalised (float16-stored log-probs sum to 1 only approximately), exactly as the hand
    model's stream_metrics does: KL = (sum p r - sum p q) / S - log S with p = exp(r), S = sum p."""
    r = np.asarray(ref_logp, np.float32)
    q = np.asarray(q_logp, np.float32)
    p = np.exp(r)
    S = p.sum(1, dtype=np.float64)
    kl = (p * (r - q)).sum(1, dtype=np.float64) / S - np.log(S)
    return np.maximum(kl, 0.0)
