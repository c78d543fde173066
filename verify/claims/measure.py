"""Run the component checks (verify/claims/component.py) of every rule over a set of context windows.

One reference pass per batch of windows (hooks cached), one engine pass for the hand log-probs, the
ablated reference passes the interventions need, then per rule its readout and intervention sums per
window; verdicts come from the bootstrap over windows at the end.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import hand_side as H
from .component import (COPY_Z, INTERVENTION, MIN_MASS, PER_WINDOW, READOUT_COPY_RATE, READOUT_CORR, READOUT_COSINE,
                        READOUT_OVERLAP, ComponentVerdict, Target, _centred, _dlogp, _pair_sums, _pick, _seed, targets, verdict_of)

# (check name) -> (statistic, threshold)
CHECKS = {"prior": {"readout": ("cosine", READOUT_COSINE)},
          "bigram": {"readout": ("corr", READOUT_CORR), "intervention": ("concordance", INTERVENTION)},
          "head": {"readout": ("mean", READOUT_OVERLAP), "intervention": ("concordance", INTERVENTION)},
          "neuron": {"readout": ("corr", READOUT_CORR), "intervention": ("concordance", INTERVENTION)},
          "head_out": {"readout": ("cosine", READOUT_COSINE), "readout.copy": ("mean", READOUT_COPY_RATE),
                       "intervention": ("concordance", INTERVENTION)}}


def windows_of(stream: np.ndarray, T: int, n: int) -> np.ndarray:
    """[n', T] consecutive windows of a token stream (the first n that fit)."""
    k = min(n, len(stream) // T)
    return np.asarray(stream[: k * T], dtype=np.int64).reshape(k, T)


class _Acc:
    """Per (rule, check): {window: sums}, and how many items were measured."""

    def __init__(self):
        self.sums: dict[tuple[int, str], dict[int, np.ndarray]] = {}
        self.items: dict[tuple[int, str], int] = {}

    def add(self, i: int, check: str, w: int, s: np.ndarray, n: int) -> None:
        d = self.sums.setdefault((i, check), {})
        d[w] = d[w] + s if w in d else s
        self.items[(i, check)] = self.items.get((i, check), 0) + n


def check_components(oracle, rules, checks: dict[str, dict], windows: np.ndarray, batch: int = 8,
                     log: Callable[[str], None] | None = None, only=None) -> list[ComponentVerdict]:
    """Verdicts for every rule (ledger order) on `windows` [n, T] (valid.txt or reference samples); `only`: a
    set of rule indices to check (each rule's checks read only itself, what it reads — a [[head]]: the rules
    reading it — and the reference, so checking a subset gives the same verdicts as checking all)."""
    from handmodel.engine import HandModel
    from handmodel.errors import UserError
    from verify.claims import one_thread

    if rules.vocab != oracle.vocab:
        raise UserError("the rules were compiled against another vocabulary than the checkpoint's tokenizer")
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or len(windows) == 0:
        raise UserError("component checks need at least one context window")
    model = oracle.model
    vec = H.RuleVectors(rules)
    tg = targets(oracle, rules, checks)
    if only is not None:
        tg = [t for t in tg if t.index in only]
    hm = HandModel(rules)
    batches = [windows[s : s + batch] for s in range(0, len(windows), batch)]
    with one_thread():  # thousands of tiny torch ops: on busy cores thread hand-offs cost ~20x the work
        return _run(model, rules, vec, tg, hm, batches, windows, batch, log)


def _run(model, rules, vec, tg, hm, batches, windows, batch, log) -> list[ComponentVerdict]:
    import torch

    from . import ref_side as R

    means = R.context_means(model, batches)
    head_targets = [t for t in tg if t.rule.kind == "head" and t.ref is not None]
    any_bigram = any(t.rule.kind == "bigram" for t in tg)
    W_Oc = {h: (model.W_O[h] - model.W_O[h].mean(-1, keepdim=True)).detach() for h in range(model.cfg.n_heads)}
    gamma = model.ln_final.weight.detach()
    W_U = model.W_U.detach()
    tables = {t.index: vec.table(t.rule.next) for t in tg if t.rule.kind in ("prior", "head_out", "neuron", "skip")}
    written = {t.index: vec.written(t.rule.next) for t in tg if t.rule.kind in ("prior", "head_out", "neuron", "skip")}
    acc = _Acc()
    rngs = {t.index: np.random.default_rng(_seed(t.rule.id, "positions")) for t in tg}

    def heads_off(arr):
        out = {}
        for t in head_targets:
            m = np.ones(len(rules.rules), dtype=np.bool_)
            m[t.index] = False
            out[t.index] = np.stack(hm.log_probs_batch(list(arr), m))
        return out

    if log:
        log(f"component checks: {len(tg)} rules, {len(windows)} windows; the hand model's mean contributions")
    dbar = hand_means(vec, tg, batches, hm, heads_off)
    with torch.inference_mode():
        for bi_, arr in enumerate(batches):
            if log:
                log(f"component checks: windows {bi_ * batch + 1}-{bi_ * batch + len(arr)} of {len(windows)}")
            b = R.run_batch(model, arr)
            lp_ref = b.lp.numpy()
            hand = np.stack(hm.log_probs_batch(list(arr)))
            states = [H.window_state(vec, s) for s in arr]
            head_abl = {t.ref: R.head_ablated(model, b, means, t.ref).numpy() for t in head_targets}
            tok_abl = R.token_alone_ablated(model, b, means).numpy() if any_bigram else None  # one pass, every bigram row
            hand_off = heads_off(arr)
            for j, ws in enumerate(states):
                w = bi_ * batch + j
                for t in tg:
                    if t.component is None:
                        continue
                    ctx = SimpleCtx(b, j, w, ws, lp_ref[j], hand[j], rngs[t.index], dbar.get(t.index))
                    kind = t.rule.kind
                    if kind == "prior":
                        _prior(acc, t, ctx, tables[t.index], written[t.index])
                    elif kind == "bigram":
                        _bigram(acc, t, ctx, vec, tok_abl[j])
                    elif kind == "head":
                        _head(acc, t, ctx, vec, head_abl[t.ref][j], hand_off[t.index][j])
                    elif kind == "neuron":
                        _neuron(acc, t, ctx, vec, model, means, tables[t.index], written[t.index])
                    elif kind == "head_out":
                        _head_out(acc, t, ctx, vec, model, means, tables[t.index], written[t.index], W_Oc[t.ref], gamma, W_U)
    out = []
    for t in tg:
        r = t.rule
        if t.component is None:
            out.append(ComponentVerdict(r.id, r.kind, None, "no component",
                                        note="names no reference component (a hand-written head, a skip rule, or no ref_head/ref_neuron)"))
            continue
        names = [c for c in CHECKS[r.kind] if c != "readout.copy" or r.copy is not None]
        if r.kind == "head_out" and not r.next:
            names.remove("readout")
        res = [verdict_of(c, CHECKS[r.kind][c][0], CHECKS[r.kind][c][1], acc.sums.get((t.index, c), {}),
                          acc.items.get((t.index, c), 0), _seed(r.id, c)) for c in names]
        vs = [c.verdict for c in res]
        v = "fail" if "fail" in vs else "pass" if all(x == "pass" for x in vs) else "undecided"
        out.append(ComponentVerdict(r.id, r.kind, t.component, v, res))
    return out


class SimpleCtx:
    """One window of one batch: what every rule's check reads."""

    def __init__(self, b, j, w, ws, lp_ref, hand, rng, dbar):
        self.b, self.j, self.w, self.ws, self.lp_ref, self.hand, self.rng = b, j, w, ws, lp_ref, hand, rng
        self.dbar = dbar  # the rule's mean contribution over the contexts: what mean-ablating the rule leaves


def hand_means(vec, tg: list[Target], batches, hm, heads_off) -> dict[int, np.ndarray]:
    """Per rule, its mean logit contribution over every position of the contexts [V]: mean-ablating a rule
    replaces its contribution by this, as mean-ablating a component does on the reference (switching
    the rule off outright would compare a zero-ablation with a mean-ablation). For a [[head]]: the mean
    of (hand log-probs − hand log-probs with the head off), a logit vector up to per-position constants."""
    sums: dict[int, np.ndarray] = {}
    scal: dict[int, float] = {}
    rows: dict[int, np.ndarray] = {}
    n = 0
    for arr in batches:
        hand = off = None
        for seq in arr:
            ws = H.window_state(vec, seq)
            n += len(seq)
            for t in tg:
                r, i = t.rule, t.index
                if t.component is None or r.kind in ("prior", "head"):
                    continue
                if r.kind == "neuron":
                    scal[i] = scal.get(i, 0.0) + float(H.neuron_activation(vec, r, ws).sum())
                elif r.kind == "bigram":
                    c = rows.setdefault(i, np.zeros(len(r.rows)))
                    for k, (now, _) in enumerate(r.rows):
                        c[k] += vec.member(now)[ws.seq].sum()
                elif r.kind == "head_out":
                    on = vec.member(r.now)[ws.seq]
                    if r.next:
                        scal[i] = scal.get(i, 0.0) + float((on * H.source_mass(vec, r, ws)).sum())
                    if r.copy is not None:
                        mass = (ws.att[r.head] * on[:, None]).sum(0) * vec.member(r.src)[ws.seq]
                        sums[i] = sums.get(i, np.zeros(vec.V)) + r.copy * np.bincount(ws.seq, mass, vec.V)
        heads = [t for t in tg if t.rule.kind == "head" and t.ref is not None]
        if heads:
            hand = np.concatenate(hm.log_probs_batch(list(arr))).astype(np.float64)
            off = heads_off(arr)
            for t in heads:
                sums[t.index] = sums.get(t.index, 0.0) + (hand - np.concatenate(list(off[t.index]))).sum(0)
    out = {}
    for t in tg:
        r, i = t.rule, t.index
        d = sums.get(i, np.zeros(vec.V)) / max(n, 1)
        if r.kind in ("neuron", "head_out") and r.next:
            d = d + scal.get(i, 0.0) / max(n, 1) * vec.table(r.next)
        if r.kind == "bigram":
            for k, (_, row) in enumerate(r.rows):
                d = d + rows.get(i, np.zeros(len(r.rows)))[k] / max(n, 1) * vec.table(row)
        out[i] = d
    return out


def _prior(acc, t: Target, c: SimpleCtx, table, written) -> None:
    """The prior names the reference's mean output: its logits against the window's mean, over every
    position, of log p_ref − mean_v log p_ref, on the tokens it writes (one vector per window: compared
    position by position, even the exact mean would score only |mean| / rms of the positions' vectors).
    Both sides are centred over the vocabulary (unlisted tokens 0): a constant added to every logit moves no
    probability, so a prior written as log-probs (all negative) must score as its centred self."""
    lp = c.lp_ref.astype(np.float64)
    y = (lp - lp.mean(1, keepdims=True)).mean(0)[written]
    x = (table - table.mean())[written]
    acc.add(t.index, "readout", c.w, _pair_sums("cosine", x, y), len(lp))


def _bigram(acc, t: Target, c: SimpleCtx, vec, abl) -> None:
    """A bigram row against the current token's token-alone path (direct path + the MLP's current-token
    part; attention held at its clean output): abl [T, V] are the reference's log-probs with that path
    mean-ablated (ref_side.token_alone_ablated, one pass per batch shared by every row), so both checks
    use every position where the rule acts, on the tokens its applicable rows write."""
    r = t.rule
    pos = np.flatnonzero(H.acts(vec, r, c.ws))
    if not len(pos):
        return
    seq = c.ws.seq
    d = H.contribution(vec, r, c.ws, pos)
    write = c.lp_ref[pos].astype(np.float64) - abl[pos]  # the component's logit write, up to a constant per position
    write -= write.mean(1, keepdims=True)  # ... centred over the vocabulary
    dh = _dlogp(c.lp_ref[pos], d - c.dbar)  # the rule's write mean-ablated, on the reference's distribution
    dr = abl[pos].astype(np.float64) - c.lp_ref[pos]  # the component mean-ablated on the reference
    sx, si = np.zeros(6), np.zeros(3)
    for k, p in enumerate(pos):
        wr = np.logical_or.reduce([vec.written(row) for now, row in r.rows if vec.member(now)[seq[p]]])
        sx += _pair_sums("corr", d[k, wr], write[k, wr])
        si += _pair_sums("concordance", dh[k, wr], dr[k, wr])
    acc.add(t.index, "readout", c.w, sx, len(pos))
    acc.add(t.index, "intervention", c.w, si, len(pos))


def _head(acc, t: Target, c: SimpleCtx, vec, head_abl, hand_off) -> None:
    T = len(c.ws.seq)
    h = vec.heads.index(t.rule)
    a_hand = c.ws.att[h]
    a_ref = c.b.pattern[c.j, t.ref].numpy()
    ov = np.minimum(a_hand, a_ref).sum(1)[1:]
    acc.add(t.index, "readout", c.w, np.array([len(ov), ov.sum()]), len(ov))
    ts = _pick(c.rng, np.arange(1, T), 2 * PER_WINDOW)
    dh = _dlogp(c.lp_ref[ts], _centred(c.hand[ts] - hand_off[ts]) - c.dbar)  # the head's write mean-ablated
    dr = head_abl[ts] - c.lp_ref[ts]
    # compared on the tokens the head's readers write at the position: where switching the head off changes
    # the logits by more than the common shift of log Z (a head whose readers write nothing here: skipped)
    d = c.hand[ts] - hand_off[ts]
    wr = np.abs(d - np.median(d, axis=1, keepdims=True)) > 1e-4
    x, y = dh[wr], dr[wr]
    if not len(x):
        return
    acc.add(t.index, "intervention", c.w, _pair_sums("concordance", x, y), len(ts))


def _neuron(acc, t: Target, c: SimpleCtx, vec, model, means, table, written) -> None:
    from . import ref_side as R

    act = H.neuron_activation(vec, t.rule, c.ws)
    post = c.b.post[c.j, :, t.ref].numpy().astype(np.float64)
    on = (act > 0) | (post > 0)
    if on.any():
        acc.add(t.index, "readout", c.w, _pair_sums("corr", act[on], post[on]), int(on.sum()))
    pos = np.flatnonzero(act > 0)
    if not len(pos) or not written.any():
        return
    ts = _pick(c.rng, pos, PER_WINDOW)
    dh = _dlogp(c.lp_ref[ts], act[ts, None] * table - c.dbar)
    abl = R.neuron_ablated(model, c.b, means, t.ref, np.full(len(ts), c.j), ts).numpy()
    dr = abl - c.lp_ref[ts]
    acc.add(t.index, "intervention", c.w, _pair_sums("concordance", dh[:, written], dr[:, written]), len(ts))


def _head_out(acc, t: Target, c: SimpleCtx, vec, model, means, table, written, W_Oc, gamma, W_U) -> None:
    import torch

    from . import ref_side as R

    r = t.rule
    seq = c.ws.seq
    # where the rule acts: its current-token condition holds and the head puts ≥ MIN_MASS on its sources
    # (a source in the context that the head does not look at moves nothing, on either side)
    pos = np.flatnonzero(H.acts(vec, r, c.ws) & (H.source_mass(vec, r, c.ws) >= MIN_MASS))
    if not len(pos):
        return
    src = torch.from_numpy(vec.member(r.src)[seq])
    v = c.b.v[c.j, :, t.ref]  # [T, Dh]
    ts = _pick(c.rng, pos, PER_WINDOW)
    if r.next:  # readout: the row vs the head's OV output per unit of attention on the sources, at t's own LNf scale
        a = c.b.pattern[c.j, t.ref][torch.from_numpy(ts)] * src.float()  # [k, T]
        z = (a @ v) / a.sum(1, keepdim=True)
        logit = ((z @ W_Oc) * gamma / c.b.scale[c.j, torch.from_numpy(ts)]) @ W_U
        y = (logit - logit.mean(1, keepdim=True)).numpy()[:, written]
        acc.add(t.index, "readout", c.w, _pair_sums("cosine", np.broadcast_to(table[written], y.shape), y), len(ts))
    if r.copy is not None:  # readout: the OV output of each source occurrence ranks the token itself high
        occ = np.flatnonzero(vec.member(r.src)[seq][: pos.max() + 1])
        occ = _pick(c.rng, occ, 4 * PER_WINDOW)
        lg = (((v[torch.from_numpy(occ)] @ W_Oc) * gamma) @ W_U).numpy().astype(np.float64)
        zs = (lg[np.arange(len(occ)), seq[occ]] - lg.mean(1)) / lg.std(1)
        hit = np.sign(r.copy) * zs >= COPY_Z
        acc.add(t.index, "readout.copy", c.w, np.array([len(occ), hit.sum()], dtype=np.float64), len(occ))
    d = H.contribution(vec, r, c.ws, ts)
    dh = _dlogp(c.lp_ref[ts], d - c.dbar)
    abl = R.source_path_ablated(model, c.b, means, t.ref, src[None].expand(c.b.idx.shape[0], -1), np.full(len(ts), c.j),
                                ts).numpy()
    wr = (d != 0) | written[None]
    acc.add(t.index, "intervention", c.w, _pair_sums("concordance", dh[wr], (abl - c.lp_ref[ts])[wr]), len(ts))
