"""Timing helpers: repeated measurements, robust summaries, paired ratios and log-log slopes.

Every timed number in the results is a `Stat`: median with the interquartile range and min/max over
the repeats. The machine is shared (2 cores), so absolute times are noisy; ratios of two paths timed
*interleaved* in the same run (A, B, A, B, ...) are what to read.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Callable

import numpy as np


def summarize(samples) -> dict:
    """median, q1, q3, min, max, n of a list of numbers (all equal for a single sample)."""
    x = np.asarray([float(s) for s in samples], dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples")
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(x.min()),
            "max": float(x.max()), "n": int(x.size)}


def time_once(fn: Callable[[], object]) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1, budget_s: float | None = None,
            min_repeats: int = 2) -> tuple[dict, list[float]]:
    """Run fn `warmup` times untimed, then up to `repeats` times timed -> (summary of seconds, samples).
    With `budget_s`, stop early (after at least `min_repeats`) once the timed runs took that long."""
    out = interleaved({"f": fn}, repeats, warmup, budget_s, min_repeats)["f"]
    return summarize(out), out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, budget_s: float | None = None,
                min_repeats: int = 2) -> dict[str, list[float]]:
    """Time several functions round-robin (a, b, a, b, ...) so load changes hit all of them alike.
    Each round times every function once; rounds stop at `repeats`, or after `min_repeats` rounds once
    `budget_s` seconds went by (a loaded machine gets fewer, not endless, repeats)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    t0 = time.perf_counter()
    for i in range(max(1, repeats)):
        for k, f in fns.items():
            out[k].append(time_once(f))
        if budget_s is not None and i + 1 >= min_repeats and time.perf_counter() - t0 > budget_s:
            break
    return out


def rate(samples: list[float], amount: float) -> dict:
    """Per-second rate (e.g. tokens/s) of each sample, summarised."""
    return summarize([amount / s for s in samples])


def ratio(num: list[float], den: list[float]) -> dict:
    """Per-repeat ratios num[i] / den[i] of paired samples, summarised."""
    return summarize([a / b for a, b in zip(num, den)])


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x): 1 = linear, 0 = flat, 2 = quadratic."""
    lx = np.log(np.asarray(xs, np.float64))
    ly = np.log(np.asarray(ys, np.float64))
    if len(lx) < 2 or np.ptp(lx) == 0:
        return float("nan")
    return float(np.polyfit(lx, ly, 1)[0])


def finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0
