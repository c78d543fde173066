"""The reference's side of the component checks: one cached forward pass per batch of windows, the
context means used by mean-ablation, and the ablated forward passes (torch; never imported by handmodel/).

Hook names are reference/model.py's HOOKS ("mlp.post", "attn.pattern", "attn.head_out", "resid_mid",
"resid_post", "ln_final.scale"); the per-head values v (not a hook: the OV output of one source
position needs them) are recomputed from "resid_pre" exactly as the forward pass does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class RefBatch:
    """A batch of windows [B, T] through the reference, with the hooks the checks read (torch tensors)."""
    idx: torch.Tensor  # [B, T] int64
    lp: torch.Tensor  # [B, T, V] next-token log-probs (float32)
    post: torch.Tensor  # [B, T, N] mlp.post
    pattern: torch.Tensor  # [B, H, T, T] attn.pattern
    head_out: torch.Tensor  # [B, T, H, D] attn.head_out
    v: torch.Tensor  # [B, T, H, Dh] per-head values
    resid_mid: torch.Tensor  # [B, T, D]
    resid_post: torch.Tensor  # [B, T, D]
    scale: torch.Tensor  # [B, T, 1] ln_final.scale


@dataclass
class RefMeans:
    """Means over every position of the context set: what mean-ablation puts in a component's place."""
    post: torch.Tensor  # [N] each neuron's mean activation
    v: torch.Tensor  # [H, Dh] each head's mean value vector
    head_out: torch.Tensor  # [H, D] each head's mean write
    embed: torch.Tensor  # [D] the mean token embedding (token frequencies of the contexts)


@torch.inference_mode()
def run_batch(model, windows: np.ndarray) -> RefBatch:
    idx = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    cache: dict = {}
    logits = model(idx, cache=cache)
    _, _, v = model.attn_qkv(model.ln1(cache["resid_pre"]))
    return RefBatch(idx, F.log_softmax(logits.float(), -1), cache["mlp.post"], cache["attn.pattern"], cache["attn.head_out"],
                    v, cache["resid_mid"], cache["resid_post"], cache["ln_final.scale"])


@torch.inference_mode()
def context_means(model, batches: list[np.ndarray]) -> RefMeans:
    n = 0
    acc = None
    for w in batches:
        b = run_batch(model, w)
        emb = model.W_E[b.idx]
        s = [b.post.sum((0, 1)), b.v.sum((0, 1)), b.head_out.sum((0, 1)), emb.sum((0, 1))]
        acc = s if acc is None else [a + x for a, x in zip(acc, s)]
        n += b.idx.numel()
    return RefMeans(*[a / n for a in acc])


@torch.inference_mode()
def lp_of_resid(model, x2: torch.Tensor) -> torch.Tensor:
    """Log-probs from a final residual [..., D]."""
    return F.log_softmax(model.unembed(x2).float(), -1)


@torch.inference_mode()
def neuron_ablated(model, b: RefBatch, means: RefMeans, n: int, bi: np.ndarray, ti: np.ndarray) -> torch.Tensor:
    """[k, V] log-probs at positions (bi, ti) with neuron n mean-ablated (nothing reads the MLP after it)."""
    delta = (means.post[n] - b.post[bi, ti, n])[:, None] * model.W_out[n]
    return lp_of_resid(model, b.resid_post[bi, ti] + delta)


@torch.inference_mode()
def source_path_ablated(model, b: RefBatch, means: RefMeans, h: int, src_pos: torch.Tensor, bi: np.ndarray,
                        ti: np.ndarray) -> torch.Tensor:
    """[k, V] log-probs at (bi, ti) with head h's values at the source positions mean-ablated, on the direct
    path (the MLP input is held fixed: a head_out rule stands for the head's direct write only).
    src_pos [B, T] bool marks the source positions."""
    a = b.pattern[bi, h, ti] * src_pos[bi].float()  # [k, T] attention on the sources
    dv = means.v[h][None, None] - b.v[bi, :, h]  # [k, T, Dh]
    delta = torch.einsum("kt,kte->ke", a, dv) @ model.W_O[h]
    return lp_of_resid(model, b.resid_post[bi, ti] + delta)


@torch.inference_mode()
def head_ablated(model, b: RefBatch, means: RefMeans, h: int) -> torch.Tensor:
    """[B, T, V] log-probs with head h's write mean-ablated (the MLP recomputed from the changed residual)."""
    x1 = b.resid_mid - b.head_out[:, :, h] + means.head_out[h]
    return lp_of_resid(model, x1 + model.mlp(x1))


@torch.inference_mode()
def token_alone_ablated(model, b: RefBatch, means: RefMeans) -> torch.Tensor:
    """[B, T, V] log-probs with the current token's token-alone path mean-ablated: the token's embedding
    E[tok] is replaced by the mean embedding in the residual that the direct path and the MLP read, while
    each head's output (hook attn.head_out, and b_O) keeps its clean value, so attention keeps what it read.
    The position embedding is kept. x1' = resid_mid − E[tok] + Ē; x2' = x1' + MLP(x1') (the MLP recomputed)."""
    x1 = b.resid_mid + (means.embed - model.W_E[b.idx])
    return lp_of_resid(model, x1 + model.mlp(x1))
