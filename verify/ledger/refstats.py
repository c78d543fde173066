"""The engine's reference statistics, kept next to the reference cache between processes.

A pass over the whole eval set needs, per position, statistics of the reference row that do not depend on the
rules being edited: sum p, sum p log p and argmax; p's mass per atom of the classes; p . base row
(HandModel._ref_stats). Each is a pass over the 663 MB float16 cache of valid.txt, ~0.6 s together in a fresh
process, which is every `verify` after a neuron edit. The engine names each by what it depends on; this store
keeps them in the reference entry's `stats/` folder as .npz files (never unpickled), each with the name it was
saved under and a CRC-32 of its arrays, checked when read: a damaged or swapped file is reported, deleted and
computed again. Writes are atomic (a temporary per process, then a rename). The last KEEP files of each kind
(the name's part before its first "-") are kept, most recently used first: the atom masses (41 MB for valid.txt)
change with the classes, p . base with the prior and bigram rules.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from .integrity import clean_stale, damaged

KEEP = 3


def _crc(arrays: dict[str, np.ndarray]) -> str:
    c = 0
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        c = zlib.crc32(f"{k}:{a.dtype.str}:{a.shape}".encode(), c)
        c = zlib.crc32(memoryview(a).cast("B"), c)
    return f"{c:08x}"


class RefStatsStore:
    """handmodel.engine.StatsStore over one reference cache entry (verify/ledger/data.RefCache)."""

    def __init__(self, ref_dir: Path):
        self.dir = Path(ref_dir) / "stats"

    def load(self, name: str, want: dict) -> dict[str, np.ndarray] | None:
        f = self.dir / f"{name}.npz"
        if not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in want}
                stored, crc = str(z["name"]), str(z["crc"])
            if stored != name:
                why = f"it holds {stored[:24]!r}"
            elif crc != _crc(arrays):
                why = "checksum mismatch"
            else:
                try:
                    os.utime(f)  # most recently used: the eviction keeps it
                except OSError:
                    pass
                return arrays
        except Exception as e:  # noqa: BLE001 -- any unreadable file is computed again, never used
            why = f"unreadable: {type(e).__name__}: {str(e)[:80]}"
        damaged(f, why)
        try:
            f.unlink()
        except OSError:
            pass
        return None

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        try:
            self.dir.mkdir(exist_ok=True)
            clean_stale(self.dir)
            tmp = self.dir / f".{name}.tmp{os.getpid()}.npz"
            np.savez(tmp, name=np.array(name), crc=np.array(_crc(arrays)), **arrays)
            tmp.replace(self.dir / f"{name}.npz")
            self._evict(name.split("-", 1)[0])
        except OSError:
            pass  # a read-only cache computes them again next time

    def _evict(self, kind: str) -> None:
        files = sorted(self.dir.glob(f"{kind}-*.npz"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for f in files[KEEP:]:
            f.unlink(missing_ok=True)
