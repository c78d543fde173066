"""Time one engine pass over an eval set with every rule on (`HandModel.stream_metrics_rows`, one mask):
the number a kernel change must not make worse. Run from the project root:

    python -m benchmarks.engine_pass [--rules rules] [--corpus ../shared/corpus/tinystories/valid.txt] [--repeats 3]
    python -m benchmarks.engine_pass --profile      # also the time of each phase of kernels.run_seqs

The first pass may include the numba compile (reported apart); the others are the steady cost.

--profile times the phases separately on the same data: the pass is re-run with drivers that stop after
phase k (setup; + skip-trigrams; + attention and head outputs; + neurons; + finish = the whole pass), each
resetting the position's scratch as _finish would, and a phase's time is the difference of consecutive
stops (best of --repeats), per position.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from numba import njit, prange

from handmodel import kernels as K

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("setup (scratch, attention state, engine call)", "skip-trigrams", "attention + head outputs",
          "neurons (+ class/set spread)", "finish (log Z, KL, CE, argmax)")


# run_seqs with a stop: phases 1..stage only (kernels.run_seqs' driver, the same phase kernels)
@njit(cache=True)
def _reset(dt, rds):
    """What _finish would clear, and the reads a later phase would have consumed."""
    for j in range(dt.dcnt[0]):
        dt.delta[dt.touched[j]] = 0.0
        dt.dflag[dt.touched[j]] = False
    dt.dcnt[0] = 0
    if dt.srow[0]:
        dt.sd[:] = 0.0
        dt.srow[:] = False
    for j in range(dt.acnt[0]):
        dt.aacc[dt.alist[j]] = 0.0
        dt.aflag[dt.alist[j]] = False
    dt.acnt[0] = 0
    for j in range(rds.ocnt[0]):
        rds.ov_acc[rds.ov_list[j]] = 0.0
        rds.ov_flag[rds.ov_list[j]] = False
    rds.ocnt[0] = 0
    for j in range(rds.wr_cnt[0]):
        rds.wr_mass[rds.wr_list[j]] = 0.0
        rds.wr_flag[rds.wr_list[j]] = False
    rds.wr_cnt[0] = 0
    for j in range(rds.pcnt[0]):
        rds.pre[rds.plist[j]] = 0.0
        rds.pflag[rds.plist[j]] = False
    rds.pcnt[0] = 0

@njit(cache=True, parallel=True)
def upto(stage, ps, bs, rf, out, hd, ho, cp, sk, nr, ws, at, rd, mo):
    R, V, tok, row = ps.R, ps.V, ps.tok, ps.row
    for q in prange(len(ps.seq_ptr) - 1):
        lo = ps.seq_ptr[q]
        T = ps.seq_ptr[q + 1] - lo
        dt, rds, ns, rs = K._new_scratch(R, V, len(ho.rule), len(nr.rule), len(ws.rd_head), len(at.ca_ptr) - 1,
                                         len(ws.ptr) - 1, len(at.am_ptr) - 1, len(nr.pres_neu), len(sk.rule),
                                         nr.always)
        st = K._new_attention(tok, lo, T, row, R, V, hd, cp, rd, mo)
        for t in range(T):
            i = lo + t
            c = tok[i]
            dl, df = K._output_rows(dt)  # sparse unless a whole pass (stage 4) predicted a dense position
            if stage >= 1:
                if t > 0:
                    K._arm_earlier(t, tok[i - 1], sk, nr, ns)
                K._skips(t, c, row, V, sk, ns, dl, df, dt)
            if stage >= 2:
                K._attend(t, i, c, lo, ps, hd, ho, cp, at, rd, mo, st, rds, dl, df, dt)
                K._head_out_reads(row, V, ho, ws, rds, dl, df, dt)
            if stage >= 3:
                K._fire_neurons(c, row, V, nr, ws, at, ns, rds, dl, df, dt)
                K._spread(V, ws, at, ns, dt)
            if stage >= 4:
                K._finish(i, t, T, c, ps, bs, rf, out, at, dt, rs)
            else:
                _reset(dt, rds)


def profile(ev, mask, repeats: int) -> list[float]:
    """Seconds of each phase (STAGES) for one pass, best of `repeats` per stop."""
    real = K.run_seqs
    best = []
    try:
        for stage in range(len(STAGES)):
            K.run_seqs = (lambda *a, _s=stage: upto(_s, *a))
            ts = []
            for _ in range(repeats + (stage == 0)):  # the very first call may compile upto
                t = time.perf_counter()
                list(ev.hand.stream_metrics_rows(ev.ref.seqs, ev.ref.logp, [mask]))
                ts.append(time.perf_counter() - t)
            best.append(min(ts[1:] if stage == 0 and len(ts) > 1 else ts))
    finally:
        K.run_seqs = real
    return [best[0]] + [best[k] - best[k - 1] for k in range(1, len(best))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=Path, default=ROOT / "rules")
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "tinystories" / "valid.txt")
    ap.add_argument("--train-corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "tinystories" / "train.txt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also time each phase of the pass")
    a = ap.parse_args(argv)
    from verify.ledger.evaluate import evaluate

    ev = evaluate(None, a.rules, a.corpus, 0, 0, a.train_corpus, log=lambda m: None, ledger_rows=False)
    mask = np.ones(len(ev.rules.rule_ids), bool)
    n = len(ev.ref.tokens)
    for i in range(a.repeats):
        t = time.perf_counter()
        list(ev.hand.stream_metrics_rows(ev.ref.seqs, ev.ref.logp, [mask]))
        print(f"pass {i}: {time.perf_counter() - t:.2f} s for {n:,} positions", flush=True)
    if a.profile:
        for name, s in zip(STAGES, profile(ev, mask, a.repeats)):
            print(f"  {name:<48} {s:7.2f} s  {1e6 * s / n:7.1f} us/position", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
