"""Where the shipped rules leave KL on valid.txt (research/README.md, "The long tail" and Findings).

    python -m research.pockets [--rules rules] [--copy-seqs 120] [--rule-gains 8] [--census] [--tails 8000]

Prints the mean KL(ref ‖ hand) by position in the sequence (and each band's share of the total), where the
top-1 disagreements sit (by the reference's top-1 probability, whether that token is already in the context,
and the most frequent (reference, hand) pairs), and, after a few frequent tokens, the probability the
reference and the hand model put on tokens already in the context (the copy gap).

--rule-gains N: for N rules of each family (drawn with a fixed seed), how a rule's gain is spread over the
positions where it acts (switching it off changes the KL): the share of those positions it improves, the
median change, and the share of its net gain the best tenth of them carries; and, on the first --copy-seqs
sequences, the share of them where the rule at least points the right way (first order: its logit change
δ has E_ref[δ] > E_hand-without-it[δ], so a small enough step of it would lower the KL there).
--census: which classes the neuron rules read and write most (how many neurons have a class entry in `now`,
in `attend` per head, in `next`), and the copy weights per head.
--tails K: what the last ~K numbers of each family are worth (the rules at the end of their family, the
least used ones, switched off without refitting: KL added per 1,000 numbers).

The per-token shares of the remaining KL are `handmodel verify --worst K`'s.
Uses verify's cache of the reference's log-probs (built by the first `handmodel verify --corpus …`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANDS = [(0, 1), (1, 5), (5, 20), (20, 60), (60, 120), (120, 256)]
AFTER = [" the", " and", ".", " a", " to", ",", " his", " her"]


def main() -> int:
    import numpy as np

    from handmodel import HandModel, load_rules
    from handmodel.vocab import load_vocab
    from verify.ledger import data as D

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", default=str(ROOT / "rules"))
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "tinystories" / "valid.txt"))
    ap.add_argument("--copy-seqs", type=int, default=120, help="sequences read for the in-context mass")
    ap.add_argument("--rule-gains", type=int, default=0, help="rules per family whose per-position gain is read")
    ap.add_argument("--census", action="store_true", help="count the classes the neuron rules read and write")
    ap.add_argument("--tails", type=int, default=0, help="numbers per family switched off at its end")
    a = ap.parse_args()
    ckpt = D.checkpoint_info(None)
    ref = D.get_ref_cache(ckpt, D.EvalSpec(corpus=Path(a.corpus)), log=lambda m: print(m, file=sys.stderr))
    vocab = load_vocab(ckpt.path / "tokenizer.json")
    hm = HandModel(load_rules(a.rules, vocab))
    seqs = ref.seqs
    met = hm.stream_metrics(seqs, ref.logp)
    kl = met["kl"]
    pos = np.concatenate([np.arange(len(s)) for s in seqs])
    print(f"mean KL {kl.mean():.4f} nats/token over {len(kl):,} positions")
    print("positions   share of KL   mean KL")
    for lo, hi in BANDS:
        m = (pos >= lo) & (pos < hi)
        if m.any():
            print(f"{lo:>4}-{hi - 1:<4}  {kl[m].sum() / kl.sum():10.3f}   {kl[m].mean():7.3f}")
    top1_misses(seqs, ref.logp, met, vocab)
    n = min(a.copy_seqs, len(seqs))
    N = int(sum(len(s) for s in seqs[:n]))
    hand = np.concatenate(hm.log_probs_batch(seqs[:n]))
    refp = np.asarray(ref.logp[:N], np.float32)
    ids = {vocab.index(t): t for t in AFTER if t in vocab}
    mass = {t: [] for t in ids.values()}
    start = 0
    for s in seqs[:n]:
        for t, c in enumerate(s):
            if int(c) in ids:
                ctx = np.unique(s[:t + 1])
                mass[ids[int(c)]].append((np.exp(refp[start + t, ctx]).sum(), np.exp(hand[start + t, ctx]).sum()))
        start += len(s)
    print(f"after token: probability on tokens already in the context (first {n} sequences), reference vs hand")
    for t, v in mass.items():
        if v:
            v = np.array(v)
            print(f"{t!r:8} n={len(v):5d}  reference {v[:, 0].mean():.3f}  hand {v[:, 1].mean():.3f}")
    if a.rule_gains > 0:
        rule_gains(hm, seqs, ref.logp, kl, a.rule_gains, n_first=n)
    if a.census:
        census(hm.rules)
    if a.tails > 0:
        tails(hm, seqs, ref.logp, kl, a.tails)
    return 0


def top1_misses(seqs, ref_logp, met, vocab) -> None:
    import numpy as np
    from collections import Counter

    N = len(met["kl"])
    r_arg = np.empty(N, np.int64)
    r_p = np.empty(N)
    for s in range(0, N, 8192):
        x = np.asarray(ref_logp[s:s + 8192], np.float32)
        r_arg[s:s + 8192] = x.argmax(1)
        r_p[s:s + 8192] = np.exp(x.max(1))
    agree, miss = met["agree"], ~met["agree"]
    in_ctx = np.zeros(N, bool)
    i = 0
    for sq in seqs:
        seen = set()
        for c in sq:
            seen.add(int(c))
            in_ctx[i] = int(r_arg[i]) in seen
            i += 1
    print(f"top-1 agreement {agree.mean():.3f}; where the {miss.sum():,} disagreements sit:")
    for lo, hi in ((0, .3), (.3, .5), (.5, .7), (.7, 1.0001)):
        m = (r_p >= lo) & (r_p < hi)
        print(f"  reference top-1 p in [{lo:.1f}, {min(hi, 1):.1f}{']' if hi > 1 else ')'}: {m.mean():6.1%} of positions, "
              f"agreement {agree[m].mean():.3f}, {(miss & m).sum() / miss.sum():6.1%} of the disagreements")
    for name, m in (("already in the context", in_ctx), ("not in the context", ~in_ctx)):
        print(f"  reference top-1 {name}: {m.mean():6.1%} of positions, agreement {agree[m].mean():.3f}, "
              f"{(miss & m).sum() / miss.sum():6.1%} of the disagreements")
    pairs = Counter((vocab[a], vocab[b]) for a, b in zip(r_arg[miss], met["hand_argmax"][miss]))
    print("  most frequent (reference top-1, hand top-1): " + ", ".join(f"{a!r}/{b!r} {n}" for (a, b), n in pairs.most_common(10)))


def census(rules, top: int = 5) -> None:
    """Per kind of neuron entry, the classes (then the weighted sets) the most neuron rules have an entry for
    (token entries not counted)."""
    from collections import Counter

    sets = rules.sets
    neurons = [r for r in rules.rules if r.kind == "neuron"]
    heads = [r.id for r in rules.rules if r.kind == "head"]
    for what, keep in (("class", lambda sid: sid >= sets.V and not sets.is_weighted(sid)),
                       ("weighted set", sets.is_weighted)):
        now = Counter(sets.name(s) for r in neurons for s in {s for s, _ in r.n_now if keep(s)})
        nxt = Counter(sets.name(s) for r in neurons for s in {s for s, _ in r.next if keep(s)})
        att = Counter((h, sets.name(s)) for r in neurons for h, s in {(h, s) for h, s, _ in r.n_attend if keep(s)})
        if not (now or nxt or att):
            continue
        print(f"neuron census ({len(neurons)} neuron rules; neurons with a {what} entry of each kind):")
        print("  now:    " + ", ".join(f"{c} {n}" for c, n in now.most_common(top)))
        print("  attend: " + ", ".join(f"{heads[h]} → {c} {n}" for (h, c), n in att.most_common(top)))
        print("  next:   " + ", ".join(f"{c} {n}" for c, n in nxt.most_common(top)))
    import numpy as np

    copies = [r for r in rules.rules if r.kind == "head_out" and r.copy is not None]
    print(f"copy weights per head ({len(copies)} copying rules; per class of the current token):")
    for h, name in enumerate(heads):
        ws = sorted(((r.copy, sets.name(r.now)) for r in copies if r.head == h), reverse=True)
        if ws:
            w = np.array([x for x, _ in ws])
            print(f"  {name}: {len(w)} rules, {int((w > 0).sum())} positive, median {np.median(w):+.1f}; highest "
                  + ", ".join(f"{c} {x:+.1f}" for x, c in ws[:4]))


def kl_added(hm, seqs, ref_logp, kl_all, off: list[int]):
    """Per-position KL with the rules `off` switched off minus KL with every rule on."""
    import numpy as np

    mask = np.ones(len(hm.rules.rules), dtype=np.bool_)
    mask[off] = False
    return hm.stream_metrics(seqs, ref_logp, mask=mask)["kl"] - kl_all


def tails(hm, seqs, ref_logp, kl_all, k: int) -> None:
    """Switch off the last rules of each family (file order: most used first) until ~k numbers are off."""
    import numpy as np

    rules = hm.rules.rules
    fams = {"token rows": [i for i, r in enumerate(rules) if r.kind == "bigram" and "token" in r.group]}
    per_head: dict[int, list[int]] = {}
    for i, r in enumerate(rules):
        if r.kind == "head_out" and r.copy is None:
            per_head.setdefault(r.head, []).append(i)
    # rank by rank across the heads, so the tail takes each head's least attended sources alike
    fams["head_out rows (each head's last)"] = [rows[j] for j in range(max(map(len, per_head.values()), default=0))
                                                for rows in per_head.values() if j < len(rows)]
    fams["neurons"] = [i for i, r in enumerate(rules) if r.kind == "neuron"]
    print(f"the last ~{k:,} numbers of each family switched off (no refit; KL added per 1,000 numbers):")
    for name, idx in fams.items():
        off, n = [], 0
        for i in reversed(idx):
            if n >= k:
                break
            off.append(i)
            n += rules[i].numbers
        if not off:
            continue
        d = float(kl_added(hm, seqs, ref_logp, kl_all, off).mean())
        print(f"  {name:34s} {len(off):4d} rules, {n:6,} numbers: {d:+.4f} nats/token, {1000 * d / n:+.4f} per 1,000 numbers")


def family(r) -> str:
    if r.kind == "head_out":
        return "copying" if r.copy is not None else "head_out"
    return r.kind


def rule_gains(hm, seqs, ref_logp, kl_all, n: int, n_first: int) -> None:
    """Per sampled rule: positions where switching it off changes the KL, and how the gain spreads over them;
    on the first n_first sequences, where its logit change points toward the reference (first order)."""
    import numpy as np

    rules = hm.rules.rules
    rng = np.random.default_rng(0)
    M = int(sum(len(s) for s in seqs[:n_first]))
    on = np.concatenate(hm.log_probs_batch(seqs[:n_first])).astype(np.float64)
    p_ref = np.exp(np.asarray(ref_logp[:M], np.float64))
    p_ref /= p_ref.sum(1, keepdims=True)
    print(f"per-position gain of single rules (KL without the rule − with it, at the positions where it acts; {n} rules "
          f"per family; 'points right': first order, on the first {n_first} sequences)")
    print("family     rule                                  acts at   improves   median gain   net gain   best tenth's share"
          "   points right")
    for fam in ("bigram", "head_out", "copying", "neuron"):
        idx = [i for i, r in enumerate(rules) if family(r) == fam]
        if not idx:
            continue
        for i in sorted(rng.choice(idx, size=min(n, len(idx)), replace=False)):
            d = kl_added(hm, seqs, ref_logp, kl_all, [i])
            acts = np.abs(d) > 1e-7  # above float rounding of the two passes
            g = np.sort(d[acts])
            if not len(g):
                print(f"{fam:10s} {rules[i].id:36s}  never acts")
                continue
            best = g[-max(1, len(g) // 10):].sum()
            share = f"{best / g.sum():.2f}" if g.sum() > 0 else "n/a (net loss)"
            print(f"{fam:10s} {rules[i].id:36s} {acts.mean():8.1%}   {np.mean(g > 0):8.0%}   {np.median(g):+11.5f}   "
                  f"{g.sum() / len(d):+.5f}   {share:>18s}   {points_right(hm, seqs[:n_first], on, p_ref, i, acts[:M])}")


def points_right(hm, seqs, on, p_ref, i: int, acts) -> str:
    """Share of the positions `acts` where rule i's logit change δ = log p_hand − log p_hand∖i points toward the
    reference: Σ_v (p_ref − p_hand∖i)_v δ_v > 0. That sum is minus the derivative of KL(ref ‖ hand∖i + εδ) at ε = 0;
    a constant in δ cancels from it, since both distributions sum to 1."""
    import numpy as np

    if not acts.any():
        return "n/a (does not act there)"
    mask = np.ones(len(hm.rules.rules), dtype=np.bool_)
    mask[i] = False
    off = np.concatenate(hm.log_probs_batch(seqs, mask=mask)).astype(np.float64)[acts]
    fo = ((p_ref[acts] - np.exp(off)) * (on[acts] - off)).sum(1)
    return f"{np.mean(fo > 0):.0%} of {int(acts.sum()):,}"


if __name__ == "__main__":
    raise SystemExit(main())
