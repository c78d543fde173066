"""`python -m benchmarks`: the --quick run on a tiny checkpoint with a tiny generated ruleset produces every
section with finite, positive numbers, and `compare` reads two result files. No timing thresholds:
the machine is shared, so only the shape and sanity of the results are checked."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks.__main__ import main
from benchmarks.report import compare
from benchmarks.results import SECTIONS, all_metrics, load
from benchmarks.stats import interleaved, loglog_slope, summarize

MACHINE_KEYS = ("cpu_model", "cores_logical", "python", "numpy", "numba", "torch", "git_commit", "loadavg_start",
                "under_load")


def test_stats_helpers():
    s = summarize([3.0, 1.0, 2.0, 4.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["n"] == 4 and s["q1"] <= s["q3"]
    assert loglog_slope([1, 2, 4, 8], [3, 6, 12, 24]) == pytest.approx(1.0)
    assert loglog_slope([1, 2, 4], [5, 20, 80]) == pytest.approx(2.0)
    calls = []
    out = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and len(out["a"]) == len(out["b"]) == 3
    # a budget stops early, but never before min_repeats
    out = interleaved({"a": lambda: None}, repeats=50, warmup=0, budget_s=0.0, min_repeats=2)
    assert len(out["a"]) == 2


@pytest.mark.slow
def test_quick_run_and_compare(tiny_world, tmp_path, capsys):
    ckpt, evalf, train = tiny_world
    out = tmp_path / "a.json"
    # --no-cold-compile: no whole cold numba compile in a fresh process (minutes of CI time; the benchmark measures
    # it, a smoke test need not); --rule-scales 0.5,1: the scaling section's rulesets are the workload's and a
    # smaller one (a slope needs two sizes) instead of x2 and x5 more
    rc = main(["--quick", "--checkpoint", str(ckpt), "--corpus", str(evalf), "--train-corpus", str(train),
               "--rules", str(tmp_path / "no-rules-here"), "--work", str(tmp_path / "work"),
               "--out", str(out), "--no-latest", "--force", "--threads", "1", "--no-cold-compile", "--rule-scales", "0.5,1"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "GENERATED ruleset" in printed  # the fallback is announced
    assert "handmodel benchmarks" in printed  # the table
    res = load(out)
    assert res["quick"] is True
    for k in MACHINE_KEYS:
        assert k in res["machine"], k
    assert res["sections"]["throughput"]["details"]["paired_threads"] == 1  # --threads pins both sides
    assert res["config"]["cold_compile"] is False and any("--no-cold-compile" in n for n in res["sections"]["compile"]["notes"])
    assert "compile.numba_cold_first_calls_s" not in {m["id"] for m in all_metrics(res)}  # not measured, not faked
    rule_rows = res["sections"]["scaling"]["details"]["rules"]
    assert [r["scale"] for r in rule_rows] == [0.5, 1] and rule_rows[0]["rules"] < rule_rows[1]["rules"]
    wl = res["workload"]
    assert wl["rules_generated"] and "GENERATED" in wl["rules_source"] and wl["n_rules"] > 0 and wl["tokens"] > 0
    assert set(res["sections"]) == set(SECTIONS)
    for name, sec in res["sections"].items():
        assert sec["metrics"], f"section {name} has no metrics"
        for m in sec["metrics"]:
            assert m["id"].startswith(name + "."), m["id"]
            for k in ("median", "q1", "q3", "min", "max"):
                v = m[k]
                assert isinstance(v, (int, float)) and math.isfinite(v), (m["id"], k, v)
                if m["unit"] != "slope":  # a log-log slope may legitimately be <= 0; everything else is > 0
                    assert v > 0, (m["id"], k, v)
            assert m["min"] <= m["median"] <= m["max"] and m["n"] >= 1
    ids = {m["id"] for m in all_metrics(res)}
    for needed in ("throughput.reference_tokens_per_s", "throughput.hand_tokens_per_s", "throughput.hand_over_reference",
                   "kl_throughput.kl_tokens_per_s", "inner_loop.verify_warm_s", "inner_loop.verify_cold_s",
                   "memory.peak_rss_reference", "memory.peak_rss_hand_logp", "memory.ruleset_array_bytes",
                   "memory.reference_param_bytes", "scaling.tokens_slope_kl", "scaling.context_slope_kl",
                   "scaling.rules_slope_kl", "scaling.threads_speedup_kl", "compile.load_rules_warm_s",
                   "compile.numba_warm_first_calls_s"):
        assert needed in ids, needed
    # the hand model produced a real number for the ledger in the verify subprocess
    assert math.isfinite(res["sections"]["inner_loop"]["details"]["final_kl"])

    # compare: a second file with the hand model twice as fast and one metric missing
    b = json.loads(out.read_text())
    for m in b["sections"]["throughput"]["metrics"]:
        if m["id"] == "throughput.hand_tokens_per_s":
            m["median"] *= 2
    b["sections"]["compile"]["metrics"] = b["sections"]["compile"]["metrics"][1:]
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["compare", str(out), str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    assert "throughput.hand_tokens_per_s" in printed and "in one file only" in printed
    rows = {r["id"]: r for r in compare(res, load(tmp_path / "b.json"))}
    assert rows["throughput.hand_tokens_per_s"]["ratio"] == pytest.approx(2.0)
    assert rows["throughput.hand_tokens_per_s"]["verdict"] == "better"
    assert rows["throughput.reference_tokens_per_s"]["ratio"] == pytest.approx(1.0)


def test_compare_rejects_a_non_result_file(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert main(["compare", str(bad), str(bad)]) == 2
    assert "not a benchmark results file" in capsys.readouterr().out


def test_load_verdict_and_refusal(monkeypatch, tmp_path, capsys):
    from benchmarks import machine

    assert machine.load_verdict(cores=2, load=[1.9, 5.0, 5.0]) is None
    assert machine.load_verdict(cores=2, load=[2.0, 0.0, 0.0]) is None
    why = machine.load_verdict(cores=2, load=[2.5, 0.0, 0.0])
    assert why and "2.50" in why and "2 usable cores" in why
    # a loaded machine: refused without --force, before any work
    monkeypatch.setattr(machine, "loadavg", lambda: [99.0, 99.0, 99.0])
    assert main(["--quick", "--rules", str(tmp_path / "none"), "--work", str(tmp_path / "w"), "--no-latest"]) == 2
    out = capsys.readouterr().out
    assert "refusing to benchmark" in out and "--force" in out and not (tmp_path / "w").exists()


def test_inner_loop_edits_a_compiled_number_not_a_comment(tmp_path):
    """Ledger rows are keyed by the compiled rules, so the benchmark's warm edit must change one (a comment or a
    check table would recompute nothing and time a cache hit)."""
    from benchmarks.inner_loop import edit_a_number

    f = tmp_path / "r.toml"
    f.write_text('# threshold = 0.5\n[[neuron]]\nid = "n"\ncheck = { fraction = 0.6 }\nthreshold = -0.108\n', encoding="utf-8")
    edit_a_number(f, 1)
    assert f.read_text(encoding="utf-8").splitlines() == ["# threshold = 0.5", "[[neuron]]", 'id = "n"',
                                                          "check = { fraction = 0.6 }", "threshold = -0.106"]


def test_lineprof_says_what_it_needs_when_perf_is_missing(tmp_path):
    """Without perf/addr2line/readelf on PATH, `python -m benchmarks.lineprof` names them in one line and exits 2
    before compiling anything."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty folder: none of the tools
    p = subprocess.run([sys.executable, "-m", "benchmarks.lineprof"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["lineprof: needs perf, addr2line, readelf (linux-perf, binutils) on PATH"]
    assert "compiling" not in p.stdout


def test_batching_bound_forms_compute_the_same_sums():
    """benchmarks/batching_bound.py times the engine's scattered weighted-set writes against a blocked matrix product:
    both must be the same sums (measure() checks that before timing), here over overlapping sets and a ragged last
    block, so a wrong union column or a dropped entry fails."""
    from types import SimpleNamespace

    import numpy as np

    from benchmarks.batching_bound import blocked_blas, measure, scattered, written_sets

    V = 40
    ws_ptr = np.array([0, 5, 9, 12, 15])
    ws_tok = np.array([1, 3, 5, 7, 9, 3, 4, 5, 30, 0, 1, 2, 9, 3, 39], np.int32)
    ws_w = np.linspace(-1.0, 2.0, len(ws_tok))
    a = SimpleNamespace(nws_set=np.array([3, 0, 3, 1]), ws_ptr=ws_ptr, ws_tok=ws_tok, ws_w=ws_w)  # set 2 unwritten
    ws = written_sets(a, V)
    assert len(ws.ptr) == 4 and ws.union.tolist() == [1, 3, 4, 5, 7, 9, 30, 39]
    res = measure(ws, V, positions=37, repeats=1, blocks=(4, 16))
    assert set(res) == {"scattered", "blocked BLAS, 4 positions", "blocked BLAS, 16 positions"}
    vals = np.random.default_rng(1).normal(size=(37, 3))
    want = np.array([sum(vals[n, i] * ws_w[ws_ptr[k]:ws_ptr[k + 1]].sum() for i, k in enumerate([0, 1, 3]))
                     for n in range(37)])
    got, sd = np.empty(37), np.zeros(V)
    scattered(vals, ws.ptr, ws.tok, ws.w, sd, got)
    assert np.allclose(got, want) and not sd.any()
    blocked_blas(vals, ws, sd, got, 16)
    assert np.allclose(got, want) and not sd.any()
