"""The results document: sections of metrics (each a median with its spread) + details + notes.

A metric: {"id": "<section>.<key>", "label", "unit", "better": "higher"|"lower"|"none", "median", "q1",
"q3", "min", "max", "n", "note"?, "target"?}. `compare` matches metrics of two files by id.
Units: "tok/s", "s", "bytes", "x" (a ratio), "slope" (log-log), "count".
"""
from __future__ import annotations

import json
from pathlib import Path

from .stats import summarize

SCHEMA = 1
SECTIONS = {
    "throughput": "1. Full next-token distribution: tokens/s, hand vs reference",
    "kl_throughput": "2. KL given cached reference log-probs (stream_metrics)",
    "inner_loop": "3. Inner loop: `handmodel verify` wall time",
    "memory": "4. Memory: peak RSS and bytes",
    "scaling": "5. Scaling of the hand model",
    "compile": "6. Compile cost",
}


class Section:
    def __init__(self, name: str):
        self.name = name
        self.title = SECTIONS[name]
        self.metrics: list[dict] = []
        self.details: dict = {}
        self.notes: list[str] = []

    def add(self, key: str, label: str, unit: str, better: str, value, note: str | None = None,
            target: str | None = None) -> dict:
        """value: a summary dict (from stats.summarize), a list of samples, or one number."""
        if isinstance(value, dict):
            st = dict(value)
        elif isinstance(value, (list, tuple)):
            st = summarize(value)
        else:
            st = summarize([value])
        m = {"id": f"{self.name}.{key}", "label": label, "unit": unit, "better": better, **st}
        if note:
            m["note"] = note
        if target:
            m["target"] = target
        self.metrics.append(m)
        return m

    def to_dict(self) -> dict:
        return {"title": self.title, "metrics": self.metrics, "details": self.details, "notes": self.notes}


def all_metrics(res: dict) -> list[dict]:
    return [m for s in res.get("sections", {}).values() for m in s.get("metrics", [])]


def write(res: dict, paths: list[Path]) -> None:
    text = json.dumps(res, indent=2, ensure_ascii=False) + "\n"
    for p in paths:
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def load(path: Path) -> dict:
    res = json.loads(Path(path).read_text(encoding="utf-8"))
    if "sections" not in res:
        raise ValueError(f"{path}: not a benchmark results file (no 'sections')")
    return res
