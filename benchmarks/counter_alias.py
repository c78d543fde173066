"""One way a kernel called from run_seqs' prange body is slower than the same loop in the body (issue 22;
benchmarks/README.md, "Issue 22 part 1": real in isolation, not yet shown to be the phase-kernel engine's
whole slowdown). Run: `NUMBA_NUM_THREADS=1 python benchmarks/counter_alias.py`.

The engine writes outputs through kernels._add: flag the token, append it to a touched list, count it in a
one-element array (`cnt[0] += 1`), add the value. numba compiles a prange body with `noalias` on its arrays,
so LLVM keeps cnt[0] in a register; a called @njit function gets no noalias, so every store to delta or
touched may alias cnt and forces it back to memory. Three variants of one loop, same work, same result:
called with the counter in the array; in the prange body; called, the counter read once into a local.
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

V = 8192


@njit(inline="always")
def _add(v, val, delta, dflag, touched, cnt):
    if not dflag[v]:
        dflag[v] = True
        touched[cnt[0]] = v
        cnt[0] += 1
    delta[v] += val


@njit(error_model="numpy")
def writes_cnt(tok, w, delta, dflag, touched, cnt):
    for j in range(len(tok)):
        _add(tok[j], w[j], delta, dflag, touched, cnt)


@njit(error_model="numpy")
def writes_local(tok, w, delta, dflag, touched, cnt):
    n = cnt[0]
    for j in range(len(tok)):
        v = tok[j]
        if not dflag[v]:
            dflag[v] = True
            touched[n] = v
            n += 1
        delta[v] += w[j]
    cnt[0] = n


@njit(error_model="numpy")
def _clear(delta, dflag, touched, cnt):
    for j in range(cnt[0]):
        delta[touched[j]] = 0.0
        dflag[touched[j]] = False
    cnt[0] = 0


@njit(parallel=True)
def run(tok, w, nseq, out, variant):
    for q in prange(nseq):
        delta = np.zeros(V)
        dflag = np.zeros(V, dtype=np.bool_)
        touched = np.empty(V, dtype=np.int64)
        cnt = np.zeros(1, dtype=np.int64)
        for t in range(tok.shape[0]):
            if variant == 0:
                writes_cnt(tok[t], w[t], delta, dflag, touched, cnt)
            elif variant == 1:
                tk = tok[t]
                ww = w[t]
                for j in range(len(tk)):
                    _add(tk[j], ww[j], delta, dflag, touched, cnt)
            else:
                writes_local(tok[t], w[t], delta, dflag, touched, cnt)
            out[q] += delta[touched[cnt[0] - 1]] + cnt[0]  # the results escape: nothing is optimised away
            _clear(delta, dflag, touched, cnt)


def main() -> int:
    rng = np.random.default_rng(0)
    tok = rng.integers(0, V, (200, 600))
    w = rng.random((200, 600))
    names = ("called, counter in cnt[0]", "in the prange body", "called, counter in a local")
    outs = [np.zeros(64) for _ in names]
    for k in range(len(names)):
        run(tok[:2], w[:2], 2, np.zeros(64), k)  # compile
    for _ in range(3):
        for k, name in enumerate(names):
            outs[k][:] = 0.0
            t = time.process_time()
            run(tok, w, 64, outs[k], k)
            print(f"{name:28s} {time.process_time() - t:.3f} s CPU  (checksum {outs[k].sum():.6g})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
