"""python -m benchmarks [run] [options]        hand model vs reference: speed, memory, scaling
python -m benchmarks compare A.json B.json     B / A for every metric of two result files"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_parser() -> argparse.ArgumentParser:
    from .run import LATEST
    from .workload import DEFAULT_CHECKPOINT, DEFAULT_CORPUS, DEFAULT_RULES

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "Hand model vs reference, measured side by side: throughput of the full next-token distribution, KL "
        "throughput, the verify inner loop, memory, scaling, compile cost. Prints a table and writes JSON "
        f"({LATEST.relative_to(LATEST.parents[2])}). `python -m benchmarks compare A.json B.json` compares two runs."))
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="reference checkpoint folder (default: %(default)s)")
    p.add_argument("--rules", type=Path, default=DEFAULT_RULES,
                   help="rules folder (default: %(default)s; when absent a generated scale-1 ruleset is used, and the output says so)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="eval text (default: %(default)s)")
    p.add_argument("--train-corpus", type=Path, default=None,
                   help="text verify fits its baselines on (default: train.txt beside --corpus, if present)")
    p.add_argument("--quick", action="store_true", help="small workload and few repeats (< 60 s)")
    p.add_argument("--tokens", type=int, default=None, help="workload size in tokens (default 16384; quick 4096)")
    p.add_argument("--repeats", type=int, default=None, help="paired timed rounds of the main measurements (default 7, fewer if a 30 s budget runs out; quick 3)")
    p.add_argument("--rule-scales", type=str, default=None, help="genrules scales for the scaling section (default 1,10,100; quick 1,2,5)")
    p.add_argument("--skip-cold", action="store_true",
                   help="no cold verify run (it fits the baselines on the whole train text: about a minute on a quiet "
                        "machine, minutes on a loaded one); verify's cache is kept under --work across runs instead")
    p.add_argument("--overlap-compile", action="store_true",
                   help="start section 6's cold numba compile (a minute or more, in its own process) before section 1, "
                        "alongside the other sections: hides its wall time in smoke runs (tests, CI), but every timing "
                        "then includes that contention")
    p.add_argument("--no-cold-compile", action="store_true",
                   help="skip section 6's cold numba compile probe (a whole compile in a fresh process; smoke tests); "
                        "the warm probes still run")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--force", action="store_true",
                   help="run even when the load average exceeds the usable cores (the result is marked as measured under load)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads both sides (torch and numba) are pinned to in the paired repeats (default: the usable cores)")
    p.add_argument("--no-latest", action="store_true", help=f"do not write {LATEST.name} (tests, scratch runs)")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch + generated-rules cache (default: $HANDMODEL_CACHE/benchmarks, i.e. ~/.cache/handmodel/benchmarks)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from rich.console import Console

    con = Console(highlight=False, width=None if sys.stdout.isatty() else 170)
    if argv and argv[0] == "compare":
        p = argparse.ArgumentParser(prog="python -m benchmarks compare",
                                    description="B / A of every metric's median (tok/s: >1 is faster; s, bytes: <1 is better)")
        p.add_argument("a", type=Path)
        p.add_argument("b", type=Path)
        a = p.parse_args(argv[1:])
        from .report import compare
        from .results import load

        try:
            ra, rb = load(a.a), load(a.b)
        except (OSError, ValueError) as e:
            con.print(f"[red]error[/]: {e}")
            return 2
        compare(ra, rb, con, a_name=a.a.name, b_name=a.b.name)
        return 0
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = _run_parser().parse_args(argv)

    from handmodel.errors import UserError
    from reference.corpus import cache_dir

    from .report import render
    from .run import LATEST, Config, run

    from .machine import load_verdict

    busy = load_verdict()
    if busy:
        if not args.force:
            con.print(f"[bold red]refusing to benchmark[/]: {busy}. Wait for a quiet machine, or pass --force "
                      "(the result is then marked as measured under load).")
            return 2
        con.print(f"[bold red]WARNING[/]: {busy}; going on (--force), and the result says so.")
    over = {"tokens": args.tokens, "repeats": args.repeats, "skip_cold": args.skip_cold or None,
            "paired_threads": args.threads, "overlap_compile": args.overlap_compile or None,
            "cold_compile": False if args.no_cold_compile else None}
    if args.rule_scales:
        over["rule_scales"] = tuple(float(x) if "." in x else int(x) for x in args.rule_scales.split(","))
    cfg = Config.make(args.quick, **over)
    train = args.train_corpus
    if train is None:
        cand = args.corpus.parent / "train.txt"
        train = cand if cand.exists() and cand.resolve() != args.corpus.resolve() else None
    outs = ([] if args.no_latest else [LATEST]) + ([args.out] if args.out else [])
    work = args.work or (cache_dir() / "benchmarks")
    try:
        res = run(args.checkpoint, args.rules, args.corpus, train, cfg, work, outs, log=con.print)
    except UserError as e:
        con.print(f"[red]error[/]: {e}")
        return 2
    render(res, con)
    if outs:
        con.print(f"wrote {', '.join(str(o) for o in outs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
