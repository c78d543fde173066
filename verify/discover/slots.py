"""Every number written in a set of rule files, as a flat list of *slots* tied to its place in the TOML.

`read_slots(rules)` walks the compiled rules (handmodel.load_rules) in the order resolve.py reads each
table, so slot order matches the resolved Rule fields; each slot also records its key path inside the
tomlkit document, so `write_back` can change the number in place and keep comments, order and layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handmodel.errors import UserError


@dataclass
class Slot:
    file: str
    rule: int  # index into rules.rules
    path: tuple  # keys from the rule's table down to the number
    value: float


@dataclass
class Slots:
    slots: list[Slot] = field(default_factory=list)
    by_rule: list[dict] = field(default_factory=list)
    docs: dict = field(default_factory=dict)  # file -> tomlkit document
    texts: dict = field(default_factory=dict)  # file -> its text as read (write_back refuses if it changed since)
    tables: dict = field(default_factory=dict)  # (file, kind, rule id) -> tomlkit table
    rule_tables: list = field(default_factory=list)  # per rule: its tomlkit table
    file_of: list = field(default_factory=list)

    @property
    def values(self) -> np.ndarray:
        return np.array([s.value for s in self.slots], dtype=np.float64)

    def add(self, ri: int, tbl, path: tuple) -> int:
        v = tbl
        for k in path:
            v = v[k]
        self.slots.append(Slot(file=str(self.file_of[ri]), rule=ri, path=path, value=float(v)))
        return len(self.slots) - 1

    def of_rules(self, rule_indices) -> np.ndarray:
        """Bool mask over slots: those belonging to these rule indices."""
        keep = set(rule_indices)
        return np.array([s.rule in keep for s in self.slots], dtype=np.bool_)


def read_slots(rules) -> Slots:
    import tomlkit

    S = Slots()
    S.file_of = [r.file for r in rules.rules]
    for f in sorted(set(S.file_of)):
        with open(f, encoding="utf-8", newline="") as fh:  # newline="": keep CRLF files CRLF
            S.texts[f] = fh.read()
        S.docs[f] = tomlkit.parse(S.texts[f].removeprefix(BOM))
        for kind, aot in S.docs[f].items():
            if kind in ("group", "vocab") or not isinstance(aot, list):
                continue
            for t in aot:
                S.tables[(f, kind, str(t.get("id")))] = t
    for ri, r in enumerate(rules.rules):
        t = S.tables.get((r.file, r.kind, r.id))
        if t is None:
            raise UserError(f"{r.file}:{r.line}: could not find rule '{r.id}' again in the TOML; is the file being edited?")
        S.rule_tables.append(t)
        d: dict = {}
        if r.kind == "bigram":
            if "rows" in t:
                d["rows"] = [[S.add(ri, t, ("rows", now, s)) for s in t["rows"][now]] for now in t["rows"]]
            else:
                d["rows"] = [[S.add(ri, t, ("next", s)) for s in t["next"]]]
        elif r.kind == "head":
            d["position"] = {}
            for k in t.get("position", {}):
                if k == "default":
                    d["default"] = S.add(ri, t, ("position", k))
                else:
                    d["position"][int(k)] = S.add(ri, t, ("position", k))
            d["score"] = [S.add(ri, t, ("score", i, "w")) for i in range(len(t.get("score", [])))]
        elif r.kind == "neuron":
            if "threshold" in t:
                d["threshold"] = S.add(ri, t, ("threshold",))
            for key in ("now", "present"):
                if key in t:
                    d[key] = [S.add(ri, t, (key, s)) for s in t[key]]
            d["attend"] = [S.add(ri, t, ("attend", h, s)) for h in t.get("attend", {}) for s in t["attend"][h]]
        if r.kind in ("prior", "skip", "head_out", "neuron") and "next" in t:  # a head_out may have only `copy`
            d["next"] = [S.add(ri, t, ("next", s)) for s in t["next"]]
        if r.kind == "head_out" and "copy" in t:
            d["copy"] = S.add(ri, t, ("copy",))
        S.by_rule.append(d)
    return S


def _set(container, key, value: float) -> None:
    import tomlkit

    old = container[key]
    new = tomlkit.item(value)
    tv_old, tv_new = getattr(old, "trivia", None), getattr(new, "trivia", None)
    if tv_old is not None and tv_new is not None:
        for a in ("indent", "comment_ws", "comment", "trail"):
            setattr(tv_new, a, getattr(tv_old, a))
    container[key] = new


def fmt(v: float) -> float:
    """Numbers as written back: 4 significant decimals (a rule file is read by people)."""
    if abs(v) < 5e-4:
        return 0.0
    return float(f"{v:.4g}") if abs(v) < 1000 else round(v, 1)


BOM = "\ufeff"  # a byte-order mark some editors write: kept on write-back


def _target(f: str) -> Path:
    """Where writing `f` lands: through a symlink, its target (the link itself stays a link)."""
    return Path(os.path.realpath(f))


def write_back(S: Slots, theta: np.ndarray, only: np.ndarray | None = None) -> list[str]:
    """Put theta into the TOML documents and write the files that changed. Returns their paths.

    A file edited since read_slots read it is never overwritten (the edit would be lost): the whole
    write is refused, naming it. All new texts go to temporary files first and are renamed into place
    only once every one is written, so a failure part way leaves every rule file as it was."""
    import tomlkit

    changed = set()
    for i, s in enumerate(S.slots):
        if only is not None and not only[i]:
            continue
        v = fmt(float(theta[i]))
        if v == s.value:
            continue
        c = S.rule_tables[s.rule]
        for k in s.path[:-1]:
            c = c[k]
        _set(c, s.path[-1], v)
        changed.add(s.file)
    files = sorted(changed)
    for f in files:
        try:
            with open(_target(f), encoding="utf-8", newline="") as fh:
                now = fh.read()
        except (OSError, UnicodeDecodeError):
            now = None
        if now != S.texts.get(f):
            raise UserError(f"{f}: changed on disk while fit was running (since it was read); nothing was written, "
                            "so your edit is safe: re-run fit on the edited files")
    temps: list[tuple[Path, Path]] = []
    written: dict[str, str] = {}
    try:
        for f in files:
            p = _target(f)
            tmp = p.with_name(f".{p.name}.fit-tmp{os.getpid()}")
            text = tomlkit.dumps(S.docs[f])
            if S.texts[f].startswith(BOM):
                text = BOM + text
            temps.append((tmp, p))
            written[f] = text
            tmp.write_text(text, encoding="utf-8", newline="")
            if p.exists():
                os.chmod(tmp, os.stat(p).st_mode & 0o7777)
    except OSError as e:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise UserError(f"could not write the fitted rule files ({e}); nothing was changed") from None
    for tmp, p in temps:
        tmp.replace(p)
    S.texts.update(written)  # a later write_back in this run compares with what it wrote
    return files
