"""What the ceiling scripts share: training windows, each head's mean value per source token, the rows those
values write through the unembedding, and the cuts a rule file's budget forces (top-k entries per row).
Everything here reads train.txt only; the scripts evaluate on valid.txt."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from verify.claims import ref_side as R
from verify.discover.common import sample_windows
from verify.ledger.data import checkpoint_info, load_oracle

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "tinystories"
T = 128  # window length, as the component checks


def centred(x: torch.Tensor) -> torch.Tensor:
    """float64, centred over the last axis (the vocabulary): a logit vector up to the constant that moves nothing."""
    x = x.double()
    return x - x.mean(-1, keepdim=True)


def top_k(rows: torch.Tensor, k: int, positive: bool = False) -> torch.Tensor:
    """Keep each row's k entries of largest |value| (positive: the k largest values), others 0. A constant added
    to a whole row moves no probability (it is a per-position constant wherever a row is added), so each row is
    shifted to its median first: the entries dropped are the ones nearest the row's bulk."""
    if k <= 0 or k >= rows.shape[-1]:
        return rows
    rows = rows - rows.median(-1, keepdim=True).values
    idx = (rows if positive else rows.abs()).topk(k, dim=-1).indices
    return torch.zeros_like(rows).scatter(-1, idx, rows.gather(-1, idx))


@dataclass
class ValueStats:
    """Per head and source token, the mean value the head reads there (through LN1 at that position)."""
    windows: np.ndarray  # [n, T] the training windows
    vbar: torch.Tensor  # [H, V, Dh] float64; 0 for tokens never seen
    count: torch.Tensor  # [V] positions per token
    sigma: float  # the mean LNf scale over the positions

    @property
    def seen(self) -> torch.Tensor:
        return self.count > 0


def training_windows(oracle, n: int) -> np.ndarray:
    """[n, T] windows from the start of train.txt."""
    return sample_windows(oracle, SHARED / "train.txt", n * T, window=T, max_chars=n * T * 8)[:n]


class Shipped(NamedTuple):
    ckpt: object  # verify.ledger.data.Checkpoint
    oracle: object  # reference.oracle.Oracle
    train: np.ndarray  # [n_train, T] training_windows


def shipped(n_train: int) -> Shipped:
    """The shipped reference and its first n_train training windows; torch on one thread (the scripts run beside
    other work)."""
    torch.set_num_threads(1)
    ckpt = checkpoint_info(None)
    oracle = load_oracle(ckpt)
    return Shipped(ckpt, oracle, training_windows(oracle, n_train))


@torch.inference_mode()
def value_stats(oracle, train: np.ndarray, each: Callable[[R.RefBatch], None] | None = None) -> ValueStats:
    """One reference pass over the training windows; `each(batch)` sees every batch (for other tables)."""
    model, V, H = oracle.model, oracle.cfg.vocab_size, oracle.cfg.n_heads
    Dh = model.W_V.shape[-1]
    vsum = torch.zeros(H, V, Dh, dtype=torch.float64)
    cnt = torch.zeros(V, dtype=torch.float64)
    sig = 0.0
    for s in range(0, len(train), 8):
        b = R.run_batch(model, train[s:s + 8])
        tok = b.idx.reshape(-1)
        cnt.index_add_(0, tok, torch.ones(len(tok), dtype=torch.float64))
        vsum.index_add_(1, tok, b.v.double().reshape(-1, H, Dh).transpose(0, 1))
        sig += float(b.scale.double().sum())
        if each is not None:
            each(b)
    return ValueStats(train, vsum / cnt.clamp_min(1)[None, :, None], cnt, sig / float(cnt.sum()))


def head_rows(model, st: ValueStats) -> torch.Tensor:
    """[H, V, V] per head and source token, what a unit of attention on it writes: vbar W_O · γ/σ̄ @ W_U, centred
    (σ̄: a rule cannot read the per-position LNf scale)."""
    g = model.ln_final.weight.double() / st.sigma
    return torch.stack([centred((st.vbar[h] @ model.W_O[h].double()) * g @ model.W_U.double())
                        for h in range(st.vbar.shape[0])])
