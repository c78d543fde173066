"""`handmodel report` end to end: the CLI writes one self-contained HTML file, and Debian's headless
Chromium renders it (JS run, DOM dumped, screenshot taken). Uses the tiny random reference of
tests/conftest.py (`tiny_world`) and small rule files that include a head + head_out, so "rules fired"
holds more than the prior.

Chromium is installed by .ci/run (apt). Without it the browser tests skip, unless HANDMODEL_REQUIRE_SHARED=1
(CI), where they fail."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from test_verify_core import BIGRAMS, PRIOR

CHROMIUM = "/usr/bin/chromium"

HEADS = """group = "heads"
[[head]]
id = "prev"
doc = "attends mostly to the previous token"
position = { 1 = 3.0, default = -1.0 }
score = [{ now = " the", src = " happy", w = 1.0 }]

[[head_out]]
id = "the_again"
doc = "having attended to the, predict a or happy"
head = "prev"
src = " the"
next = { " a" = 2.0, " happy" = 1.0 }
"""
LEDGER_ROWS = ["(no rules)", "+ prior", "+ bigrams", "+ heads"]


# -- a minimal DOM from Chromium's --dump-dom output (stdlib only) ----------------------------------
class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)]

    def by_id(self, id_: str) -> "Node":
        hits = [n for n in self.iter() if n.attrs.get("id") == id_]
        assert len(hits) == 1, f"expected one #{id_}, found {len(hits)}"
        return hits[0]


VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "embed", "source", "track", "wbr"}


class _Builder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)

    def handle_starttag(self, tag, attrs):
        n = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(n)
        if tag not in VOID:
            self.cur = n

    def handle_startendtag(self, tag, attrs):  # <line .../> inside the SVG
        self.cur.children.append(Node(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse_dom(text: str) -> Node:
    b = _Builder()
    b.feed(text)
    b.close()
    return b.root


def shown(cell: str) -> str:
    """The report shows tokens as JSON.stringify(s).slice(1, -1); undo that."""
    return json.loads('"' + cell + '"')


def alpha(style: str) -> float:
    m = re.search(r"background(?:-color)?:\s*rgba?\(\s*\d+,\s*\d+,\s*\d+(?:,\s*([0-9.]+))?\s*\)", style)
    assert m, f"no background colour in style {style!r}"
    return float(m.group(1)) if m.group(1) is not None else 1.0


# -- fixtures --------------------------------------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "verify.cli", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def report(tiny_world, tmp_path_factory):
    """The CLI's report for the tiny world, plus the in-process evaluation behind it (same cache)."""
    ckpt, evalf, train = tiny_world
    d = tmp_path_factory.mktemp("report")
    rules = d / "rules"
    rules.mkdir()
    for name, text in {"10_prior.toml": PRIOR, "20_bigrams.toml": BIGRAMS, "30_heads.toml": HEADS}.items():
        (rules / name).write_text(text, encoding="utf-8")
    env = {**os.environ, "HANDMODEL_CACHE": str(d / "cache")}
    out = d / "report.html"
    r = _cli("report", "--checkpoint", ckpt, "--rules", rules, "--corpus", evalf, "--train-corpus", train,
             "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    assert out.exists() and f"wrote {out}" in " ".join(r.stdout.split())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HANDMODEL_CACHE", str(d / "cache"))
        from verify.ledger.evaluate import evaluate

        res = evaluate(ckpt, rules, evalf, 4, 0, train, log=lambda m: None)
    assert not res.header["cache_built"]  # the CLI built it; same eval set, same numbers
    text = out.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    assert m, "the report embeds its token data as JSON"
    data = json.loads(m.group(1))
    return {"dir": d, "out": out, "html": text, "data": data, "res": res}


def chromium(*args: str, profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    require(Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK),
            f"needs Debian's headless Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


def _pick_position(report) -> int:
    """A position where the head_out rule fired (so 'rules fired' lists prior, head and head_out)."""
    for k, p in enumerate(report["data"]["pos"]):
        ids = [r[0] for r in p["rules"]]
        if "the_again" in ids and "the_noun" not in ids and p["t"] > 3:
            return k
    raise AssertionError("no position where the_again fired: the rules above should make one")


@pytest.fixture(scope="module")
def dom(report, tmp_path_factory):
    k = _pick_position(report)
    prof = tmp_path_factory.mktemp("chromium_profile")
    r = chromium("--dump-dom", report["out"].as_uri() + f"#pos={k}", profile=prof)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "<html" in r.stdout, r.stderr[-2000:]
    return k, parse_dom(r.stdout), r.stdout


# -- 1. self-contained -----------------------------------------------------------------------------
def test_report_is_one_self_contained_file(report):
    h = report["html"]
    assert h.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", h, re.I), "external script"
    assert not re.search(r"<link\b", h, re.I), "external stylesheet/icon"
    assert not re.search(r"""\b(?:src|href|xlink:href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//""", h, re.I)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", h, re.I) and "@import" not in h
    assert not re.search(r"\bfetch\(|XMLHttpRequest|import\(", h)
    # the only URL in the file is the SVG namespace name (an identifier, never fetched)
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", h))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    # everything the page needs is inline
    assert "<style>" in h and 'id="ledger-chart"' in h and 'id="ledger-table"' in h and 'id="baseline-table"' in h
    d = report["data"]
    assert len(d["toks"]) == 300 and len(d["pos"]) > 100


def test_embedded_data_matches_the_hand_model_and_reference(report):
    """The JSON the page renders from: per position, top-5 lists and rules fired equal direct computation."""
    ev = report["res"]
    ref, hm, vocab, last = ev.ref, ev.hand, ev.vocab, ev.last
    data = report["data"]
    assert data["toks"] == vocab
    n = len(data["pos"])
    n_seqs = sum(p["t"] == 0 for p in data["pos"])  # whole sequences from the start
    assert n == sum(len(s) for s in ref.seqs[:n_seqs]) == int(ref.offsets[n_seqs])
    kl = np.asarray(last["kl"])[:n]
    np.testing.assert_allclose([p["kl"] for p in data["pos"]], kl, atol=1e-5)
    assert data["scale"] == pytest.approx(float(np.percentile(kl, 95)))
    offs = ref.offsets
    for k in (0, 1, n // 2, n - 1, _pick_position(report)):
        p = data["pos"][k]
        s = int(np.searchsorted(offs, k, side="right") - 1)
        seq, t = ref.seqs[s], k - int(offs[s])
        assert (p["t"], p["tok"]) == (t, int(seq[t]))
        assert p["next"] == (int(seq[t + 1]) if t + 1 < len(seq) else -1)
        assert [r[0] for r in p["rules"]] == [rid for rid, _ in hm.explain(seq, t)]
        hand = np.exp(hm.log_probs(seq)[t].astype(np.float64))
        refp = np.exp(np.asarray(ref.logp[k], np.float64))
        for top, probs in ((p["hand"], hand), (p["ref"], refp)):
            assert [pr for _, pr in top] == pytest.approx(np.sort(probs)[::-1][:5], abs=2e-4)
            assert [pr for _, pr in top] == pytest.approx([probs[v] for v, _ in top], abs=2e-4)


# -- 2. rendered by a real browser -----------------------------------------------------------------
def test_browser_renders_tokens_chart_and_tables(report, dom):
    _, root, _ = dom
    data = report["data"]
    n = len(data["pos"])
    assert root.by_id("status").text().strip() == f"rendered {n} tokens"
    toks = root.find_all("span", "tok")
    assert len(toks) == n
    assert [t.attrs["id"] for t in toks[:3]] == ["tok-0", "tok-1", "tok-2"]
    # the text is the eval text, token by token (newlines shown as ↵ + newline)
    vocab = data["toks"]
    assert "".join(t.text() for t in toks) == "".join(vocab[p["tok"]].replace("\n", "\u21b5\n") for p in data["pos"])
    assert len(root.find_all("span", "seq")) == sum(p["t"] == 0 for p in data["pos"])
    # chart: one bar per ledger row, one dashed line per baseline
    chart = root.by_id("ledger-chart")
    assert chart.tag == "svg"
    bars = chart.find_all("rect", "bar")
    res = report["res"]
    assert [r["name"] for r in res.ledger] == LEDGER_ROWS
    assert len(bars) == len(res.ledger) == 4
    assert len(chart.find_all("line", "baseline")) == 3
    heights = [float(b.attrs["height"]) for b in bars]
    kls = [r["kl"] for r in res.ledger]
    assert np.argsort(heights).tolist() == np.argsort(kls).tolist()  # taller bar = larger KL
    for b, r in zip(bars, res.ledger):
        assert b.text().startswith(f"{r['name']}: KL {r['kl']:.4f}")
    # tables
    rows = root.by_id("ledger-table").find_all("tr")[1:]
    assert [r.find_all("td")[0].text() for r in rows] == LEDGER_ROWS
    assert [r.find_all("td")[1].text() for r in rows] == [f"{x:.4f}" for x in kls]
    brows = root.by_id("baseline-table").find_all("tr")[1:]
    assert [r.find_all("td")[0].text() for r in brows] == ["uniform", "unigram", "oracle bigram"]


def test_browser_detail_panel_for_selected_token(report, dom):
    k, root, _ = dom
    ev = report["res"]
    ref, hm, vocab, last = ev.ref, ev.hand, ev.vocab, ev.last
    p = report["data"]["pos"][k]
    sel = [t for t in root.find_all("span", "tok") if "sel" in t.classes]
    assert [t.attrs["id"] for t in sel] == [f"tok-{k}"]  # #pos=K selected token K
    detail = root.by_id("detail")
    assert float(detail.by_id("detail-kl").text()) == pytest.approx(float(last["kl"][k]), abs=1e-4)
    head = detail.find_all("div")[0]
    assert shown(head.find_all("b")[0].text()) == vocab[p["tok"]]

    def table(node_id):
        trs = detail.by_id(node_id).find_all("tr")
        assert [th.text() for th in trs[0].find_all("th")][1] == "p"
        return [(shown(tr.find_all("td")[0].text()), float(tr.find_all("td")[1].text())) for tr in trs[1:]]

    s = int(np.searchsorted(ref.offsets, k, side="right") - 1)
    seq, t = ref.seqs[s], k - int(ref.offsets[s])
    hand = np.exp(hm.log_probs(seq)[t].astype(np.float64))
    refp = np.exp(np.asarray(ref.logp[k], np.float64))
    for node_id, probs in (("detail-ref", refp), ("detail-hand", hand)):
        rows = table(node_id)
        assert len(rows) == 5
        # each shown token carries its own probability, and the five shown are the five largest
        for tok, pr in rows:
            assert pr == pytest.approx(probs[vocab.index(tok)], abs=6e-4)
        assert [pr for _, pr in rows] == pytest.approx(np.sort(probs)[::-1][:5], abs=6e-4)
        assert [tok for tok, _ in rows] == [vocab[v] for v, _ in (p["ref"] if node_id == "detail-ref" else p["hand"])]
    # rules fired: exactly what hm.explain says for this position, in order, with its description
    fired = hm.explain(seq, t)
    rules_box = detail.by_id("detail-rules")
    assert f"({len(fired)})" in rules_box.text()
    divs = rules_box.find_all("div", "rule")
    assert [d.find_all("span", "rid")[0].text() for d in divs] == [rid for rid, _ in fired]
    assert {rid for rid, _ in fired} >= {"common", "prev", "the_again"}
    for d, (rid, desc) in zip(divs, fired):
        assert d.text() == f"{rid} {desc}"


def test_kl_colours_most_opaque_at_largest_kl(report, dom):
    _, root, _ = dom
    toks = root.find_all("span", "tok")
    a = np.array([alpha(t.attrs.get("style", "")) for t in toks])
    kl = np.array([p["kl"] for p in report["data"]["pos"]])
    i = int(np.argmax(kl))
    assert a[i] == a.max() and a.max() == pytest.approx(0.9, abs=1e-3)
    assert a[int(np.argmin(kl))] == a.min() < a.max()
    # the documented scale: linear in KL, full colour from the 95th percentile on
    scale = report["data"]["scale"]
    # (the browser keeps alpha as a byte and prints it with as few decimals as round-trip: ~1/255)
    np.testing.assert_allclose(a, 0.05 + 0.85 * np.minimum(1, kl / scale), atol=1 / 255 + 1e-3)
    assert np.all(a[kl >= scale] == a.max())
    # monotone: a larger KL never gets a paler background
    order = np.argsort(kl, kind="stable")
    assert np.all(np.diff(a[order]) >= -1e-3)
    assert toks[i].attrs["title"] == f"KL {kl[i]:.3f}"


def test_browser_screenshot(report, tmp_path):
    png = tmp_path / "report.png"
    r = chromium(f"--screenshot={png}", "--window-size=1400,1000", "--hide-scrollbars",
                 report["out"].as_uri() + "#pos=3", profile=tmp_path / "profile")
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.exists() and png.stat().st_size > 5000
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (1400, 1000)


# -- 3. component verdicts (issue 20): each rule listed is marked verified or not, and why -------------------
def test_report_without_verdicts_says_so(report):
    """The tiny world has no cached verdicts: one visible line says so and names the command; every rule
    shown carries the 'missing' class, once per rule (not per position)."""
    h = report["html"]
    line = re.search(r'<div id="verdicts" class="missing">(.*?)</div>', h, re.S)
    assert line and "No component verdicts cached" in line.group(1) and "every rule is marked not verified" in line.group(1)
    assert "<code>handmodel check-components --rules " in line.group(1) and "--corpus " in line.group(1)
    data = report["data"]
    shown_ids = {r[0] for p in data["pos"] for r in p["rules"]} - {"…"}
    assert set(data["ver"]) == shown_ids and set(data["ver"].values()) == {"missing"}
    assert h.count("not verified: missing verdict") == 1  # the mark is CSS on a class, not text per rule


def test_browser_marks_rules_by_verdict(report, tmp_path):
    from verify.claims.component import ComponentVerdict
    from verify.reports.report import write_report
    from verify.reports.verdicts import from_verdicts

    ev = report["res"]
    vs = [ComponentVerdict("prev", "head", "head 0", "pass"), ComponentVerdict("the_again", "head_out", "head 0 OV", "fail"),
          ComponentVerdict("common", "prior", "the mean output", "undecided"),
          ComponentVerdict("the_noun", "bigram", None, "no component")]  # after_dot: no verdict at all
    out = tmp_path / "r.html"
    write_report(out, ev, verdicts=from_verdicts(ev.rules.rule_ids, vs, command="handmodel check-components"))
    h = out.read_text(encoding="utf-8")
    assert re.search(r'<div id="verdicts">Component checks \(cached\): 1 of 5 rules verified', h)
    for cls, words in (("pass", "verified"), ("fail", "not verified: failing"), ("undecided", "not verified: undecided"),
                       ("nocomp", "not verified: no component"), ("missing", "not verified: missing verdict")):
        assert re.search(r"\.rule\.v-" + cls + r" \.rid::after\{content:\"\\27\d\d  " + re.escape(words) + '"', h), cls
    k = _pick_position(report)
    r = chromium("--dump-dom", out.as_uri() + f"#pos={k}", profile=tmp_path / "profile")
    assert r.returncode == 0, r.stderr[-2000:]
    divs = parse_dom(r.stdout).by_id("detail-rules").find_all("div", "rule")
    marks = {d.find_all("span", "rid")[0].text(): d.classes - {"rule"} for d in divs}
    want = {"prev": {"v-pass"}, "the_again": {"v-fail"}, "common": {"v-undecided"}, "the_noun": {"v-nocomp"},
            "after_dot": {"v-missing"}}
    assert marks and all(marks[rid] == want[rid] for rid in marks)
    assert {"prev", "the_again", "common"} <= set(marks)  # a verified rule and unverified ones on the same token
