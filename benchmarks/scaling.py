"""Section 5: how the hand model's time grows with tokens, context length, ruleset size and threads."""
from __future__ import annotations

import time

import numpy as np

from .memory import ruleset_bytes
from .results import Section
from .stats import interleaved, loglog_slope, measure, rate, ratio


def _prefix(seqs: list[np.ndarray], n: int) -> list[np.ndarray]:
    out, k = [], 0
    for s in seqs:
        if k >= n:
            break
        out.append(s)
        k += len(s)
    return out


def _windows(stream: np.ndarray, L: int) -> list[np.ndarray]:
    return [stream[i:i + L] for i in range(0, len(stream), L)]


def run(w, cfg, info: dict, log=print) -> Section:
    from handmodel import HandModel, load_rules

    from .throughput import with_torch_threads

    sec = Section("scaling")
    best_batch_tokens, best_nt = info["best_batch_tokens"], info["best_torch_threads"]
    hm = w.hm
    R = cfg.scaling_repeats
    N = w.n_tokens

    # --- tokens: prefixes of the workload, 1/16 .. all -------------------------------------------------
    sizes = sorted({max(1, N // f) for f in (8, 4, 2, 1)})
    rows = []
    for n in sizes:
        seqs = _prefix(w.seqs, n)
        m = sum(len(s) for s in seqs)
        ref = w.ref16[:m]
        st_kl, _ = measure(lambda: hm.stream_metrics(seqs, ref), repeats=R, warmup=1)
        st_lp, _ = measure(lambda: hm.log_probs_batch(seqs), repeats=R, warmup=1)
        rows.append({"tokens": m, "kl_s": st_kl, "logp_s": st_lp})
    xs = [r["tokens"] for r in rows]
    sec.add("tokens_slope_kl", "KL time vs tokens: log-log slope", "slope", "none",
            loglog_slope(xs, [r["kl_s"]["median"] for r in rows]), target="~1")
    sec.add("tokens_slope_logp", "full log-probs time vs tokens: log-log slope", "slope", "none",
            loglog_slope(xs, [r["logp_s"]["median"] for r in rows]), target="~1")

    # --- context length: the same tokens cut into windows of L (attention is O(L) per position) ---------
    stream = np.concatenate(w.seqs)[: min(N, cfg.context_tokens)]
    ref = w.ref16[: len(stream)]  # row i still belongs to token i; values are irrelevant for timing
    Ls = sorted({max(2, w.n_ctx // f) for f in (8, 4, 2, 1)})
    crow = []
    hm.stream_metrics(_windows(stream, Ls[-1]), ref)  # reference row stats for this array, computed once
    for L in Ls:
        win = _windows(stream, L)
        s = interleaved({"kl": lambda: hm.stream_metrics(win, ref),
                         "ref": with_torch_threads(best_nt, lambda: w.oracle.log_probs(win, batch_tokens=max(best_batch_tokens, L)))},
                        repeats=R, warmup=0, budget_s=cfg.budget_s / len(Ls), min_repeats=2)
        crow.append({"context": L, "kl_tok_s": rate(s["kl"], len(stream)), "ref_tok_s": rate(s["ref"], len(stream)),
                     "kl_over_ref": ratio(s["ref"], s["kl"])})
    sec.add("context_slope_kl", f"KL time vs context length {Ls[0]}..{Ls[-1]}: log-log slope", "slope", "none",
            loglog_slope(Ls, [len(stream) / r["kl_tok_s"]["median"] for r in crow]))
    sec.add("context_kl_tokens_per_s_at_nctx", f"KL tokens/s at context {Ls[-1]}", "tok/s", "higher", crow[-1]["kl_tok_s"])
    sec.add("context_kl_over_reference_at_nctx", f"KL / reference forward at context {Ls[-1]} (paired)", "x",
            "higher", crow[-1]["kl_over_ref"])

    # --- ruleset size: generated rulesets at several scales -------------------------------------------
    sub = _prefix(w.seqs, cfg.rules_tokens)
    m = sum(len(s) for s in sub)
    sref = w.ref16[:m]
    rrow = []
    for scale in cfg.rule_scales:
        t = time.perf_counter()
        d = w.generated_rules(scale)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        rules = load_rules(d, w.vocab)
        load_s = time.perf_counter() - t
        h = HandModel(rules)
        st_kl, _ = measure(lambda: h.stream_metrics(sub, sref), repeats=R, warmup=1, budget_s=cfg.budget_s / 6)
        st_lp, _ = measure(lambda: h.log_probs_batch(sub), repeats=R, warmup=1, budget_s=cfg.budget_s / 6)
        rrow.append({"scale": scale, "rules": len(rules.rule_ids), "numbers": int(np.sum(rules.rule_numbers)),
                     "array_bytes": ruleset_bytes(rules), "generate_or_cached_s": gen_s, "load_rules_s": load_s,
                     "kl_tok_s": rate([st_kl["median"]], m), "logp_tok_s": rate([st_lp["median"]], m),
                     "kl_s": st_kl, "logp_s": st_lp})
        log(f"  rules x{scale:g}: {len(rules.rule_ids):,} rules, load {load_s:.1f} s, KL {m / st_kl['median']:,.0f} tok/s")
        del h, rules
    nr = [r["rules"] for r in rrow]
    sec.add("rules_slope_kl", f"KL time vs number of rules (genrules x{', x'.join(f'{s:g}' for s in cfg.rule_scales)}): "
            "log-log slope", "slope", "none", loglog_slope(nr, [r["kl_s"]["median"] for r in rrow]))
    sec.add("rules_slope_logp", "full log-probs time vs number of rules: log-log slope", "slope", "none",
            loglog_slope(nr, [r["logp_s"]["median"] for r in rrow]))
    sec.add("rules_slope_load", "load_rules time vs number of rules: log-log slope", "slope", "none",
            loglog_slope(nr, [r["load_rules_s"] for r in rrow]))
    sec.add("rules_kl_tokens_per_s_largest", f"KL tokens/s with the x{cfg.rule_scales[-1]:g} ruleset", "tok/s",
            "higher", rrow[-1]["kl_tok_s"])

    # --- threads: numba 1 vs all -----------------------------------------------------------------------
    import numba

    nmax = numba.config.NUMBA_NUM_THREADS
    prev = numba.get_num_threads()
    tseqs = _prefix(w.seqs, cfg.context_tokens)
    tm = sum(len(s) for s in tseqs)
    tref = w.ref16[:tm]

    def with_threads(k, fn):
        def f():
            numba.set_num_threads(k)
            try:
                fn()
            finally:
                numba.set_num_threads(prev)
        return f
    s = interleaved({"kl1": with_threads(1, lambda: hm.stream_metrics(tseqs, tref)),
                     f"kl{nmax}": with_threads(nmax, lambda: hm.stream_metrics(tseqs, tref)),
                     "lp1": with_threads(1, lambda: hm.log_probs_batch(tseqs)),
                     f"lp{nmax}": with_threads(nmax, lambda: hm.log_probs_batch(tseqs))}, repeats=R, warmup=1)
    sec.add("threads_speedup_kl", f"KL speed-up, {nmax} threads vs 1 (paired)", "x", "higher",
            ratio(s["kl1"], s[f"kl{nmax}"]))
    sec.add("threads_speedup_logp", f"full log-probs speed-up, {nmax} threads vs 1 (paired)", "x", "higher",
            ratio(s["lp1"], s[f"lp{nmax}"]))
    sec.details = {
        "tokens": rows, "context": crow, "rules": rrow, "context_tokens": int(len(stream)), "rules_tokens": m,
        "threads": {"max": nmax, "kl_1_tok_s": rate(s["kl1"], tm), f"kl_{nmax}_tok_s": rate(s[f"kl{nmax}"], tm),
                    "logp_1_tok_s": rate(s["lp1"], tm), f"logp_{nmax}_tok_s": rate(s[f"lp{nmax}"], tm)},
    }
    sec.notes.append("tokens: prefixes of the workload, KL caches warm; context: the same tokens re-cut into "
                     "windows of L (reference timed alongside); rules: benchmarks/genrules.py rulesets on "
                     f"{m:,} tokens; threads: numba.set_num_threads")
    return sec
