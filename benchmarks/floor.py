"""The vocabulary-row floor: the least work any model that outputs a full next-token distribution does per
position, one exp and one float32 write per vocabulary token (no logits computed, no normalisation read
back). The exp is the engine's own (handmodel.kernels._exp_le0, straight-line code that vectorises, within an ulp
of libm's): with libm's, a call per element, this "floor" was slower than the engine's dense finish. The hand
model's full-distribution pass is reported as a fraction of it (floor time / hand time:
1 would be a hand model that costs nothing but its output); the reference's speed is a peer, this is the
limit. `python -m benchmarks.floor [--tokens N] [--vocab V] [--threads K]` times it alone.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange

from handmodel.kernels import _exp_le0


@njit(cache=True, parallel=True)
def vocab_rows(tok, row, out):
    """out[i, v] = exp(row[v] - tok-dependent shift) (row <= 0): one exp and one write per (position, token)."""
    V = out.shape[1]
    for i in prange(len(tok)):
        s = 1e-3 * tok[i]
        for v in range(V):
            out[i, v] = np.float32(_exp_le0(row[v] - s))


def floor_pass(n_tokens: int, V: int, chunk: int = 2048):
    """A callable running the floor over n_tokens positions in chunks (the hand model's batch size order),
    so its output buffer stays cache-sized like the engine's per-batch output."""
    rng = np.random.default_rng(0)
    tok = rng.integers(0, V, n_tokens).astype(np.int64)
    row = -np.abs(rng.normal(0, 1, V))  # logits minus their max: <= 0, as the engine's exps see them
    out = np.empty((min(chunk, n_tokens), V), dtype=np.float32)
    vocab_rows(tok[:1], row, out[:1])  # compile / load outside the timing

    def f():
        for s in range(0, n_tokens, chunk):
            part = tok[s:s + chunk]
            vocab_rows(part, row, out[:len(part)])
    return f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    import numba

    from .machine import loadavg

    if a.threads:
        numba.set_num_threads(a.threads)
    f = floor_pass(a.tokens, a.vocab)
    ts = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    med = float(np.median(ts))
    print(f"vocabulary-row floor: {a.tokens / med:,.0f} positions/s ({a.vocab} tokens a row, {numba.get_num_threads()} "
          f"thread(s), median of {a.repeats}; {1e9 * med / (a.tokens * a.vocab):.2f} ns per exp+write); load {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
