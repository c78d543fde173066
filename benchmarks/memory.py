"""Section 4: peak RSS of each path, each in its own process (os.wait4 rusage of that child), and the
bytes of the compiled ruleset's arrays vs the reference's weights."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .child import run_probe
from .results import Section


def ruleset_bytes(rules) -> int:
    return int(sum(v.nbytes for v in vars(rules.arrays).values() if isinstance(v, np.ndarray)))


def run(w, cfg, best_batch_tokens: int, verify_peaks: dict, log=print) -> Section:
    sec = Section("memory")
    files = w.files()
    base = {"checkpoint": str(w.ckpt), "rules": str(w.rules_dir), **files,
            "batches": [list(b) for b in w.batches], "batch_tokens": int(best_batch_tokens)}
    kinds = ("reference", "hand_logp", "hand_kl")
    # peak RSS does not depend on timing, so the three probes run side by side
    with ThreadPoolExecutor(len(kinds)) as ex:
        res = dict(zip(kinds, ex.map(lambda k: run_probe({**base, "kind": k}), kinds)))
    labels = {"reference": "reference forward, full log-probs (torch)",
              "hand_logp": "hand model, full log-probs", "hand_kl": "hand model, KL path (memory-mapped float16 ref)"}
    for k in kinds:
        rep, child = res[k]
        sec.add(f"peak_rss_{k}", f"peak RSS: {labels[k]}", "bytes", "lower", rep.get("peak_rss") or child.maxrss_bytes,
                note=f"after setup {rep.get('rss_after_setup', 0) / 2**20:,.0f} MiB")
    sec.add("peak_rss_verify_warm", "peak RSS: handmodel verify, warm", "bytes", "lower", verify_peaks["verify_warm"])
    if "verify_cold" in verify_peaks:
        sec.add("peak_rss_verify_cold", "peak RSS: handmodel verify, cold", "bytes", "lower", verify_peaks["verify_cold"])
    sec.add("hand_over_reference_peak_rss", "peak RSS hand full log-probs / reference", "x", "lower",
            sec.metrics[1]["median"] / sec.metrics[0]["median"])

    rb = ruleset_bytes(w.rules)
    params = sum(p.numel() * p.element_size() for p in w.oracle.model.parameters())
    st = (w.ckpt / "model.safetensors").stat().st_size
    toml = sum(p.stat().st_size for p in w.rules_dir.glob("*.toml"))
    sec.add("ruleset_array_bytes", "compiled ruleset arrays (sum of nbytes)", "bytes", "lower", rb)
    sec.add("reference_param_bytes", "reference parameters (numel x element size)", "bytes", "none", params)
    sec.add("reference_safetensors_bytes", "model.safetensors file size", "bytes", "none", st)
    sec.add("ruleset_over_params", "ruleset arrays / reference parameter bytes", "x", "lower", rb / params)
    sec.details = {"rule_toml_bytes": toml, "n_rules": len(w.rules.rule_ids),
                   "probe_reports": {k: res[k][0] for k in kinds},
                   "workload_batches": len(w.batches), "batch_tokens": w.batch_tokens,
                   "reference_batch_tokens": int(best_batch_tokens)}
    sec.notes.append(f"each path in a fresh process over the same {w.n_tokens:,}-token batches (output of a batch "
                     "dropped before the next); reference probes import torch, hand probes never do")
    return sec
