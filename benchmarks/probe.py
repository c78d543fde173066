"""Child-process probes (memory and compile cost need a fresh process each).

    python -m benchmarks.probe SPEC.json

SPEC: {"kind": "reference" | "hand_logp" | "hand_kl" | "compile", "checkpoint": DIR, "rules": DIR,
       "tokens": NPY, "offsets": NPY, "ref16": NPY (hand_kl), "batches": [[seq_lo, seq_hi], ...],
       "batch_tokens": int (reference)}
Prints one JSON line: timings (s) of each step, RSS after setup and peak RSS (VmHWM) in bytes.
The reference probe imports torch; the hand probes never do.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _seqs(spec):
    import numpy as np

    tok = np.load(spec["tokens"])
    off = np.load(spec["offsets"])
    return [tok[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    kind = spec["kind"]
    rep: dict = {"kind": kind}
    t = time.perf_counter()
    import numpy as np

    if kind == "reference":
        from reference.oracle import Oracle

        rep["import_s"] = time.perf_counter() - t
        t = time.perf_counter()
        o = Oracle.load(spec["checkpoint"])
        seqs = _seqs(spec)
        rep["setup_s"] = time.perf_counter() - t
        rep["rss_after_setup"] = _status_bytes("VmRSS")
        t = time.perf_counter()
        for lo, hi in spec["batches"]:
            out = o.log_probs(seqs[lo:hi], batch_tokens=int(spec["batch_tokens"]))
            del out
        rep["run_s"] = time.perf_counter() - t
    else:
        from handmodel import HandModel, load_rules, load_vocab

        rep["import_s"] = time.perf_counter() - t
        t = time.perf_counter()
        vocab = load_vocab(Path(spec["checkpoint"]) / "tokenizer.json")
        rules = load_rules(spec["rules"], vocab)
        rep["load_rules_s"] = time.perf_counter() - t
        hm = HandModel(rules)
        seqs = _seqs(spec)
        small = [s[: min(len(s), 16)] for s in seqs[:4]]
        if kind == "compile":
            ref_small = np.full((sum(len(s) for s in small), len(vocab)), -np.log(len(vocab)), np.float16)
            for name, fn in (("logp", lambda: hm.log_probs_batch(small)),
                             ("kl", lambda: hm.stream_metrics(small, ref_small))):
                t = time.perf_counter()
                fn()
                rep[f"first_{name}_s"] = time.perf_counter() - t
                hm._base_cache = hm._ref_cache = None  # second call: same work, compiled code in memory
                t = time.perf_counter()
                fn()
                rep[f"second_{name}_s"] = time.perf_counter() - t
        else:
            t = time.perf_counter()
            hm.log_probs_batch(small)  # load / compile the kernels before measuring the workload
            if kind == "hand_kl":
                hm.stream_metrics(small, np.full((sum(len(s) for s in small), len(vocab)), -8.0, np.float16))
            rep["first_call_s"] = time.perf_counter() - t
            rep["rss_after_setup"] = _status_bytes("VmRSS")
            t = time.perf_counter()
            if kind == "hand_logp":
                for lo, hi in spec["batches"]:
                    out = hm.log_probs_batch(seqs[lo:hi])
                    del out
            elif kind == "hand_kl":
                ref = np.load(spec["ref16"], mmap_mode="c")  # as verify reads its cache: memory-mapped float16
                hm.stream_metrics(seqs, ref)
            else:
                raise SystemExit(f"unknown probe kind {kind!r}")
            rep["run_s"] = time.perf_counter() - t
    rep["peak_rss"] = _status_bytes("VmHWM")
    rep["total_s"] = time.perf_counter() - T_START
    print(json.dumps(rep))


if __name__ == "__main__":
    main(sys.argv[1])
