"""Faithfulness anchors of the joint fit (issue 21): `suggest --faithful λ` adds λ × (anchor terms) to the
joint fit's KL(p_ref ‖ p_hand), each term pulling a drafted rule toward the reference component it names,
so that what the component checks ask of a rule (docs/claims.md, "Component checks") is earned by the
rule being true of that component, not by the fit. λ = 0 computes nothing here and leaves the fit as it was.

Each term is normalised to be about 1 for a rule that ignores its component and 0 for one that matches it,
and mirrors one check:

* `[[head]]` → the reference head's attention pattern: KL(a_ref ‖ a_hand) per query position, averaged
  (the readout compares the patterns by their shared mass Σ_s min(a_ref, a_hand); the KL is its smooth
  stand-in and is 0 exactly when the shared mass is 1);
* `[[neuron]]` activation → the reference neuron's `mlp.post` on the same positions: mean squared
  difference over the reference neuron's variance (the readout: Pearson r of the two activations);
* `[[neuron]]` `next` (token, class and shared-pattern entries summed into the [V] vector it writes) → the
  neuron's write W_out[n] through the final LayerNorm at the typical scale and the unembedding, centred
  over the vocabulary, per unit of activation: squared error over ‖target‖² (the intervention:
  mean-ablating the neuron moves log p by (post − mean)·that vector; the hand rule, mean-ablated, by
  (act − mean)·next; with both anchors the two agree in direction and size);
* `[[head_out]]` rows → the head's OV output per unit of attention on the row's source, read through the
  unembedding at each position's own final-LayerNorm scale and centred over the vocabulary, averaged over
  the training positions where the reference head puts ≥ 0.05 attention on that source, on the tokens the
  row writes (the readout's quantity, verify/claims/measure.py `_head_out`): squared error over ‖target‖²;
* the prior → mean over positions of log p_ref − mean_v log p_ref (the prior readout's target): squared
  error over its variance. The target has mean 0 and a constant added to the dense prior changes no
  distribution, so joint_fit centres the prior before its first anchored step (the readout now centres the
  prior's logits too; before, a written prior at mean −10 nats scored 0.164, the same prior centred 0.670).

* bigram rows (class and token rows) → the current token's token-alone write (the bigram check's component:
  log p_ref − log p_ref with E[tok] mean-ablated in the residual the direct path and the MLP read, heads held;
  verify/claims/ref_side.py `token_alone_ablated`), centred over the vocabulary, averaged over the training
  positions where the row acts (a token row: its token; a class row: its class's tokens), on the row's
  tokens: squared error over ‖target‖², mean over rows. The write is small (0.2 nats rms on valid.txt against
  a row's several nats: research/README.md, "What the current token writes"), so this term starts far above 1
  for a row fitted to the output, and a large λ hands the bigram to the head paths that carry it.

Not anchored: copy rules (a copy rule's readout asks whether the head's OV output ranks each source token
itself high, which no copy weight changes).
Every target is read from the reference on TRAINING windows only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_MASS = 0.05  # as verify/claims/measure.py: a head_out acts where the head puts this much on its sources
MIN_POSITIONS = 4  # a head_out row gets a target when this many training positions attend to its source


@dataclass
class AnchorTargets:
    """What each drafted rule is anchored to, read off the reference on training windows."""
    head_ref: np.ndarray  # [H] reference head of each hand head
    neuron_ref: np.ndarray  # [n] reference neuron of each hand neuron
    neuron_var: np.ndarray  # [n] variance of that neuron's activation on the drafting sample
    neuron_next: np.ndarray  # [n, V] centred logit effect of the neuron per unit of activation
    ho_target: list[np.ndarray]  # per hand head: target of every head_out entry, in the net's ho_v layout
    ho_weight: list[np.ndarray]  # per hand head: entry weight 1 / (‖row target‖² · rows with a target), 0: none
    bigram_target: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.float32), np.zeros(0, np.float32))  # cr_v, tr_v layout
    bigram_weight: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.float32), np.zeros(0, np.float32))  # as ho_weight


@dataclass
class AnchorTerms:
    """One evaluation of the anchor terms (each ~1 for a rule that ignores its component, 0 when it matches)."""
    attention: float
    activation: float
    next: float
    head_out: float
    prior: float
    bigram: float = 0.0

    @property
    def total(self) -> float:
        return self.attention + self.activation + self.next + self.head_out + self.prior + self.bigram

    def __str__(self) -> str:
        return ", ".join(f"{k} {float(v):.3f}" for k, v in self.__dict__.items())


def head_out_targets(oracle, windows: np.ndarray, head_refs: list[int], outs, batch: int = 8):
    """Per hand head, (targets, weights) over its head_out entries in jointfit's layout (the rows of that
    head with a support, in `outs` order): the head's OV output per unit of attention on the row's source,
    at each position's own LNf scale, through W_U, centred over the vocabulary, averaged over the windows'
    positions where the head puts ≥ MIN_MASS on the source (verify/claims/measure.py `_head_out`)."""
    import torch

    from verify.claims.ref_side import run_batch

    model = oracle.model
    V = oracle.cfg.vocab_size
    gamma, W_U = model.ln_final.weight.detach(), model.W_U.detach()
    rows = [[o for o in outs if o.head == hi and len(o.support)] for hi in range(len(head_refs))]
    idx = []
    for mine in rows:
        m = np.full(V, len(mine), np.int64)
        m[[o.src for o in mine]] = np.arange(len(mine))
        idx.append(torch.from_numpy(m))
    Dh = model.W_O.shape[1]
    S = [torch.zeros(len(m), Dh, dtype=torch.float64) for m in rows]
    cnt = [torch.zeros(len(m), dtype=torch.float64) for m in rows]
    for s in range(0, len(windows), batch):
        b = run_batch(model, windows[s:s + batch])
        B, T = b.idx.shape
        for hi, ref in enumerate(head_refs):
            n = len(rows[hi])
            if not n:
                continue
            A = b.pattern[:, ref].float()  # [B, T, T]
            O = torch.nn.functional.one_hot(idx[hi][b.idx], n + 1)[..., :n].float()  # [B, T, n]
            M = A @ O  # [B, T, n] attention mass on each row's source
            v = b.v[:, :, ref].float()  # [B, T, Dh]
            Z = (A @ (O[..., :, None] * v[..., None, :]).reshape(B, T, n * Dh)).reshape(B, T, n, Dh)
            on = (M >= MIN_MASS).double()
            w = on / (M.double().clamp_min(1e-12) * b.scale.double())  # [B, T, n]: per unit attention, / σ_t
            S[hi] += torch.einsum("btj,btje->je", w, Z.double())
            cnt[hi] += on.sum((0, 1))
    targets, weights = [], []
    for hi, ref in enumerate(head_refs):
        W_Oc = (model.W_O[ref] - model.W_O[ref].mean(-1, keepdim=True)).detach().double()
        tg, wt = [], []
        ok = cnt[hi] >= MIN_POSITIONS
        z = S[hi] / cnt[hi].clamp_min(1)[:, None]
        logit = ((z @ W_Oc) * gamma.double()) @ W_U.double() if len(rows[hi]) else torch.zeros(0, V, dtype=torch.float64)
        logit = (logit - logit.mean(1, keepdim=True)).numpy()
        n_ok = max(int(ok.sum()), 1)
        for j, o in enumerate(rows[hi]):
            t = logit[j, o.support]
            tg.append(t)
            norm = float((t ** 2).sum())
            wt.append(np.full(len(t), 1.0 / (norm * n_ok) if ok[j] and norm > 0 else 0.0))
        targets.append(np.concatenate(tg + [np.zeros(0)]).astype(np.float32))
        weights.append(np.concatenate(wt + [np.zeros(0)]).astype(np.float32))
    return targets, weights


def bigram_targets(oracle, windows: np.ndarray, bd, batch: int = 8):
    """(targets, weights), each a (class rows, token rows) pair in jointfit's cr_v / tr_v layout (rows in
    bd.class_rows order, then sorted token-row order, each on its support): the token-alone write averaged over
    the windows' positions where the row acts (verify/claims/measure.py `_bigram`'s component)."""
    import torch

    from verify.claims import ref_side as R

    model = oracle.model
    V = oracle.cfg.vocab_size
    K = len(bd.class_rows)
    toks = sorted(bd.token_rows)
    lab = np.where(bd.label < 0, K, bd.label).astype(np.int64) if bd.label is not None else np.full(V, K, np.int64)
    rowid = np.full(V, len(toks), np.int64)
    rowid[toks] = np.arange(len(toks))
    S = [torch.zeros(K + 1, V, dtype=torch.float64), torch.zeros(len(toks) + 1, V, dtype=torch.float64)]
    cnt = [torch.zeros(K + 1, dtype=torch.float64), torch.zeros(len(toks) + 1, dtype=torch.float64)]
    batches = [windows[s:s + batch] for s in range(0, len(windows), batch)]
    with torch.inference_mode():
        means = R.context_means(model, batches)
        for arr in batches:
            b = R.run_batch(model, arr)
            w = (b.lp.double() - R.token_alone_ablated(model, b, means).double()).reshape(-1, V)
            w = w - w.mean(1, keepdim=True)
            tok = b.idx.reshape(-1).numpy()
            for k, idx in enumerate((lab[tok], rowid[tok])):
                ix = torch.from_numpy(idx)
                S[k].index_add_(0, ix, w)
                cnt[k].index_add_(0, ix, torch.ones(len(ix), dtype=torch.float64))
    rows = [bd.class_rows, [bd.token_rows[c] for c in toks]]
    ok = [[len(r_.support) > 0 and float(cnt[k][i]) >= MIN_POSITIONS for i, r_ in enumerate(rows[k])] for k in range(2)]
    n_ok = max(sum(map(sum, ok)), 1)
    targets, weights = [], []
    for k in range(2):
        tg, wt = [np.zeros(0)], [np.zeros(0)]
        for i, r_ in enumerate(rows[k]):
            t = (S[k][i] / cnt[k][i].clamp_min(1)).numpy()[r_.support]
            norm = float((t ** 2).sum())
            tg.append(t)
            wt.append(np.full(len(t), 1.0 / (norm * n_ok) if ok[k][i] and norm > 0 else 0.0))
        targets.append(np.concatenate(tg).astype(np.float32))
        weights.append(np.concatenate(wt).astype(np.float32))
    return tuple(targets), tuple(weights)


def anchor_targets(oracle, windows: np.ndarray, heads, outs, neurons, neuron_var: np.ndarray,
                   ln_scale: float, bd=None) -> AnchorTargets:
    """Everything the anchors compare with, from the reference on the (training) drafting windows; with `bd`
    (the bigram draft) its class and token rows are anchored too."""
    from .neurons import output_effects

    head_refs = [int(h.ref_head) for h in heads]
    ids = np.array([nd.neuron for nd in neurons], np.int64)
    eff = output_effects(oracle, ln_scale)[ids] if len(ids) else np.zeros((0, oracle.cfg.vocab_size))
    tg, wt = head_out_targets(oracle, windows, head_refs, outs)
    out = AnchorTargets(np.array(head_refs, np.int64), ids, np.maximum(np.asarray(neuron_var, np.float64), 1e-8),
                        eff.astype(np.float32), tg, wt)
    if bd is not None:
        out.bigram_target, out.bigram_weight = bigram_targets(oracle, windows, bd)
    return out


def reference_run(model, X):
    """The reference on windows X [B, T]: (log-probs [B, T, V], its hook cache) without gradients."""
    import torch

    cache: dict = {}
    with torch.inference_mode():
        lp = torch.log_softmax(model(X, cache=cache).float(), -1)
    return lp.clone(), {k: cache[k].clone() for k in ("attn.pattern", "mlp.post")}  # clones usable by autograd


def anchor_loss(net, ref_lp, cache: dict, tg: AnchorTargets):
    """The anchor terms (torch scalars, summed: the loss) for the net's LAST forward pass (net.trace must have
    been on: it keeps each head's attention and the neurons' activations), against the reference's hooks on
    the same windows. Returns (loss, AnchorTerms)."""
    import torch

    last = net.last
    zero = torch.zeros(())
    # [[head]] attention: KL(a_ref ‖ a_hand) per query position, mean over positions and heads
    att = zero
    for hi in range(net.H):
        a_ref = cache["attn.pattern"][:, int(tg.head_ref[hi])].float()
        a_hand = last["att"][hi]
        kl = (torch.xlogy(a_ref, a_ref) - a_ref * torch.log(a_hand.clamp_min(1e-12))).sum(-1)
        att = att + kl.mean() / net.H
    act = nxt = zero
    if net.n_neu:
        B, T = ref_lp.shape[:2]
        post = cache["mlp.post"][..., torch.from_numpy(tg.neuron_ref)].float().reshape(B * T, -1)
        var = torch.from_numpy(tg.neuron_var.astype(np.float32))
        act = (((last["act"] - post) ** 2) / var).mean()
        eff = torch.from_numpy(tg.neuron_next)
        nx = net.next_table()
        nxt = (((nx - eff) ** 2).sum(1) / (eff ** 2).sum(1).clamp_min(1e-12)).mean()
    ho = zero
    for hi in range(net.H):
        if len(tg.ho_target[hi]):
            d = net.ho_v[hi] - torch.from_numpy(tg.ho_target[hi])
            ho = ho + (torch.from_numpy(tg.ho_weight[hi]) * d ** 2).sum() / net.H
    y = (ref_lp - ref_lp.mean(-1, keepdim=True)).reshape(-1, ref_lp.shape[-1]).mean(0)
    prior = ((net.prior - y) ** 2).mean() / y.var().clamp_min(1e-12)
    big = zero
    for v, t, w in zip((net.cr_v, net.tr_v), tg.bigram_target, tg.bigram_weight):
        if len(t):
            big = big + (torch.from_numpy(w) * (v - torch.from_numpy(t)) ** 2).sum()
    terms = AnchorTerms(*(float(x.detach()) for x in (att, act, nxt, ho, prior, big)))
    return att + act + nxt + ho + prior + big, terms
