"""A 50k vocabulary is a different scale: a random 50,257-token one-layer model in our format, what each
vocabulary-sized structure costs, and measured runs of the parts that fit in this machine's memory.

    python -m benchmarks.vocab50k --out /tmp/v50k [--vocab 50257] [--stories 200] [--d-model 256]

The model is random (our own init) with the shipped tokenizer widened to V tokens: ids >= 4096 are
`<|unused_i|>` entries no text produces, so valid.txt still tokenizes as for the shipped model while every
[V]-, [N, V]- and [V, V]-shaped structure has its 50k size. Each measured step runs in its own process
(peak RSS from getrusage of that child). `verify` is run end to end, cold then warm, only when the estimate of
its peak fits in the memory available now; otherwise the report says what it needs.

Vocabulary-sized structures (bytes at V = 50,257; N eval positions, P training positions):
- verify/ledger/baselines.py oracle bigram fit: float64 [V, V] accumulator + float32 [V, V] partial = 12 V^2 = 30.3 GB,
  then log_bigram float32 [V, V] = 10.1 GB on disk (memory-mapped by every verify / suggest).
- verify/discover/bigrams.py draft_bigrams: np.exp(log_bigram) as float64 [V, V] = 20.2 GB.
- reference/oracle.py direct_path() with no tokens (benchmarks/workload.py asks for it): float32 [V, V] = 10.1 GB.
- verify/ledger/data.py reference cache: float16 [N, V] memory-mapped (80k valid positions: 8.0 GB on disk).
- suggest --positions P: ~8 P V bytes (its help says so): 32,768 x 50k = 13.2 GB.
- one forward's float32 logits [B, T, V]: 16,384 tokens x V x 4 = 3.3 GB (+ the log-softmax copy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "tinystories"
VALID, TRAIN = CORPUS / "valid.txt", CORPUS / "train.txt"
GB = 1e9


def make_model(out: Path, V: int, d_model: int, n_heads: int, d_mlp: int, n_ctx: int, seed: int) -> None:
    """A random V-token model in our checkpoint format, tokenizer = the shipped one widened to V ids."""
    import torch

    from reference.checkpoint import DEFAULT_DIR, save_checkpoint
    from reference.model import ModelConfig, OneLayerTransformer

    tok = json.loads((DEFAULT_DIR / "tokenizer.json").read_text())
    base = len(tok["model"]["vocab"])
    if V < base:
        raise SystemExit(f"--vocab {V} is below the shipped tokenizer's {base}")
    tok["model"]["vocab"].update({f"<|unused_{i}|>": i for i in range(base, V)})
    torch.manual_seed(seed)
    model = OneLayerTransformer(ModelConfig(vocab_size=V, n_ctx=n_ctx, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp))
    save_checkpoint(model, out, json.dumps(tok), {"what": f"random {V}-token model (benchmarks/vocab50k.py)", "seed": seed})


def shipped_rules_for(ck: Path, out: Path) -> Path:
    """The shipped rules/ re-stamped for the widened vocabulary: its first 4,096 tokens are the shipped ones, so
    every token a rule names means what it meant; the <|unused_i|> tokens get only what the prior gives them."""
    import re

    from handmodel.compiled import vocab_fingerprint
    from handmodel.vocab import load_vocab

    fp = vocab_fingerprint(load_vocab(ck / "tokenizer.json"))
    out.mkdir(exist_ok=True)
    for f in sorted((ROOT / "rules").glob("*.toml")):
        (out / f.name).write_text(re.sub(r'(?m)^vocab = ".*"$', f'vocab = "{fp}"', f.read_text()))
    return out


def estimates(V: int, N: int, P: int, D: int) -> dict[str, float]:
    """Bytes of each vocabulary-sized structure (see the module docstring for where each lives)."""
    return {"oracle bigram fit (12 V^2)": 12 * V * V, "log_bigram file (4 V^2)": 4 * V * V,
            "suggest bigram draft exp (8 V^2)": 8 * V * V, "direct_path (4 V^2)": 4 * V * V,
            f"reference cache float16 [N={N:,}, V]": 2 * N * V, f"suggest --positions {P:,} (8 P V)": 8 * P * V,
            "forward logits, 16k tokens (2 x 4 x 16384 V)": 8 * 16384 * V, "weights (E, U)": 8 * V * D}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def child(code: str, env: dict, logdir: Path) -> tuple[float, int, str]:
    """Run python code in a fresh process: (wall seconds, that child's own peak RSS in bytes, stdout)."""
    out, err = logdir / "step.out", logdir / "step.err"
    t0 = time.perf_counter()
    with out.open("w") as fo, err.open("w") as fe:
        p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=fo, stderr=fe)
        _, status, ru = os.wait4(p.pid, 0)  # rusage of this child alone (ru_maxrss in KiB on Linux)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"step failed:\n{err.read_text()[-2000:]}")
    return wall, ru.ru_maxrss * 1024, out.read_text()


REF_CACHE = """
from pathlib import Path
from verify.data import EvalSpec, checkpoint_info, get_ref_cache
c = get_ref_cache(checkpoint_info({ck!r}), EvalSpec(corpus=Path({text!r})), log=lambda *a: None)
import numpy as np
rows = 0.0
for s in range(0, c.logp.shape[0], 4096):  # a warm verify reads every row of the memory-mapped cache
    rows += float(np.exp(c.logp[s:s + 4096].astype(np.float32)).sum())
print(c.logp.shape[0], c.built, round(rows / c.logp.shape[0], 3))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (model, eval slice, private cache)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=1024)
    ap.add_argument("--stories", type=int, default=200, help="first N stories of valid.txt (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not (VALID.exists() and TRAIN.exists()):
        raise SystemExit(f"needs {VALID} and {TRAIN}")
    a.out.mkdir(parents=True, exist_ok=True)
    ck, text, train = a.out / "model", a.out / "valid_slice.txt", a.out / "train_slice.txt"
    from reference.corpus import EOT

    for src, dst, n in ((VALID, text, a.stories), (TRAIN, train, 4 * a.stories)):  # outside the repo: never committed
        stories = src.read_text().split(EOT)
        dst.write_text(EOT.join(stories[:n] if n else stories))
    t0 = time.perf_counter()
    make_model(ck, a.vocab, a.d_model, a.n_heads, a.d_mlp, 256, a.seed)
    report = {"vocab": a.vocab, "d_model": a.d_model, "stories": a.stories, "make_model_s": round(time.perf_counter() - t0, 1)}
    env = {**os.environ, "HANDMODEL_CACHE": str(a.out / "cache")}
    for label in ("cold", "warm"):
        wall, peak, out = child(REF_CACHE.format(ck=str(ck), text=str(text)), env, a.out)
        n, built, mass = out.split()
        report[f"ref_cache_{label}"] = {"wall_s": round(wall, 1), "peak_rss_gb": round(peak / GB, 2), "positions": int(n),
                                        "built": built == "True", "mean_row_mass": float(mass)}
    N = report["ref_cache_cold"]["positions"]
    est = estimates(a.vocab, N, 32768, a.d_model)
    report["estimates_gb"] = {k: round(v / GB, 2) for k, v in est.items()}
    need = est["oracle bigram fit (12 V^2)"] + 2 * N * a.vocab
    avail = available_bytes()
    report["verify_needs_gb"], report["available_now_gb"] = round(need / GB, 1), round(avail / GB, 1)
    if need < 0.7 * avail:
        rules = shipped_rules_for(ck, a.out / "rules")
        cmd = (f"from verify.cli import main; import sys; sys.exit(main(['verify', '--checkpoint', {str(ck)!r}, "
               f"'--rules', {str(rules)!r}, "
               f"'--corpus', {str(text)!r}, '--train-corpus', {str(train)!r}, '--final-only', '--json-out', "
               f"{str(a.out / 'verify.json')!r}]))")
        for label in ("cold", "warm"):
            wall, peak, _ = child(cmd, env, a.out)
            report[f"verify_{label}"] = {"wall_s": round(wall, 1), "peak_rss_gb": round(peak / GB, 2)}
    else:
        report["verify"] = (f"skipped: the oracle bigram fit alone needs {est['oracle bigram fit (12 V^2)'] / GB:.1f} GB "
                            f"(12 V^2 bytes), {avail / GB:.1f} GB available now")
    print(json.dumps(report, indent=2))
    (a.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
