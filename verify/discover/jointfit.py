"""Joint fit of a `suggest` draft: every number of the drafted rules moved at once by gradient descent
on KL(p_ref ‖ p_hand), over training windows whose reference distributions are computed on the fly.
(Over 400 lines: the dense draft model, its pruning cuts and the read-back to rule tables share one
parameter layout; splitting them would pass that layout between modules by position.)

Moment matching (suggest.py) fits each rule against the others held still; the rules overlap (a
position feeds a bigram row, four heads' sources and a copy rule), so it stalls early. Here the draft
is a torch model that computes exactly what the engine computes for the drafted kinds (docs/rules.md):

    z_t = prior + class_row[class(c)] + token_row[c]
          + Σ_h Σ_j A_h,t(src_j) · out_h,j                       (head_out rows)
          + Σ_h (copy_h + copy_h,class(c)) · Σ_s a_h,t(s)·[seq_s ∈ @story_words]·e_{seq_s}   (copy)
    a_h,t(s) = softmax_s( position_h[t−s] + score_h[seq_s] + query_h[class(c), class(seq_s)] )

and is fitted with Adam. Supports (which entries exist) stay those the draft chose, except the
query-dependent attention scores (class of the current token × class of the source), which are fitted
dense and then cut to the `n_query` entries that move the most attention, and (with `neuron_classes` = k)
class-level neuron entries: each neuron also reads the class of the current token (`now = { "@class" = w }`),
each head's attention mass on every class (`attend`), and writes to whole classes (`next`), fitted dense over
the classes and cut to the k entries of each kind that matter most per neuron. With `shared` = (M_out, M_read,
L, k), the neurons also share *weighted token sets* ([[weights]]): M_out output patterns (a neuron adds
x · pattern to the logits) and, per head, M_read read patterns (a neuron's pre-activation gains
x · Σ_s a_h,t(s) · pattern[seq_s]); both factors (the patterns and each neuron's x) are fitted jointly, the
patterns dense over the vocabulary until cut to their L largest tokens, each neuron's references cut to the k
of each kind that matter most (pattern = one set of numbers paid once, a reference = one number). Held-out training windows
pick the best step (never valid.txt). After writing, suggest reloads the files with the engine and
reports its KL next to this model's: the two must agree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .bigrams import BigramDraft, SparseRow
from .heads import HeadDraft


@dataclass
class Pattern:
    """A fitted shared weighted token set: written as a [[weights]] table (largest |weight| = 1)."""
    head: int  # -1: an output pattern; else the head whose attention it weighs
    tokens: np.ndarray
    w: np.ndarray
    refs: np.ndarray | None = None  # per neuron: its reference weight x (0: no reference)


@dataclass
class QueryScores:
    """A head's query-dependent score entries: { now = @class, src = @class, w }."""
    now: np.ndarray  # class index of the current token
    src: np.ndarray  # class index of the source token
    w: np.ndarray


def _flat(rows: list[SparseRow]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.concatenate([np.full(len(x.support), i) for i, x in enumerate(rows)] + [np.zeros(0, np.int64)])
    t = np.concatenate([x.support for x in rows] + [np.zeros(0, np.int64)])
    v = np.concatenate([x.delta for x in rows] + [np.zeros(0)])
    return r.astype(np.int64), t.astype(np.int64), v.astype(np.float32)


def build_net(bd: BigramDraft, heads: list[HeadDraft], outs, words: np.ndarray, copy_w: list[float], V: int,
              query: bool = True, neurons=(), neuron_classes: int = 0, shared=(0, 0, 0, 0)):
    import torch
    from torch import nn

    from . import torchsem as sem

    K = len(bd.class_names)
    lab = np.where(bd.label < 0, K, bd.label).astype(np.int64)  # K = "in no class"
    tok_list = sorted(bd.token_rows)
    rowid = np.full(V, len(tok_list), np.int64)
    rowid[tok_list] = np.arange(len(tok_list))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            T = torch.tensor
            self.V, self.K, self.H = V, K, len(heads)
            self.register_buffer("lab", T(lab))
            self.register_buffer("rowid", T(rowid))
            self.prior = nn.Parameter(T(bd.prior.astype(np.float32)))
            r, t, v = _flat(bd.class_rows)
            self.register_buffer("cr_r", T(r)); self.register_buffer("cr_t", T(t))
            self.cr_v = nn.Parameter(T(v))
            r, t, v = _flat([bd.token_rows[c] for c in tok_list])
            self.register_buffer("tr_r", T(r)); self.register_buffer("tr_t", T(t))
            self.tr_v = nn.Parameter(T(v))
            self.pos = nn.ParameterList([nn.Parameter(T(h.position.astype(np.float32))) for h in heads])
            self.pos_def = nn.Parameter(T(np.array([h.pos_default for h in heads], np.float32)))
            self.sc_tok = [T(h.score_tok.astype(np.int64)) for h in heads]
            self.sc_w = nn.ParameterList([nn.Parameter(T(h.score_w.astype(np.float32))) for h in heads])
            self.query = query
            self.q = nn.Parameter(torch.zeros(len(heads), K, K))
            self.register_buffer("q_mask", torch.ones(len(heads), K, K))
            # head_out rows, per head: source index of each token (n_src = none), entries (j, v, value)
            self.ho = []
            vals = []
            for hi in range(len(heads)):
                mine = [o for o in outs if o.head == hi and len(o.support)]
                srcidx = np.full(V, len(mine), np.int64)
                srcidx[[o.src for o in mine]] = np.arange(len(mine))
                j = np.concatenate([np.full(len(o.support), i) for i, o in enumerate(mine)] + [np.zeros(0, np.int64)])
                vv = np.concatenate([o.support for o in mine] + [np.zeros(0, np.int64)])
                self.ho.append((T(srcidx), len(mine), T(j.astype(np.int64)), T(vv.astype(np.int64)), mine))
                vals.append(nn.Parameter(T(np.concatenate([o.delta for o in mine] + [np.zeros(0)]).astype(np.float32))))
            self.ho_v = nn.ParameterList(vals)
            member = np.zeros(V, np.float32)
            member[words] = 1.0
            self.register_buffer("member", T(member))
            self.copy = nn.Parameter(T(np.asarray(copy_w, np.float32)))
            self.copy_cls = nn.Parameter(torch.zeros(len(heads), K))
            self.use_copy = len(words) > 0
            # neurons: pre = −threshold + now[c] + Σ attend_w · A_h,t(src); act = ReLU(pre); + act · next
            self.n_neu = len(neurons)
            nn_ = list(neurons)
            self.nu_now_n = T(np.concatenate([np.full(len(d.now_tok), i) for i, d in enumerate(nn_)] + [np.zeros(0)]).astype(np.int64))
            self.nu_now_t = T(np.concatenate([d.now_tok for d in nn_] + [np.zeros(0)]).astype(np.int64))
            self.nu_now_w = nn.Parameter(T(np.concatenate([d.now_w for d in nn_] + [np.zeros(0)]).astype(np.float32)))
            self.nu_thr = nn.Parameter(T(np.array([d.threshold for d in nn_], np.float32)))
            self.nu_out_n = T(np.concatenate([np.full(len(d.support), i) for i, d in enumerate(nn_)] + [np.zeros(0)]).astype(np.int64))
            self.nu_out_v = T(np.concatenate([d.support for d in nn_] + [np.zeros(0)]).astype(np.int64))
            self.nu_out_w = nn.Parameter(T(np.concatenate([d.delta for d in nn_] + [np.zeros(0)]).astype(np.float32)))
            self.nu_att = []  # per head: (source index of each token, n sources, neuron of entry, source of entry)
            att_w = []
            for hi in range(len(heads)):
                ent = [(i, s, w) for i, d in enumerate(nn_) for h2, s, w in d.attend if h2 == hi]
                srcs = sorted({s for _, s, _ in ent})
                idx = np.full(V, len(srcs), np.int64)
                idx[srcs] = np.arange(len(srcs))
                self.nu_att.append((T(idx), len(srcs), T(np.array([i for i, _, _ in ent], np.int64)),
                                    T(np.array([idx[s] for _, s, _ in ent], np.int64))))
                att_w.append(nn.Parameter(T(np.array([w for _, _, w in ent], np.float32))))
            self.nu_att_w = nn.ParameterList(att_w)
            # class-level neuron entries (dense until cut_neuron_classes keeps `nc` of each kind per neuron)
            self.nc = neuron_classes if self.n_neu else 0
            n = self.n_neu if self.nc else 0
            self.nc_now = nn.Parameter(torch.zeros(K, n))
            self.nc_att = nn.Parameter(torch.zeros(len(heads), K, n))
            self.nc_out = nn.Parameter(torch.zeros(n, K))
            self.register_buffer("nc_now_m", torch.ones(K, n))
            self.register_buffer("nc_att_m", torch.ones(len(heads), K, n))
            self.register_buffer("nc_out_m", torch.ones(n, K))
            # shared weighted sets: patterns [M, V] (dense until cut_shared keeps L tokens each) and each
            # neuron's reference weights; patterns start small and random (a zero pattern gets no gradient)
            mo, mr, L, self.sh_k = shared if self.n_neu else (0, 0, 0, 0)
            self.sh_L_out, self.sh_L_read = pattern_sizes(L)
            self.sh_out, self.sh_read = mo, mr
            g = torch.Generator().manual_seed(0)
            self.so = nn.Parameter(0.05 * torch.randn(mo, V, generator=g))
            self.so_c = nn.Parameter(torch.zeros(self.n_neu if mo else 0, mo))
            self.sr = nn.Parameter(0.05 * torch.randn(len(heads), mr, V, generator=g))
            self.sr_c = nn.Parameter(torch.zeros(len(heads), mr, self.n_neu if mr else 0))
            for name, p in (("so", self.so), ("so_c", self.so_c), ("sr", self.sr), ("sr_c", self.sr_c)):
                self.register_buffer(name + "_m", torch.ones_like(p))
            self.trace = False  # forward keeps each head's attention and the neurons' activations (anchors.py)
            self.last: dict = {}

        def next_table(self):
            """[n_neu, V] what each neuron writes per unit of activation: its token entries, its class entries
            spread over the class members and its references to the shared output patterns."""
            NX = torch.zeros(self.n_neu, self.V).index_put((self.nu_out_n, self.nu_out_v), self.nu_out_w, accumulate=True)
            if self.nc:
                NX = NX + torch.nn.functional.pad(self.nc_out * self.nc_out_m, (0, 1))[:, self.lab]
            if self.sh_out:
                NX = NX + (self.so_c * self.so_c_m) @ (self.so * self.so_m)
            return NX

        def attention(self, X, hi):
            """[B, T, T] attention of head hi on windows X [B, T] (engine semantics, causal)."""
            B, T = X.shape
            sc = sem.position_scores(self.pos[hi], self.pos_def[hi], T)[None].expand(B, T, T)
            dense = torch.zeros(self.V).index_put((self.sc_tok[hi],), self.sc_w[hi], accumulate=True)
            sc = sc + dense[X][:, None, :]
            if self.query:
                Q = torch.nn.functional.pad(self.q[hi] * self.q_mask[hi], (0, 1, 0, 1))  # class K: no entry
                L = self.lab[X]
                sc = sc + torch.gather(Q[L], 2, L[:, None, :].expand(B, T, T))
            return sem.causal_attention(sc)

        def forward(self, X):
            """X [B, T] int64 -> log-probs [B, T, V]."""
            B, T = X.shape
            V = self.V
            c = X.reshape(-1)
            CR = torch.zeros(self.K + 1, V).index_put((self.cr_r, self.cr_t), self.cr_v, accumulate=True)
            TR = torch.zeros(len(tok_list) + 1, V).index_put((self.tr_r, self.tr_t), self.tr_v, accumulate=True)
            z = self.prior[None] + CR[self.lab[c]] + TR[self.rowid[c]]  # [BT, V]
            copy_terms = []
            adds = []  # (token indices, values [BT, n]) of every sparse output: one index_add instead of one per head
            if self.n_neu:
                NOW = torch.zeros(V, self.n_neu).index_put((self.nu_now_t, self.nu_now_n), self.nu_now_w, accumulate=True)
                pre = NOW[c] - self.nu_thr[None]  # [BT, n_neu]
                if self.nc:
                    pre = pre + torch.nn.functional.pad(self.nc_now * self.nc_now_m, (0, 0, 0, 1))[self.lab[c]]
            if self.nc:
                lab_oh = torch.nn.functional.one_hot(self.lab[X], self.K + 1).float()  # [B, T, K+1], read by every head
            atts = []
            for hi in range(self.H):
                A = self.attention(X, hi)
                if self.trace:
                    atts.append(A)
                if self.n_neu and self.nu_att[hi][1]:
                    idx, n_s, e_n, e_s = self.nu_att[hi]
                    mass = sem.attention_mass(A, torch.nn.functional.one_hot(idx[X], n_s + 1)).reshape(B * T, n_s + 1)
                    pre = pre.index_add(1, e_n, mass[:, e_s] * self.nu_att_w[hi])
                if self.nc:  # attention mass on each class [BT, K]
                    massc = sem.attention_mass(A, lab_oh).reshape(B * T, self.K + 1)
                    pre = pre + massc[:, :self.K] @ (self.nc_att[hi] * self.nc_att_m[hi])
                if self.sh_read:  # weighted attention mass on each read pattern [BT, M_read]
                    P = (self.sr[hi] * self.sr_m[hi]).T[X]  # [B, T, M_read]: each source token's pattern weights
                    pre = pre + sem.attention_mass(A, P).reshape(B * T, -1) @ (self.sr_c[hi] * self.sr_c_m[hi])
                srcidx, n, j, vv, _ = self.ho[hi]
                if n:
                    O = torch.nn.functional.one_hot(srcidx[X], n + 1).float()  # [B, T, n+1]
                    M = sem.attention_mass(A, O).reshape(B * T, n + 1)
                    adds.append((vv, M[:, j] * self.ho_v[hi]))
                if self.use_copy:
                    w = self.copy[hi] + torch.nn.functional.pad(self.copy_cls[hi], (0, 1))[self.lab[X]]  # [B, T]
                    copy_terms.append(A * self.member[X][:, None, :] * w[..., None])
            if self.n_neu:
                act = sem.neuron_activation(pre)
            if self.trace:
                self.last = {"att": atts, "act": act if self.n_neu else None}
            if self.n_neu:
                adds.append((self.nu_out_v, act[:, self.nu_out_n] * self.nu_out_w))
                if self.nc:
                    zc = torch.nn.functional.pad(act @ (self.nc_out * self.nc_out_m), (0, 1))  # [BT, K+1]
                    z = z + zc[:, self.lab]
                if self.sh_out:
                    z = z + (act @ (self.so_c * self.so_c_m)) @ (self.so * self.so_m)
            if adds:
                z = z.index_add(1, torch.cat([a for a, _ in adds]), torch.cat([b for _, b in adds], 1))
            z = z.reshape(B, T, V)
            if copy_terms:  # every head copies into the same places (the window's tokens): one scatter
                z = sem.copy_logits(z, X, torch.stack(copy_terms).sum(0))
            return torch.log_softmax(z, -1)

    return Net()


def _kl(ref_lp, lp):
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean()


def net_kl(net, windows: np.ndarray, ref_lp, batch: int = 16) -> float:
    """Mean KL(ref ‖ net) over the windows' positions (ref_lp [B, T, V]: the reference's log-probs on them)."""
    import torch

    X = torch.from_numpy(windows.astype(np.int64))
    with torch.no_grad():
        return float(torch.cat([(ref_lp[s:s + batch].exp() * (ref_lp[s:s + batch] - net(X[s:s + batch]))).sum(-1)
                                for s in range(0, len(X), batch)]).mean())


def check_window(window: tuple[float, float]) -> tuple[float, float]:
    a, b = window
    if not 0 < a <= b < 1:
        raise ValueError(f"prune window {a}..{b}: need 0 < start <= end < 1")
    return a, b


def prune_schedule(steps: int, cuts: int, dense: int, final: int,
                   window: tuple[float, float] | None = None) -> list[tuple[int, int]]:
    """(step, entries kept) of each cut: `cuts` cuts spread over the fraction `window` of the steps
    (default steps/8 .. 2·steps/5), the kept count falling cubically from `dense` to `final` (gradual
    pruning: one cut straight to `final` threw away entries the rest of the fit had leaned on; held-out
    KL rose 0.963 -> 1.176 at the cut on draft 5). A single cut falls at the window's start (without a
    window: at a third, as drafts 1-5 had it)."""
    a, b = check_window(window or (1 / 8, 2 / 5))
    if cuts <= 1 or steps < 8:
        return [(max(round(steps * a) if window else steps // 3, 1), final)]
    first, last = round(steps * a), round(steps * b)
    out = []
    for i in range(cuts):
        t = (i + 1) / cuts
        step = first + round((last - first) * i / max(cuts - 1, 1))
        out.append((max(step, 1), max(final, round(final + (dense - final) * (1 - t) ** 3))))
    return out


def joint_fit(oracle, net, train: np.ndarray, held: np.ndarray, ref_h, steps: int, batch: int = 16,
              lr: float = 0.01, n_query: int = 400, cuts: int = 4,
              window: tuple[float, float] | None = None, log=print, anchors=None, lam: float = 0.0) -> dict:
    """Adam on the training windows (reference log-probs recomputed per batch); the query scores are
    pruned to n_query entries per head and the neurons' class entries to `net.nc` of each kind, in
    `cuts` steps (prune_schedule). Keeps the parameters of the step with the lowest KL on the held-out
    windows after the last cut (ref_h [B, T, V]: the reference's log-probs on them). Returns the history.
    With `anchors` (anchors.AnchorTargets) and lam > 0 the loss is KL + lam × the anchor terms, and the step
    kept is the one with the lowest held-out KL + lam × anchor terms (the same objective); lam = 0 is the
    plain fit, computed exactly as without anchors."""
    import torch

    from .anchors import AnchorTerms, anchor_loss, reference_run

    model = oracle.model
    anchored = anchors is not None and lam > 0
    held_terms: list[AnchorTerms] = []  # the anchor terms of the last held-out evaluation
    held_kls: list[float] = []  # the KL part of the last held-out evaluation

    def held_objective() -> float:
        if not anchored:
            return net_kl(net, held, ref_h, batch)
        X = torch.from_numpy(held.astype(np.int64))
        kl = 0.0
        sums = 0.0
        net.trace = True
        with torch.no_grad():
            for s in range(0, len(X), batch):
                lp_ref, cache = reference_run(model, X[s:s + batch])
                n = len(lp_ref)
                kl += float(_kl(lp_ref, net(X[s:s + batch]))) * n
                _, t = anchor_loss(net, lp_ref, cache, anchors)
                sums = sums + n * np.array(list(t.__dict__.values()))  # every term, in AnchorTerms' field order
        net.trace = False
        net.last = {}
        held_terms[:] = [AnchorTerms(*(float(x) for x in sums / len(X)))]
        held_kls[:] = [kl / len(X)]
        return kl / len(X) + lam * held_terms[0].total

    def held_kl() -> float:
        return held_objective()

    if anchored:  # the prior anchor's target (mean centred log p_ref) has mean 0, and a constant added to the
        # dense prior changes no distribution: start it centred, so the anchor works on its shape (Adam moves a
        # logit by about lr per step: 40 steps left the uncentred prior's anchor term at 19 of 22, draft faithful-s3)
        with torch.no_grad():
            net.prior -= net.prior.mean()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / max(steps, 1))  # linear decay to lr/10
    rng = np.random.default_rng(0)
    best = start = held_kl()
    start_kl = held_kls[0] if anchored else start
    best_terms = start_terms = held_terms[0] if anchored else None
    best_state = start_state = {k: v.clone() for k, v in net.state_dict().items()}
    hist = [{"step": 0, "held_kl": best}]
    log(f"joint fit: held-out {'KL' if not anchored else f'KL + {lam:g} x anchors'} before {best:.4f} "
        f"({len(train)} training windows, {len(held)} held out)" + (f"; anchors {held_terms[0]}" if anchored else ""))
    t0 = time.perf_counter()
    plan: dict[int, dict[str, int]] = {}  # step -> kept count per kind of pruned entry
    kinds = {}
    if net.query:
        kinds["query"] = (net.K * net.K, n_query)
    if net.nc:
        kinds["classes"] = (net.K, net.nc)
    if net.sh_out or net.sh_read:
        kinds["output pattern tokens"] = (net.V, net.sh_L_out)
        kinds["read pattern tokens"] = (net.V, net.sh_L_read)
        kinds["pattern refs"] = (max(net.sh_out, net.H * net.sh_read), net.sh_k)
    for kind, (dense, final) in kinds.items():
        for s, kept in prune_schedule(steps, cuts, dense, final, window):
            plan.setdefault(s, {})[kind] = kept
    every = max(25, steps // 20)
    for step in range(1, steps + 1):
        X = torch.from_numpy(train[rng.choice(len(train), batch, replace=False)].astype(np.int64))
        if anchored:
            ref, cache = reference_run(model, X)
            opt.zero_grad()
            net.trace = True
            loss = _kl(ref, net(X))
            net.trace = False
            (loss + lam * anchor_loss(net, ref, cache, anchors)[0]).backward()
            net.last = {}
        else:
            with torch.inference_mode():
                ref = torch.log_softmax(model(X).float(), -1)
            ref = ref.clone()
            opt.zero_grad()
            loss = _kl(ref, net(X))
            loss.backward()
        opt.step()
        sched.step()
        loss = float(loss.detach())
        if step in plan:
            kept = plan[step]
            if "query" in kept:
                _cut_query(net, train, kept["query"])
            if "classes" in kept:
                _cut_neuron_classes(net, train, kept["classes"])
            if "pattern refs" in kept:  # every kind's cuts fall on the same steps (prune_schedule)
                _cut_shared(net, train, kept["output pattern tokens"], kept["read pattern tokens"], kept["pattern refs"])
            log(f"joint fit step {step}: pruned to " + ", ".join(f"{n} {what}" for what, n in (
                ("query entries per head", kept.get("query")), ("class entries per neuron and kind", kept.get("classes")),
                ("tokens per output pattern", kept.get("output pattern tokens") if net.sh_out else None),
                ("tokens per read pattern", kept.get("read pattern tokens") if net.sh_read else None),
                ("pattern references per neuron and kind", kept.get("pattern refs"))) if n is not None))
            # a cut changes the model: from here on compare with the start (no query scores), not a denser step
            best, best_state, best_terms = start, start_state, start_terms
        if step % every == 0 or step == steps:
            k = held_kl()
            hist.append({"step": step, "train_kl": loss, "held_kl": k}
                        | ({"held_anchors": held_terms[0].__dict__.copy()} if anchored else {}))
            log(f"joint fit step {step}/{steps}: batch KL {loss:.4f}, held-out {'KL' if not anchored else 'KL + λ·anchors'} "
                f"{k:.4f} ({time.perf_counter() - t0:.0f} s)" + (f"; anchors {held_terms[0]}" if anchored else ""))
            if k < best:
                best = k
                best_state = {kk: v.clone() for kk, v in net.state_dict().items()}
                best_terms = held_terms[0] if anchored else None
    net.load_state_dict(best_state)
    out = {"history": hist, "held_kl": best, "held_kl_start": start_kl}
    if anchored:  # "held_kl" is then the objective KL + lam × anchors of the step kept
        out.update(held_objective=best, held_anchors=best_terms.__dict__.copy(), held_anchors_start=start_terms.__dict__.copy())
    return out


def _cut_query(net, train: np.ndarray, n_query: int) -> None:
    """Keep each head's n_query query-score entries that matter most: |w| × how often the (current class,
    source class) pair meets in the training windows."""
    import torch

    K = net.K
    lab = net.lab.numpy()[train]  # [N, T]
    cnt_now = np.bincount(lab.ravel(), minlength=K + 1)[:K].astype(np.float64)
    pair = np.outer(cnt_now, cnt_now)
    with torch.no_grad():
        for hi in range(net.H):
            # masked values: Adam's momentum keeps moving entries an earlier cut removed
            imp = np.abs((net.q[hi] * net.q_mask[hi]).numpy()) * np.sqrt(pair)
            keep = np.zeros(K * K, bool)
            keep[np.argsort(-imp.ravel())[:n_query]] = True
            net.q_mask[hi] = torch.from_numpy(keep.reshape(K, K).astype(np.float32))
            net.q[hi] *= net.q_mask[hi]


def _cut_neuron_classes(net, train: np.ndarray, k: int) -> None:
    """Keep, per neuron, the k class entries of each kind (now, attend over all heads, next) that
    matter most: |w| × √(how often the class occurs in the training windows); entries an earlier cut
    removed stay removed."""
    import torch

    K = net.K
    freq = np.sqrt(np.bincount(net.lab.numpy()[train].ravel(), minlength=K + 1)[:K].astype(np.float64))

    with torch.no_grad():
        now = _keep_top(np.abs((net.nc_now * net.nc_now_m).numpy()).T * freq[None], k)  # [n, K]
        net.nc_now_m.copy_(torch.from_numpy(now.T.astype(np.float32)))
        att = np.abs((net.nc_att * net.nc_att_m).numpy()) * freq[None, :, None]  # [H, K, n]
        m = _keep_top(att.transpose(2, 0, 1).reshape(att.shape[2], -1), k).reshape(att.shape[2], net.H, K)
        net.nc_att_m.copy_(torch.from_numpy(m.transpose(1, 2, 0).astype(np.float32)))
        out = _keep_top(np.abs((net.nc_out * net.nc_out_m).numpy()) * freq[None], k)
        net.nc_out_m.copy_(torch.from_numpy(out.astype(np.float32)))
        for p, mk in ((net.nc_now, net.nc_now_m), (net.nc_att, net.nc_att_m), (net.nc_out, net.nc_out_m)):
            p *= mk


def _keep_top(imp: np.ndarray, k: int) -> np.ndarray:
    """Bool mask keeping the k largest (positive) entries of each row of imp."""
    m = np.zeros_like(imp, dtype=bool)
    np.put_along_axis(m, np.argsort(-imp, axis=1)[:, :k], True, axis=1)
    return m & (imp > 0)


def pattern_sizes(size) -> tuple[int, int]:
    """A shared-pattern size as (tokens per output pattern, tokens per read pattern): N means N for both."""
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def _cut_shared(net, train: np.ndarray, n_out: int, n_read: int, k: int) -> None:
    """Keep each output pattern's n_out tokens and each read pattern's n_read tokens that matter most
    (|w| × √(training count)) and each
    neuron's k references of each kind (output patterns; read patterns over all heads) that matter most
    (|x| × the pattern's size: its √-count-weighted norm); entries an earlier cut removed stay removed."""
    import torch

    freq = np.sqrt(np.bincount(train.ravel(), minlength=net.V).astype(np.float64))
    with torch.no_grad():
        if net.sh_out:
            so = (net.so * net.so_m).numpy()
            net.so_m.copy_(torch.from_numpy(_keep_top(np.abs(so) * freq, n_out).astype(np.float32)))
            net.so *= net.so_m
            size = np.sqrt(((net.so.numpy() * freq) ** 2).sum(1))  # [M_out]
            imp = np.abs((net.so_c * net.so_c_m).numpy()) * size[None]
            net.so_c_m.copy_(torch.from_numpy(_keep_top(imp, k).astype(np.float32)))
            net.so_c *= net.so_c_m
        if net.sh_read:
            H, M = net.H, net.sh_read
            sr = (net.sr * net.sr_m).numpy().reshape(H * M, -1)
            net.sr_m.copy_(torch.from_numpy(_keep_top(np.abs(sr) * freq, n_read).reshape(H, M, -1).astype(np.float32)))
            net.sr *= net.sr_m
            size = np.sqrt(((net.sr.numpy() * freq) ** 2).sum(2))  # [H, M]
            imp = np.abs((net.sr_c * net.sr_c_m).numpy()) * size[:, :, None]  # [H, M, n]
            keep = _keep_top(imp.reshape(H * M, -1).T, k).T.reshape(H, M, -1)
            net.sr_c_m.copy_(torch.from_numpy(keep.astype(np.float32)))
            net.sr_c *= net.sr_c_m


def _unflat(values, lengths) -> list[np.ndarray]:
    """Split a flat parameter back into its rows (build_net concatenated them in row order)."""
    return np.split(values.detach().numpy().astype(np.float64), np.cumsum(lengths)[:-1]) if len(lengths) else []


def read_back(net, bd: BigramDraft, heads: list[HeadDraft], outs, copy_w: list[float],
              neurons=()) -> tuple[list[QueryScores], np.ndarray, list[Pattern]]:
    """Write the fitted numbers into the draft objects. Returns per-head query scores, copy-by-class
    weights [H, K] and the shared patterns (their references are in the neurons' next_sets/attend_sets)."""
    import torch

    with torch.no_grad():
        bd.prior = net.prior.numpy().astype(np.float64)
        for row, d in zip(bd.class_rows, _unflat(net.cr_v, [len(x.support) for x in bd.class_rows])):
            row.delta = d
        toks = sorted(bd.token_rows)
        for c, d in zip(toks, _unflat(net.tr_v, [len(bd.token_rows[c].support) for c in toks])):
            bd.token_rows[c].delta = d
        qs = []
        for hi, h in enumerate(heads):
            h.position = net.pos[hi].numpy().astype(np.float64)
            h.pos_default = float(net.pos_def[hi])
            h.score_w = net.sc_w[hi].numpy().astype(np.float64)
            mine = net.ho[hi][4]
            for o, d in zip(mine, _unflat(net.ho_v[hi], [len(o.support) for o in mine])):
                o.delta = d
            Q = (net.q[hi] * net.q_mask[hi]).numpy()
            nz = np.argwhere((net.q_mask[hi].numpy() > 0) & (Q != 0)) if net.query else np.zeros((0, 2), np.int64)
            qs.append(QueryScores(nz[:, 0], nz[:, 1], Q[nz[:, 0], nz[:, 1]].astype(np.float64)))
        nows = _unflat(net.nu_now_w, [len(d.now_tok) for d in neurons])
        outs_ = _unflat(net.nu_out_w, [len(d.support) for d in neurons])
        for i, d in enumerate(neurons):
            d.now_w, d.delta, d.threshold = nows[i], outs_[i], float(net.nu_thr[i])
        pos_in_head = [0] * net.H
        for d in neurons:
            new = []
            for hi, s, _ in d.attend:
                new.append((hi, s, float(net.nu_att_w[hi][pos_in_head[hi]])))
                pos_in_head[hi] += 1
            d.attend = new
        if net.nc:
            cn = (net.nc_now * net.nc_now_m).numpy()
            ca = (net.nc_att * net.nc_att_m).numpy()
            co = (net.nc_out * net.nc_out_m).numpy()
            for i, d in enumerate(neurons):
                d.now_cls = [(int(k), float(cn[k, i])) for k in np.flatnonzero(cn[:, i])]
                d.attend_cls = [(int(h), int(k), float(ca[h, k, i])) for h, k in np.argwhere(ca[:, :, i] != 0)]
                d.next_cls = [(int(k), float(co[i, k])) for k in np.flatnonzero(co[i])]
        patterns: list[Pattern] = []
        # a pattern is written with its largest |weight| = 1 and the references scaled to match (same product)
        if net.sh_out:
            so, sc = (net.so * net.so_m).numpy(), (net.so_c * net.so_c_m).numpy()
            for k in range(net.sh_out):
                patterns.append(_pattern(-1, so[k], sc[:, k]))
        if net.sh_read:
            sr, rc = (net.sr * net.sr_m).numpy(), (net.sr_c * net.sr_c_m).numpy()
            for h in range(net.H):
                for k in range(net.sh_read):
                    patterns.append(_pattern(h, sr[h, k], rc[h, k]))
        for i, d in enumerate(neurons):
            d.next_sets = [(j, float(p.refs[i])) for j, p in enumerate(patterns) if p.head < 0 and p.refs[i] != 0]
            d.attend_sets = [(p.head, j, float(p.refs[i])) for j, p in enumerate(patterns) if p.head >= 0 and p.refs[i] != 0]
        copy_w[:] = [float(x) for x in net.copy.numpy()]
        return qs, net.copy_cls.numpy().astype(np.float64), patterns


def _pattern(head: int, w: np.ndarray, refs: np.ndarray) -> Pattern:
    tok = np.flatnonzero(w)
    scale = float(np.abs(w[tok]).max()) if len(tok) else 1.0
    return Pattern(head, tok.astype(np.int64), (w[tok] / scale).astype(np.float64), (refs * scale).astype(np.float64))
