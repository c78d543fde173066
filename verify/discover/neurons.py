"""Neuron drafts for `handmodel suggest`: [[neuron]] rules for the reference neurons whose firing depends
most on context (not just on the current token), from activation statistics on training text.

For reference neuron n with activation act_t (ReLU output) on training positions:
* context importance = E[(act_t − E[act | c_t])²] · ‖logit effect of n‖² — the part of the neuron a
  bigram table cannot carry, weighted by how much it moves the logits;
* `now` inputs: E[act | c] for the tokens it fires on most;
* `attend` inputs: the residual act_t − E[act | c_t] regressed (one source at a time) on the hand
  heads' attention mass on a source token; the strongest (head, source) pairs are kept;
* `next`: the tokens the neuron's output pushes most (both signs), their numbers fitted afterwards by
  moment matching with the hand activation as the feature value (suggest.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from handmodel import twin


@dataclass
class NeuronDraft:
    neuron: int
    now_tok: np.ndarray
    now_w: np.ndarray
    attend: list[tuple[int, int, float]]  # (head draft index, source token, weight)
    support: np.ndarray
    delta: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ctx_share: float = 0.0  # share of the neuron's activation variance that is contextual
    mean_act: float = 0.0
    threshold: float = 0.0  # moved only by the joint fit (jointfit.py)
    # class-level entries, joint fit with neuron_classes only: (class index, w) / (head index, class index, w)
    now_cls: list = field(default_factory=list)
    attend_cls: list = field(default_factory=list)
    next_cls: list = field(default_factory=list)
    # shared weighted sets (joint fit with shared patterns): (pattern index, x) / (head index, pattern index, x)
    next_sets: list = field(default_factory=list)
    attend_sets: list = field(default_factory=list)


def reference_activations(oracle, windows: np.ndarray, batch: int = 16) -> np.ndarray:
    """[N, d_mlp] float32 MLP post-activations on the windows (flattened)."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(windows), batch):
            cache: dict = {}
            oracle.model(torch.from_numpy(windows[s:s + batch]), cache=cache)
            post = cache["mlp.post"].float().numpy()
            out.append(post.reshape(-1, post.shape[-1]))
    return np.concatenate(out)


def output_effects(oracle, ln_scale: float) -> np.ndarray:
    """[d_mlp, V] centred logit effect of each neuron at activation 1 (through LNf at a typical scale)."""
    import torch

    m = oracle.model
    with torch.inference_mode():
        w = m.W_out - m.W_out.mean(1, keepdim=True)
        eff = ((w * m.ln_final.weight / ln_scale) @ m.W_U).numpy()
    return eff - eff.mean(1, keepdims=True)


def draft_neurons(oracle, acts: np.ndarray, tokens: np.ndarray, masses, ln_scale: float, n_neurons: int = 32,
                  n_now: int = 24, n_attend: int = 8, k_next: int = 24, min_count: int = 20) -> list[NeuronDraft]:
    """`masses`: [(head index, source tokens [S], masses [N, S])] from the head drafts."""
    V = oracle.cfg.vocab_size
    N, D = acts.shape
    counts = np.bincount(tokens, minlength=V).astype(np.float64)
    sums = np.zeros((V, D))
    np.add.at(sums, tokens, acts)
    cond = sums / np.maximum(counts, 1)[:, None]  # E[act | c]
    resid = acts - cond[tokens]
    var_ctx = (resid ** 2).mean(0)
    var_all = acts.var(0) + 1e-12
    eff = output_effects(oracle, ln_scale)
    score = var_ctx * (eff ** 2).sum(1)
    chosen = np.argsort(-score)[:n_neurons]
    out = []
    for n in chosen:
        c = cond[:, n] * (counts >= min_count)
        imp = c * np.sqrt(counts)
        now = np.argsort(-imp)[:n_now]
        now = now[c[now] > 0.05 * max(c.max(), 1e-9)]
        r = resid[:, n]
        pairs = []
        for hi, src, M in masses:
            den = (M.astype(np.float64) ** 2).sum(0) + 1e-9
            beta = (r @ M) / den
            strength = np.abs(beta) * np.sqrt(den)
            for j in np.argsort(-strength)[:n_attend]:
                pairs.append((strength[j], hi, int(src[j]), float(beta[j])))
        pairs.sort(key=lambda x: -x[0])
        e = eff[n]
        up = np.argsort(-e)[: k_next // 2]
        down = np.argsort(e)[: k_next - len(up)]
        out.append(NeuronDraft(int(n), now.astype(np.int64), c[now].astype(np.float64),
                               [(hi, s, b) for _, hi, s, b in pairs[:n_attend]],
                               np.concatenate([up, down]).astype(np.int64), np.zeros(len(up) + len(down)),
                               float(var_ctx[n] / var_all[n]), float(acts[:, n].mean())))
    return out


def hand_activation(d: NeuronDraft, tokens: np.ndarray, masses_by_head: dict) -> np.ndarray:
    """[N] the draft neuron's activation: ReLU(Σ now[c_t] + Σ attend w · mass) (threshold 0)."""
    now = np.zeros(int(tokens.max()) + 1 if len(tokens) else 1)
    keep = d.now_tok < len(now)
    now[d.now_tok[keep]] = d.now_w[keep]
    pre = now[tokens].astype(np.float64)
    for hi, s, w in d.attend:
        src, M = masses_by_head[hi]
        j = int(np.flatnonzero(src == s)[0])
        pre += w * M[:, j]
    return twin.neuron_activation(pre)
