"""`python -m benchmarks`: run every section on one workload, print the table, write the JSON."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .machine import ROOT, loadavg, machine_info
from .results import SCHEMA, write

LATEST = ROOT / "benchmarks" / "results" / "latest.json"


@dataclass
class Config:
    quick: bool = False
    tokens: int = 16384  # workload: the first stories of the corpus up to this many tokens
    batch_tokens: int = 8192  # tokens per batch handed to each model (whole sequences)
    ref_batch_tokens: tuple = (1024, 2048, 8192)  # reference forward sizes (tokens per call) tried; best is used
    select_repeats: int = 1  # timed passes per candidate configuration (after a one-batch warm-up)
    repeats: int = 7  # paired rounds (fewer when budget_s runs out, never fewer than min_repeats)
    min_repeats: int = 3
    budget_s: float = 30.0
    verify_repeats: int = 3
    skip_cold: bool = False
    paired_threads: int | None = None  # both sides' threads in the paired repeats (None: the usable cores)
    skip_cold_train_stories: int = 500
    scaling_repeats: int = 3
    context_tokens: int = 8192
    rules_tokens: int = 4096
    rule_scales: tuple = (1, 10, 100)
    compile_repeats: int = 2
    quick_eval_stories: int = 40  # --quick: verify on this many stories of the corpus
    quick_train_stories: int = 100  # --quick: baselines fitted on this many stories of the train text
    overlap_compile: bool = False  # start the cold numba compile probe before section 1 (smoke runs: hides its wall time)
    cold_compile: bool = True  # False: no cold numba compile probe (smoke tests: it costs a whole compile)

    @classmethod
    def make(cls, quick: bool, **over) -> "Config":
        c = cls(quick=quick)
        if quick:
            c = cls(quick=True, tokens=4096, batch_tokens=2048, ref_batch_tokens=(1024, 2048), select_repeats=1,
                    repeats=3, min_repeats=2, budget_s=8.0, verify_repeats=2, scaling_repeats=2, context_tokens=2048,
                    rules_tokens=2048, rule_scales=(1, 2, 5), compile_repeats=1)
        for k, v in over.items():
            if v is not None:
                setattr(c, k, v)
        return c


def run(checkpoint: Path, rules: Path, corpus: Path, train_corpus: Path | None, cfg: Config, work: Path,
        outs: list[Path], log=print) -> dict:
    from . import workload

    t0 = time.perf_counter()
    machine = machine_info()
    work.mkdir(parents=True, exist_ok=True)
    log(f"[bold]setup[/] (work dir {work})")
    t = time.perf_counter()
    w = workload.build(checkpoint, rules, corpus, train_corpus, cfg.tokens, cfg.batch_tokens, work, log=log)
    setup_s = round(time.perf_counter() - t, 1)
    sections: dict = {}
    secs: dict[str, float] = {"setup": setup_s}
    info: dict = {}

    def timed(label: str, key: str, fn):
        log(f"[bold]{label}[/]")
        t = time.perf_counter()
        out = fn()
        secs[key] = round(time.perf_counter() - t, 1)
        log(f"[dim]  ({secs[key]:.0f} s)[/]")
        return out

    try:
        _run_sections(w, cfg, sections, info, timed, log)
    finally:
        w.cleanup()
    machine["loadavg_end"] = loadavg()
    from .machine import load_verdict

    machine["under_load"] = [v for v in (load_verdict(load=machine.get("loadavg_start")), load_verdict()) if v]
    return _assemble(w, cfg, rules, machine, sections, secs, t0, outs)


def _run_sections(w, cfg, sections, info, timed, log) -> None:
    from . import compile_cost, inner_loop, memory, scaling, throughput

    cold = None
    if cfg.overlap_compile and cfg.cold_compile:
        log("[bold]6. compile cost[/]: the cold probe starts now, alongside sections 1-5 (--overlap-compile)")
        cold = compile_cost.ColdProbe(w, log=log)
    try:
        thr, klx, inf = timed("1-2. throughput: full log-probs (reference vs hand) and KL", "throughput",
                              lambda: throughput.run(w, cfg, log=log))
        info.update(inf)
        sections["throughput"], sections["kl_throughput"] = thr, klx
        sections["inner_loop"], pk = timed("3. inner loop: handmodel verify as a subprocess", "inner_loop",
                                          lambda: inner_loop.run(w, cfg, log=log))
        sections["memory"] = timed("4. memory: probes in child processes", "memory",
                                   lambda: memory.run(w, cfg, info["best_batch_tokens"], pk, log=log))
        sections["scaling"] = timed("5. scaling: tokens, context, rules, threads", "scaling",
                                    lambda: scaling.run(w, cfg, info, log=log))
        sections["compile"] = timed("6. compile cost", "compile", lambda: compile_cost.run(w, cfg, log=log, cold=cold))
    finally:
        if cold is not None:
            cold.close()  # a section failed: wait for the probe before its files are removed


def _assemble(w, cfg, rules, machine, sections, secs, t0, outs) -> dict:
    cfgd = asdict(w.oracle.cfg) if hasattr(w.oracle.cfg, "__dataclass_fields__") else {}
    res = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": cfg.quick,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "section_seconds": secs,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "machine": machine,
        "workload": {
            "checkpoint": str(w.ckpt), "checkpoint_hash": w.ckpt_hash, "vocab_size": w.V, "n_ctx": w.n_ctx,
            "model": cfgd, "params": int(w.oracle.model.n_params()), "corpus": str(w.corpus),
            "train_corpus": str(w.train_corpus) if w.train_corpus else None, "tokens": w.n_tokens,
            "sequences": len(w.seqs), **w.corpus_stats, "rules": str(w.rules_dir), "rules_source": w.rules_source,
            "rules_generated": w.rules_dir != Path(rules), "n_rules": len(w.rules.rule_ids),
        },
        "sections": {k: s.to_dict() for k, s in sections.items()},
    }
    write(res, outs)
    return res
