"""The rule semantics in torch: the differentiable twin of handmodel/twin.py, batched over windows.

`fit` (torchrules.TorchRules: every number of a rule file is a parameter slot) and the joint fit of
`suggest` (jointfit.Net: a draft's dense tables) both build their logits from these functions, so what
a [[head]], [[head_out]], [[skip]] or [[neuron]] computes is written here once for torch.
tests/test_torchsem.py holds this module equal to the numpy twin on random rulesets.

Shapes: windows W [B, T] int64 token ids; a per-position value [B, T]; an attention pattern A [B, T, T]
(row t is the attention from position t over sources s, 0 for s > t); logits [B, T, V].
"""
from __future__ import annotations

import torch


def distances(T: int) -> torch.Tensor:
    """[T, T] int64 t − s (negative above the diagonal: a later source)."""
    return torch.arange(T)[:, None] - torch.arange(T)[None, :]


def position_scores(table: torch.Tensor, default: torch.Tensor, T: int) -> torch.Tensor:
    """[T, T] a head's position score of each (t, s): table[t − s] where the table has that distance
    (table [D] over d = 0..D−1), else default (a 0-d tensor). Entries with s > t are masked later."""
    D = table.shape[0]
    full = torch.cat([table[:T], default.reshape(1).expand(max(T - D, 0))]) if D < T else table[:T]
    return full[distances(T).clamp(min=0)]


def pair_scores(now_hit: torch.Tensor, src_hit: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[B, T, T] one score entry {now, src, w}: w where seq[t] ∈ now and seq[s] ∈ src (now_hit, src_hit:
    bool [B, T])."""
    return w * (now_hit[:, :, None] & src_hit[:, None, :]).to(w.dtype)


def causal_attention(score: torch.Tensor) -> torch.Tensor:
    """[B, T, T] attention = softmax over s ≤ t of the scores [B, T, T] (or [T, T], broadcast)."""
    T = score.shape[-1]
    return torch.softmax(score.masked_fill(distances(T) < 0, float("-inf")), -1)


def attention_mass(A: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Attention mass on weighted sources: Σ_s A[b, t, s] · weight[b, s] ([B, T] for weight [B, T]; [B, T, M]
    for M weightings at once, weight [B, T, M]). A head_out's source mass (weight: 1 on `src`), a
    neuron's attend input (weight: the set's weights)."""
    if weight.dim() == 2:
        return (A * weight[:, None, :].to(A.dtype)).sum(-1)
    return A @ weight.to(A.dtype)


def earlier_any(hit: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: a position before t is a hit (hit: bool [B, T]); a [[skip]]'s source, a neuron's `present`."""
    n = hit.to(torch.int32)
    return torch.cumsum(n, dim=1) - n > 0


def neuron_activation(pre: torch.Tensor) -> torch.Tensor:
    """A neuron's activation from its pre-activation (ReLU, as twin.neuron_activation)."""
    return torch.relu(pre)


def copy_logits(logits: torch.Tensor, W: torch.Tensor, weighted_attention: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] plus each copy term: weighted_attention[b, t, s] (copy weight × attention on a source
    position s) added to the logit of that position's own token W[b, s]."""
    B, T = W.shape
    return logits.scatter_add(-1, W[:, None, :].expand(B, T, T), weighted_attention.to(logits.dtype))
