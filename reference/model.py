"""The reference oracle: a one-layer, pre-LayerNorm transformer, whole in one file.

x0 = E[tok] + P[pos]                                   # embed
x1 = x0 + sum_h Attn_h(LN1(x0))                        # one attention block, n_heads heads
x2 = x1 + W_out^T ReLU(W_in^T LN2(x1) + b_in) + b_out  # one MLP (ReLU: a neuron is exactly off or on)
                                                       # (imported models: cfg.act_fn, see below)
logits = LNf(x2) @ W_U + b_U                           # unembed

Weights are stored per head (W_Q[h], W_K[h], W_V[h], W_O[h]) as in TransformerLens, so the QK and OV
circuits of a head can be read straight off the parameters. `forward(..., cache=...)` records every
intermediate under a stable hook name (see HOOKS).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Stable hook names filled by forward(cache=dict). B=batch, T=positions, H=heads, D=d_model, N=d_mlp.
HOOKS = {
    "embed": "E[tok]                            [B, T, D]",
    "pos_embed": "P[pos]                        [B, T, D]  (broadcast over B)",
    "resid_pre": "x0 = embed + pos_embed        [B, T, D]",
    "attn.scores": "q.k / sqrt(d_head) (1 if not scale_attn), -inf masked   [B, H, T, T]",
    "attn.pattern": "softmax of scores (rows sum to 1)            [B, H, T, T]",
    "attn.head_out": "each head's write into the residual, b_O excluded   [B, T, H, D]",
    "attn_out": "sum of head_out + b_O          [B, T, D]",
    "resid_mid": "x1 = x0 + attn_out            [B, T, D]",
    "mlp.pre": "neuron pre-activations         [B, T, N]",
    "mlp.post": "act(mlp.pre) (ReLU unless cfg.act_fn says otherwise)  [B, T, N]",
    "mlp_out": "MLP write into the residual     [B, T, D]",
    "resid_post": "x2 = x1 + mlp_out            [B, T, D]",
    "ln_final.scale": "LNf's per-position std (the denominator)  [B, T, 1]",
    "logits": "unembedded logits               [B, T, V]",
}


ACT_FNS = ("relu", "gelu", "gelu_new", "solu_ln")  # gelu: exact erf; gelu_new: tanh approximation (GPT-2)
BASE_FIELDS = ("vocab_size", "n_ctx", "d_model", "n_heads", "d_mlp", "ln_eps")
ARCH_DEFAULTS = {"act_fn": "relu", "scale_attn": True, "window": 0}


def arch_problem(d: dict) -> str | None:
    """Why a config dict's architecture fields are invalid, or None. Absent fields take their defaults."""
    act = d.get("act_fn", "relu")
    if act not in ACT_FNS:
        return f"act_fn={act!r} must be one of {', '.join(ACT_FNS)}"
    if not isinstance(d.get("scale_attn", True), bool):
        return f"scale_attn={d['scale_attn']!r} must be true or false"
    w = d.get("window", 0)
    if not isinstance(w, int) or isinstance(w, bool) or w < 0:
        return f"window={w!r} must be an integer >= 0 (0: global attention)"
    return None


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    n_ctx: int = 256  # longest sequence the position embedding covers
    d_model: int = 256
    n_heads: int = 4
    d_mlp: int = 1024
    ln_eps: float = 1e-5
    # Architecture variants for imported models (reference/interop.py). Their defaults are the shipped
    # model; to_dict leaves defaults out, so configs written before these fields existed stay byte-identical.
    act_fn: str = "relu"  # one of ACT_FNS; "solu_ln" adds a LayerNorm over the neurons (ln_mlp)
    scale_attn: bool = True  # False: scores are q.k unscaled (GPT-Neo)
    window: int = 0  # >0: a query sees only the last `window` keys (GPT-Neo local attention)
    # d_mlp = 0 is an attention-only model: no neurons, the MLP writes exactly zero.

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if k in BASE_FIELDS or v != ARCH_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class OneLayerTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        self.cfg = cfg
        V, T, D, H, Dh, N = cfg.vocab_size, cfg.n_ctx, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
        self.W_E = nn.Parameter(torch.randn(V, D) * 0.02)  # [V, D]
        self.W_pos = nn.Parameter(torch.randn(T, D) * 0.01)  # [T, D]
        self.ln1 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.W_Q = nn.Parameter(torch.randn(H, D, Dh) / math.sqrt(D))  # [H, D, Dh]
        self.W_K = nn.Parameter(torch.randn(H, D, Dh) / math.sqrt(D))
        self.W_V = nn.Parameter(torch.randn(H, D, Dh) / math.sqrt(D))
        self.b_Q = nn.Parameter(torch.zeros(H, Dh))
        self.b_K = nn.Parameter(torch.zeros(H, Dh))
        self.b_V = nn.Parameter(torch.zeros(H, Dh))
        self.W_O = nn.Parameter(torch.randn(H, Dh, D) / math.sqrt(2 * D))  # [H, Dh, D]
        self.b_O = nn.Parameter(torch.zeros(D))
        self.ln2 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.W_in = nn.Parameter(torch.randn(D, N) / math.sqrt(D))  # [D, N]
        self.b_in = nn.Parameter(torch.zeros(N))
        self.W_out = nn.Parameter(torch.randn(N, D) / math.sqrt(2 * N))  # [N, D]
        self.b_out = nn.Parameter(torch.zeros(D))
        if cfg.act_fn == "solu_ln":  # only then: other checkpoints keep exactly their old state dict
            self.ln_mlp = nn.LayerNorm(N, eps=cfg.ln_eps)
        self.ln_final = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.W_U = nn.Parameter(torch.randn(D, V) * 0.02)  # [D, V]
        self.b_U = nn.Parameter(torch.zeros(V))
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        if cfg.window:  # local attention: key j visible from query i iff i - window < j <= i
            causal &= ~torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-cfg.window)
        self.register_buffer("causal", causal, persistent=False)  # [T, T]

    # -- pieces, reused by the oracle's path helpers -------------------------------------------
    def attn_qkv(self, x_ln: torch.Tensor):
        """x_ln [..., D] -> q, k, v each [..., H, Dh]."""
        q = torch.einsum("...d,hde->...he", x_ln, self.W_Q) + self.b_Q
        k = torch.einsum("...d,hde->...he", x_ln, self.W_K) + self.b_K
        v = torch.einsum("...d,hde->...he", x_ln, self.W_V) + self.b_V
        return q, k, v

    def mlp_pre(self, x_ln: torch.Tensor) -> torch.Tensor:
        return x_ln @ self.W_in + self.b_in  # [..., N]

    def mlp_act(self, pre: torch.Tensor) -> torch.Tensor:
        """Neuron pre-activations [..., N] -> what W_out reads (mlp.post): the activation, and for SoLU its LN."""
        act = self.cfg.act_fn
        if act == "relu":
            return F.relu(pre)
        if act == "gelu":
            return F.gelu(pre)
        if act == "gelu_new":
            return F.gelu(pre, approximate="tanh")
        return self.ln_mlp(pre * pre.softmax(dim=-1))  # solu_ln

    @property
    def attn_scale(self) -> float:
        """What q.k is divided by: sqrt(d_head), or 1 for unscaled (GPT-Neo) attention."""
        return math.sqrt(self.cfg.d_head) if self.cfg.scale_attn else 1.0

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """MLP write for a residual x [..., D] (LN2 included)."""
        return self.mlp_act(self.mlp_pre(self.ln2(x))) @ self.W_out + self.b_out

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x) @ self.W_U + self.b_U  # [..., V]

    # -- the forward pass ------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, cache: dict | None = None, ablate_attn: bool = False) -> torch.Tensor:
        """idx [B, T] int64 -> logits [B, T, V]. Fills `cache` (if given) under the HOOKS names."""
        B, T = idx.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"sequence length {T} exceeds the model's context n_ctx={self.cfg.n_ctx}")
        embed = self.W_E[idx]  # [B, T, D]
        pos = self.W_pos[:T]  # [T, D]
        x0 = embed + pos
        if ablate_attn:
            attn_out = torch.zeros_like(x0)
        else:
            q, k, v = self.attn_qkv(self.ln1(x0))  # [B, T, H, Dh]
            scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / self.attn_scale  # [B, H, T, T]
            scores = scores.masked_fill(~self.causal[:T, :T], float("-inf"))
            pattern = scores.softmax(dim=-1)  # [B, H, T, T]
            z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)  # [B, T, H, Dh]
            head_out = torch.einsum("bqhe,hed->bqhd", z, self.W_O)  # [B, T, H, D]
            attn_out = head_out.sum(dim=2) + self.b_O
        x1 = x0 + attn_out
        pre = self.mlp_pre(self.ln2(x1))  # [B, T, N]
        post = self.mlp_act(pre)
        mlp_out = post @ self.W_out + self.b_out
        x2 = x1 + mlp_out
        logits = self.unembed(x2)
        if cache is not None:
            cache.update({
                "embed": embed, "pos_embed": pos.expand(B, T, -1), "resid_pre": x0,
                "attn_out": attn_out, "resid_mid": x1, "mlp.pre": pre, "mlp.post": post,
                "mlp_out": mlp_out, "resid_post": x2, "logits": logits,
                "ln_final.scale": torch.sqrt(x2.var(-1, unbiased=False, keepdim=True) + self.cfg.ln_eps),
            })
            if not ablate_attn:
                cache.update({"attn.scores": scores, "attn.pattern": pattern, "attn.head_out": head_out})
        return logits

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
