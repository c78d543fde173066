"""`handmodel verify --watch`: verify again each time a rule file is saved, in one process that stays warm.

A fresh `verify` after an edit spends about a second before it reads a rule: starting Python and importing
the CLI (~0.4 s), importing numba and setting up its target (~0.6 s). A process that stays running pays that
once; every later run re-reads only the files whose text changed (and of those only the changed tables,
handmodel/tomlblocks.py), patches the compiled arrays and recomputes only the positions the edit reaches.
The folder is polled (stat of each *.toml, no extra dependency); a change is acted on once two polls agree,
so an editor's save in several writes is read once, whole. `serve` is the loop verify_cmd hands its rerun to.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Callable, NamedTuple

from handmodel.errors import UserError


class FileStamp(NamedTuple):
    name: str
    size: int
    mtime_ns: int


def stamp(folder: Path) -> tuple[FileStamp, ...]:
    """What a save changes: name, size and modification time of each rule file in the folder (the files
    load_rules reads: *.toml, a link followed, a dangling one skipped like an editor's lock file)."""
    out = []
    try:
        names = sorted(p for p in Path(folder).iterdir() if p.suffix == ".toml")
    except OSError:  # the folder itself gone or unreadable for a moment: nothing to compare yet
        return ()
    for p in names:
        try:
            st = p.stat()
        except OSError:  # removed between the listing and the stat, or a dangling link
            continue
        out.append(FileStamp(p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def changed_names(old: tuple[FileStamp, ...], new: tuple[FileStamp, ...]) -> list[str]:
    a, b = {s.name: s for s in old}, {s.name: s for s in new}
    return sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))


def watch(folder: Path, run: Callable[[list[str]], None], poll: float = 0.1,
          stop: Callable[[], bool] = lambda: False, since: tuple[FileStamp, ...] | None = None) -> None:
    """Call run(names of the changed files) after each settled change to the folder's rule files, until
    stop() (or Ctrl-C, which the caller handles). `run` reports its own errors: a bad edit must not end the
    watch. `since`: the stamp the caller's last read of the files started from (default: now), so that a save
    made while the caller was busy is not missed."""
    last = stamp(folder) if since is None else since
    while not stop():
        time.sleep(poll)
        now = stamp(folder)
        if now == last:
            continue
        time.sleep(poll / 4)  # settled: the same stamp twice in a row
        if stamp(folder) != now:
            continue
        names, last = changed_names(last, now), now
        run(names)


def serve(folder: Path, rerun: Callable[[], object], console, since: tuple[FileStamp, ...],
          warm: Callable[[], None] = lambda: None) -> None:
    """verify --watch after its first run: warm(), then rerun() after each settled save until Ctrl-C or SIGTERM
    (a watch started in the background ignores SIGINT), which end it cleanly. A UserError (a bad edit) is
    printed as one line and the watch goes on."""
    def again(names: list[str]) -> None:
        console.rule(f"[dim]{', '.join(names)} changed: verifying again[/dim]")
        try:
            rerun()
        except UserError as e:
            console.print(f"[bold red]error[/bold red]: {e}", soft_wrap=True)
        console.print(f"[dim]watching {folder} (Ctrl-C ends)[/dim]")

    def stop(signum, frame):
        raise KeyboardInterrupt

    console.print(f"[dim]watching {folder} (Ctrl-C ends)[/dim]")
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: Ctrl-C only
        old = None
    try:
        warm()
        watch(Path(folder), again, since=since)
    except KeyboardInterrupt:
        console.print("[dim]watch ended[/dim]")
    finally:
        if old is not None:  # an in-process caller gets its own SIGTERM handling back
            signal.signal(signal.SIGTERM, old)
