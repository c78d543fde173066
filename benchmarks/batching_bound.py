"""What batching positions could buy (issue 22, item 2), measured on the most matrix-shaped work of a pass.

    python -m benchmarks.batching_bound [--rules rules] [--positions 4096] [--repeats 3]

The shipped neurons' weighted-set outputs are the largest single line of an engine pass (benchmarks/README.md,
"Line by line"): at each position, every set a firing neuron writes gets a coefficient, and the engine adds
coefficient x the set's weights into a dense vocabulary row, entry by entry (kernels._neurons). Over a block of
positions the same sums are one matrix product, [positions, sets] x [sets, union of the sets' tokens], which is
what batching positions would turn them into. This times both, on one thread each:

- `scattered`: the engine's loop, per position;
- `blocked BLAS`: numpy's matrix product (OpenBLAS) per block of positions, then each position's row scattered
  from the union back into the dense vocabulary row, which the finish reads.

Both end with the same pass over the dense row (read it, clear it), standing in for the finish. Every written set
gets a nonzero coefficient at every position, as the shipped rules' always-firing neurons make them; the
coefficients are random (the timing does not depend on their values), and the two results are checked equal
(to 1e-9) before anything is timed. OPENBLAS_NUM_THREADS and OMP_NUM_THREADS are set to 1 before numpy is
imported, so run it as a command, not from a session that imported numpy already.
"""
from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from handmodel.kernels import _u  # noqa: E402


class WrittenSets(NamedTuple):
    """The weighted sets neurons write (their `next`), set-major as the engine holds them, and densely over the
    union of their tokens, as a matrix product wants them."""
    ptr: np.ndarray  # [K + 1] int64: set k's entries are tok/w[ptr[k]:ptr[k+1]]
    tok: np.ndarray  # int32 token ids
    w: np.ndarray  # float64 weights
    union: np.ndarray  # [U] int64: every token of some written set
    dense: np.ndarray  # [K, U] float64: set k's weight of union[u] (0: not a member)


def written_sets(a, V: int) -> WrittenSets:
    """From a compiled ruleset's arrays (CompiledRules.arrays): the sets some neuron's `next` names."""
    ks = np.unique(np.asarray(a.nws_set))
    parts = [(np.asarray(a.ws_tok[a.ws_ptr[k]:a.ws_ptr[k + 1]]), np.asarray(a.ws_w[a.ws_ptr[k]:a.ws_ptr[k + 1]]))
             for k in ks]
    ptr = np.zeros(len(ks) + 1, np.int64)
    ptr[1:] = np.cumsum([len(t) for t, _ in parts])
    tok = np.concatenate([t for t, _ in parts]).astype(np.int32) if parts else np.zeros(0, np.int32)
    w = np.concatenate([x for _, x in parts]).astype(np.float64) if parts else np.zeros(0)
    union = np.unique(tok).astype(np.int64)
    col = np.full(V, -1, np.int64)
    col[union] = np.arange(len(union))
    dense = np.zeros((len(ks), len(union)))
    for k, (t, x) in enumerate(parts):
        dense[k, col[t]] = x
    return WrittenSets(ptr, tok, w, union, dense)


@njit(cache=True, error_model="numpy")
def _consume(sd):
    """The finish's stand-in: read the dense row once and clear it."""
    s = 0.0
    for v in range(len(sd)):
        s += sd[v]
        sd[v] = 0.0
    return s


@njit(cache=True, error_model="numpy")
def scattered(vals, ptr, tok, w, sd, out):
    """The engine's writes (kernels._neurons): per position n, each set k adds vals[n, k] x its weights into sd."""
    for n in range(vals.shape[0]):
        for k in range(vals.shape[1]):
            val = vals[n, k]
            for j in range(_u(ptr[k]), _u(ptr[k + 1])):
                sd[_u(tok[j])] += val * w[j]
        out[n] = _consume(sd)


@njit(cache=True, error_model="numpy")
def _scatter_block(block, union, sd, out, n0):
    """Each position's row of a product block, from the union back into the dense row, then the finish's pass."""
    for b in range(block.shape[0]):
        for u in range(block.shape[1]):
            sd[_u(union[u])] = block[b, u]
        out[n0 + b] = _consume(sd)


def blocked_blas(vals: np.ndarray, ws: WrittenSets, sd: np.ndarray, out: np.ndarray, block: int) -> None:
    """The same sums as one matrix product per block of positions (numpy / OpenBLAS)."""
    prod = np.empty((block, len(ws.union)))
    for n0 in range(0, len(vals), block):
        b = min(block, len(vals) - n0)
        np.dot(vals[n0:n0 + b], ws.dense, out=prod[:b])
        _scatter_block(prod[:b], ws.union, sd, out, n0)


def measure(ws: WrittenSets, V: int, positions: int, repeats: int, blocks=(16, 64, 256), seed: int = 0) -> dict:
    """µs per position of each form (best of `repeats`), after checking that they agree."""
    vals = np.random.default_rng(seed).normal(size=(positions, len(ws.ptr) - 1))
    sd = np.zeros(V)
    ref, got = np.empty(positions), np.empty(positions)
    scattered(vals, ws.ptr, ws.tok, ws.w, sd, ref)
    for b in blocks:
        blocked_blas(vals, ws, sd, got, b)
        if not np.allclose(got, ref, rtol=1e-9, atol=1e-9):
            raise AssertionError(f"blocked BLAS (block {b}) and the scattered writes disagree")

    def best(f) -> float:
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts) / positions * 1e6

    res = {"scattered": best(lambda: scattered(vals, ws.ptr, ws.tok, ws.w, sd, ref))}
    for b in blocks:
        res[f"blocked BLAS, {b} positions"] = best(lambda b=b: blocked_blas(vals, ws, sd, got, b))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", type=Path, default=Path(__file__).resolve().parents[1] / "rules")
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from handmodel import load_rules
    from handmodel.vocab import load_vocab
    from verify.ledger.data import default_checkpoint

    vocab = load_vocab(default_checkpoint() / "tokenizer.json")
    ws = written_sets(load_rules(args.rules, vocab).arrays, len(vocab))
    K, U = len(ws.ptr) - 1, len(ws.union)
    print(f"{K} weighted sets written by neurons, {len(ws.tok):,} entries, union {U:,} tokens; "
          f"{args.positions:,} positions, one thread, best of {args.repeats}")
    res = measure(ws, len(vocab), args.positions, args.repeats)
    for name, us in res.items():
        print(f"  {name:28s} {us:7.2f} µs/position")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
