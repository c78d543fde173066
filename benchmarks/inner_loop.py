"""Section 3: the edit-verify loop. `handmodel verify --corpus valid.txt` as a subprocess: cold (fresh
HANDMODEL_CACHE: the reference cache and baselines are built) and warm re-runs after editing one number
of the largest rule file in a COPY of the rules folder. (A comment is no longer an edit: ledger rows are
keyed by what load_rules compiled, so a comment recomputes nothing.)"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .child import run_child

_NUMBER = re.compile(r"(=\s*)(-?\d+\.\d+)")  # a decimal number written as a value (not in an id or a token)


def edit_a_number(path: Path, i: int) -> None:
    """Change the first decimal value of a rule file by (i + 1)/1000: a real edit that recompiles a rule."""
    lines = path.read_text(encoding="utf-8").split("\n")
    for k, line in enumerate(lines):
        m = None if line.lstrip().startswith(("#", "check")) else _NUMBER.search(line)  # check tables: not compiled
        if m:
            new = f"{float(m.group(2)) + (i + 1) / 1000:.6g}"
            lines[k] = line[:m.start(2)] + new + line[m.end(2):]
            path.write_text("\n".join(lines), encoding="utf-8")
            return
    raise ValueError(f"{path}: no decimal value to edit")
from .results import Section
from .stats import summarize


def verify_command() -> list[str]:
    """`python -m verify.cli`, run from this checkout's root (run_child's cwd): the `handmodel` console script
    runs whichever checkout was pip-installed, which in a second worktree is not the code being benchmarked."""
    return [sys.executable, "-m", "verify.cli"]


def _slice_corpus(src: Path, dst: Path, n_stories: int) -> Path:
    from reference.corpus import EOT, read_stories

    dst.write_text("".join(f"{s}\n{EOT}\n" for s in read_stories(src)[:n_stories]), encoding="utf-8")
    return dst


def run(w, cfg, log=print) -> tuple[Section, dict]:
    sec = Section("inner_loop")
    tmp = Path(tempfile.mkdtemp(prefix="verify-", dir=w.work))
    try:
        corpus, train = w.corpus, w.train_corpus
        if cfg.quick:
            corpus = _slice_corpus(w.corpus, tmp / "valid_slice.txt", cfg.quick_eval_stories)
            if train is not None:
                train = _slice_corpus(train, tmp / "train_slice.txt", cfg.quick_train_stories)
            sec.notes.append(f"--quick: verify runs on the first {cfg.quick_eval_stories} stories of {w.corpus.name}"
                             + (f", baselines fitted on the first {cfg.quick_train_stories} of {w.train_corpus.name}"
                                if train is not None else "") + " (not comparable with a full run)")
        elif cfg.skip_cold and train is not None:
            # the baselines are built once, untimed: fit them on a slice so that warm-up stays short. Warm
            # runs only load the cached tables, whose size does not depend on the train text.
            w.work.mkdir(parents=True, exist_ok=True)
            train = _slice_corpus(train, w.work / "verify-train-slice.txt", cfg.skip_cold_train_stories)
            sec.notes.append(f"--skip-cold: baselines fitted on the first {cfg.skip_cold_train_stories} stories of "
                             f"{w.train_corpus.name} (built once, untimed; warm runs only load them)")
        rules = tmp / "rules"
        shutil.copytree(w.rules_dir, rules)
        touched = max(rules.glob("*.toml"), key=lambda p: p.stat().st_size)
        out_json = tmp / "verify.json"
        cmd = verify_command() + ["verify", "--checkpoint", str(w.ckpt), "--rules", str(rules),
                                  "--corpus", str(corpus), "--json-out", str(out_json)]
        if train is not None:
            cmd += ["--train-corpus", str(train)]
        # cold: a fresh cache in the scratch dir; --skip-cold: a cache kept across benchmark runs instead
        cache = (w.work / "verify-cache") if cfg.skip_cold else (tmp / "cache")
        env = {"HANDMODEL_CACHE": str(cache)}

        def one(label: str):
            out_json.unlink(missing_ok=True)
            r = run_child(cmd, env=env).check(f"verify ({label})")
            rep = json.loads(out_json.read_text())
            return r, rep

        log("  verify, " + ("warm-up (--skip-cold)" if cfg.skip_cold else "cold (fresh HANDMODEL_CACHE)") + " ...")
        cold, cold_rep = one("cold")
        warm, warm_reps = [], []
        for i in range(cfg.verify_repeats):
            edit_a_number(touched, i)
            r, rep = one(f"warm {i}")
            warm.append(r)
            warm_reps.append(rep)
        walls = [r.wall for r in warm]
        sec.add("verify_warm_s", "verify, warm, one number of the largest rule file edited", "s", "lower", walls, target="<= 3 s")
        if not cfg.skip_cold:
            sec.add("verify_cold_s", "verify, cold (fresh cache: reference log-probs + baselines built)", "s", "lower",
                    cold.wall, note="one run: a cold start happens once")
            sec.add("cold_over_warm", "cold / warm wall time", "x", "none", cold.wall / summarize(walls)["median"])
        else:
            sec.notes.append(f"--skip-cold: no cold run; verify's cache is kept in {cache}")
        keys = sorted({k for rep in warm_reps for k in rep.get("timings", {})})
        sec.details = {
            "command": " ".join(cmd), "env": env, "touched_file": touched.name,
            "touched_file_bytes": touched.stat().st_size,
            "eval_tokens": cold_rep["header"]["n_tokens"], "n_rules": cold_rep["header"]["n_rules"],
            "n_groups": cold_rep["header"]["n_groups"],
            "warm_timings_median_s": {k: summarize([rep["timings"][k] for rep in warm_reps if k in rep["timings"]])["median"]
                                      for k in keys},
            "cold_timings_s": cold_rep.get("timings", {}),
            "warm_wall_seconds_reported_by_verify": [rep.get("wall_seconds") for rep in warm_reps],
            "final_kl": cold_rep["final"]["kl"],
        }
        sec.notes.append(f"warm: {len(walls)} runs, each after editing one number of {touched.name} (the largest "
                         f"rule file) of a copy of the rules; verify's own breakdown (median): "
                         + ", ".join(f"{k} {v:.2f} s" for k, v in sec.details["warm_timings_median_s"].items()))
        peaks = {"verify_warm": max(r.maxrss_bytes for r in warm)}
        if not cfg.skip_cold:
            peaks["verify_cold"] = cold.maxrss_bytes
        return sec, peaks
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
