"""Batched sampling from the reference with a key/value cache: one token per step costs one position's
forward (O(T) attention), not a whole prefix's (O(T^2) per step, ~8x slower over a 256-token story).

The step is the model's forward (model.py) restricted to the newest position; tests hold its logits
equal to the full forward's. Draws come from one torch.Generator in a fixed order, so the same
(n, seed, max_len, batch) gives the same stories on the same machine (float rounding differs across
CPUs, as for the full forward).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .model import OneLayerTransformer


class KVCache:
    """Keys and values of every position so far, [B, H, T, Dh] each (grown by one position per step)."""

    def __init__(self, model: OneLayerTransformer, B: int, max_len: int):
        c = model.cfg
        self.model = model
        self.k = torch.empty(B, c.n_heads, max_len, c.d_head)
        self.v = torch.empty(B, c.n_heads, max_len, c.d_head)
        self.t = 0

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """tok [B] int64, the token at position self.t -> logits [B, V] for the next token."""
        m, t = self.model, self.t
        x0 = m.W_E[tok] + m.W_pos[t]  # [B, D]
        q, k, v = m.attn_qkv(m.ln1(x0))  # [B, H, Dh]
        self.k[:, :, t] = k
        self.v[:, :, t] = v
        K, Vv = self.k[:, :, : t + 1], self.v[:, :, : t + 1]
        scores = torch.einsum("bhe,bhke->bhk", q, K) / math.sqrt(m.cfg.d_head)
        z = torch.einsum("bhk,bhke->bhe", scores.softmax(-1), Vv)  # [B, H, Dh]
        x1 = x0 + torch.einsum("bhe,hed->bd", z, m.W_O) + m.b_O
        x2 = x1 + m.mlp(x1)
        self.t = t + 1
        return m.unembed(x2)


def sample_stories(model: OneLayerTransformer, eot: int, n: int, seed: int, max_len: int,
                   batch: int = 64) -> list[np.ndarray]:
    """n int32 sequences [EOT] story [EOT] at temperature 1; a story stops at EOT or at max_len tokens."""
    max_len = min(max_len, model.cfg.n_ctx)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for b in range(0, n, batch):
            B = min(batch, n - b)
            ids = torch.full((B, max_len), eot, dtype=torch.int64)
            lengths = torch.full((B,), max_len, dtype=torch.int64)
            done = torch.zeros(B, dtype=torch.bool)
            cache = KVCache(model, B, max_len)
            t = 1
            while t < max_len and not bool(done.all()):
                logits = cache.step(ids[:, t - 1]).float()
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
                nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
                ids[:, t] = nxt
                t += 1
                newly = (~done) & (nxt == eot)
                lengths[newly] = t
                done |= newly
            for r in range(B):
                out.append(ids[r, : int(lengths[r])].numpy().astype(np.int32))
    return out
