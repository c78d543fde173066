"""`handmodel verify --watch` (verify/cli/watch.py): one warm process verifies again after each save of a rule
file, reports a bad edit and goes on, and ends cleanly on Ctrl-C."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from verify.cli.watch import changed_names, stamp, watch

PRIOR = '[[prior]]\nid = "pets"\ndoc = "names are likely"\nnext = {{ " Lily" = {x}, "." = 1.0 }}\n'


def test_watch_runs_once_per_settled_change_and_names_the_files(tmp_path):
    (tmp_path / "a.toml").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not a rule file")
    runs: list[list[str]] = []
    done = threading.Event()

    def run(names):
        runs.append(names)
        if len(runs) == 2:
            done.set()

    t = threading.Thread(target=watch, args=(tmp_path, run), kwargs={"poll": 0.05, "stop": done.is_set})
    t.start()
    time.sleep(0.2)
    (tmp_path / "notes.txt").write_text("still not a rule file")  # ignored
    time.sleep(0.3)
    assert runs == []
    (tmp_path / "a.toml").write_text("x = 22\n")
    time.sleep(0.4)
    (tmp_path / "b.toml").write_text("y = 1\n")
    assert done.wait(10)
    t.join(10)
    assert runs == [["a.toml"], ["b.toml"]]


def test_stamps_see_size_time_and_removal(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text("x = 1\n")
    s0 = stamp(tmp_path)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    s1 = stamp(tmp_path)
    f.unlink()
    assert changed_names(s0, s1) == ["a.toml"] and changed_names(s1, stamp(tmp_path)) == ["a.toml"]
    assert changed_names(s0, s0) == []


class _Output:
    """proc's output lines (a reader thread fills `lines`), read forward from a cursor."""

    def __init__(self, proc):
        self.proc, self.lines, self.seen = proc, [], 0
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self.reader.start()

    def until(self, pattern: str, timeout: float = 240) -> str:
        """The next line matching `pattern`."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            while self.seen < len(self.lines):
                self.seen += 1
                if re.search(pattern, self.lines[self.seen - 1]):
                    return self.lines[self.seen - 1]
            if self.proc.poll() is not None and self.seen == len(self.lines):
                raise AssertionError(f"verify --watch ended (rc {self.proc.returncode}):\n" + "".join(self.lines[-40:]))
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n" + "".join(self.lines[-40:]))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_verify_watch_measures_each_save_reports_a_bad_one_and_ends_on_a_signal(tiny_world, tmp_path, stop):
    ckpt, evalf, train = tiny_world
    rules = tmp_path / "r"
    rules.mkdir()
    (rules / "20_prior.toml").write_text(PRIOR.format(x="3.0"))
    env = {**os.environ, "HANDMODEL_CACHE": str(tmp_path / "cache"), "COLUMNS": "120",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "verify.cli", "verify", "--checkpoint", str(ckpt), "--rules",
                             str(rules), "--corpus", str(evalf), "--train-corpus", str(train), "--no-verified",
                             "--watch"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            # Ctrl-C as in a terminal: a test run started in the background inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = _Output(proc)
    try:
        first = out.until(r"^final KL")
        out.until(r"watching")
        (rules / "20_prior.toml").write_text(PRIOR.format(x="-2.0"))
        out.until(r"20_prior.toml changed")
        second = out.until(r"^final KL")
        assert first != second  # the edit was measured
        out.until(r"watching")
        (rules / "20_prior.toml").write_text(PRIOR.format(x="oops"))
        err = out.until(r"error")
        assert "20_prior.toml:4" in err, err  # the one-line error names the file and line
        out.until(r"watching")
        (rules / "20_prior.toml").write_text(PRIOR.format(x="3.0"))
        third = out.until(r"^final KL")
        assert third == first  # back to the first numbers
        proc.send_signal(stop)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("verify --watch did not end:\n" + "".join(out.lines[-20:])) from None
        out.reader.join(10)
        assert rc == 0 and "watch ended" in "".join(out.lines[-3:]), "".join(out.lines[-20:])
        assert "Traceback" not in "".join(out.lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watch_refuses_json_output(tiny_world, tmp_path):
    from verify.cli import main

    ckpt, evalf, train = tiny_world
    rules = tmp_path / "r"
    rules.mkdir()
    (rules / "20_prior.toml").write_text(PRIOR.format(x="3.0"))
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["verify", "--checkpoint", str(ckpt), "--rules", str(rules), "--corpus", str(evalf), "--watch",
                   "--json"])
    assert rc != 0 and "--watch" in err.getvalue()


def test_a_save_made_before_the_watch_starts_is_not_missed(tmp_path):
    """verify --watch stamps the folder before its first run and warm-up: a save made meanwhile still counts."""
    f = tmp_path / "a.toml"
    f.write_text("x = 1\n")
    since = stamp(tmp_path)
    f.write_text("x = 333\n")  # while the first run was busy
    runs: list[list[str]] = []
    watch(tmp_path, runs.append, poll=0.05, stop=lambda: bool(runs), since=since)
    assert runs == [["a.toml"]]
