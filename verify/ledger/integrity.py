"""Cache entries that prove what they are: every file's dtype, shape and checksum is recorded when an
entry is built and checked when it is read, so a swapped, truncated or garbage file is rebuilt, never
used (and never blamed on the hand model).

Checksums are CRC-32 over the file's bytes (damage detection, not a defence against a hostile writer:
nothing in a cache is ever unpickled, so the worst a writer can do is give wrong numbers). Reading a
few hundred MB costs ~0.3 s, so a verified entry leaves a `checked.json` stamp of each file's (size,
mtime, inode): while the stamps match, the checksums are not re-read; any write, truncation or
swap changes a stamp and the next read checks everything again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np

STAMP = "checked.json"
_TMP = re.compile(r"^\..+\.(?:tmp|damaged)(\d+)(\.npz)?$")  # our temporaries and entries being discarded


def damaged(entry, why: str, log=None) -> None:
    """The one line a user sees about a bad cache entry (stderr: --json output stays clean)."""
    msg = f"cache entry {entry} was damaged ({why}): rebuilding"
    (log or (lambda m: print(m, file=sys.stderr)))(msg)


def crc(path: Path, chunk: int = 1 << 24) -> str:
    c = 0
    with open(path, "rb") as f:
        while b := f.read(chunk):
            c = zlib.crc32(b, c)
    return f"{c:08x}"


def record(path: Path) -> dict:
    """What an .npy file is, for meta.json: dtype, shape, size and checksum."""
    a = np.load(path, mmap_mode="r", allow_pickle=False)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "bytes": path.stat().st_size, "crc32": crc(path)}


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def check_entry(d: Path, files: dict) -> str | None:
    """None when every recorded file in folder d is present and intact, else why not (one phrase)."""
    if not isinstance(files, dict) or not files:
        return "no file records in meta.json"
    try:
        stamps = json.loads((d / STAMP).read_text())
    except (OSError, ValueError):
        stamps = None
    for name, rec in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001 -- a garbage header is exactly what we are looking for
            return f"{name} is unreadable ({type(e).__name__})"
        if not isinstance(rec, dict) or a.dtype.str != rec.get("dtype") or list(a.shape) != rec.get("shape"):
            return f"{name} is {a.dtype.str} {list(a.shape)}, recorded {rec.get('dtype')} {rec.get('shape')}"
        if f.stat().st_size != rec.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, recorded {rec.get('bytes')}"
    current = {name: _stamp(d / name) for name in files}
    if stamps == current:
        return None
    for name, rec in files.items():
        if crc(d / name) != rec.get("crc32"):
            return f"{name} fails its checksum"
    try:  # best effort: a read-only cache just checks again next time
        tmp = d / f".{STAMP}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(current))
        tmp.replace(d / STAMP)
    except OSError:
        pass
    return None


def discard(d: Path) -> None:
    """Move a damaged entry folder aside (readers that hold it open keep their view), then delete it."""
    aside = d.parent / f".{d.name}.damaged{os.getpid()}"
    try:
        d.rename(aside)
    except OSError:
        aside = d
    shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(root: Path) -> None:
    """Delete `.KEY.tmpPID` folders/files left in root by builds whose process is gone (killed midway),
    and `.KEY.damagedPID` folders a killed run was deleting;
    a live process's build in progress is left alone. Assumes one machine per cache folder."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        m = _TMP.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p = root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass
