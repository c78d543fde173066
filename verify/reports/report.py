"""`handmodel report`: one self-contained HTML file (inline CSS, JS and SVG; nothing fetched at view time).

- the ledger as an SVG bar chart (KL per cumulative rule group) with the baselines as dashed lines,
  plus the baseline and ledger tables;
- the eval text, each token coloured by its residual KL(p_ref || p_hand) with all rules on; hover or
  click a token to see the reference's and the hand model's top-5 and the rules that fired there.
  Opening the file with `#pos=N` selects token N (used by the headless-browser test).
- each rule listed is marked verified (its component check passes) or not verified, and why (failing,
  undecided, no component, missing verdict): a class on the rule's element (CSS draws the mark), from
  the cached `check-components` verdicts only; with none cached, one line on the page says so.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from handmodel.explain import Explainer
from verify.ledger.evaluate import Evaluation
from verify.reports.verdicts import VerdictInfo, from_verdicts

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
#meta td{text-align:left}
#text{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;border:1px solid #ccc;
 padding:10px;max-height:520px;overflow-y:auto;margin-right:340px}
.tok{cursor:pointer;border-radius:2px} .tok.sel{outline:2px solid #06c}
.seq{display:block;border-bottom:1px dashed #ccc;padding:4px 0}
#detail{position:fixed;right:16px;top:80px;width:310px;background:#fafafa;border:1px solid #bbb;padding:10px;
 font-size:12px;max-height:80vh;overflow-y:auto}
#detail table{width:100%} .muted{color:#777} .rule{margin:2px 0} .rid{font-weight:600}
.legend{font-size:12px;color:#555}
#verdicts{font-size:13px;margin:8px 0} #verdicts.missing{color:#a33;font-weight:600}
.rule .rid::after{font-weight:400;font-size:11px;margin-left:4px}
.rule.v-pass .rid::after{content:"\\2713  verified";color:#2a7a2a}
.rule.v-fail .rid::after{content:"\\2717  not verified: failing";color:#b22}
.rule.v-undecided .rid::after{content:"\\2717  not verified: undecided";color:#b60}
.rule.v-nocomp .rid::after{content:"\\2717  not verified: no component";color:#777}
.rule.v-missing .rid::after{content:"\\2717  not verified: missing verdict";color:#777}
"""

JS = r"""
(function(){
const D = JSON.parse(document.getElementById('data').textContent);
const T = D.toks;
const box = document.getElementById('text');
const scale = D.scale > 0 ? D.scale : 1;
function colour(kl){ const a = Math.min(1, kl / scale); return 'rgba(220,40,30,' + (0.05 + 0.85 * a).toFixed(3) + ')'; }
function show(s){ return JSON.stringify(s).slice(1, -1); }
let cur = null;
const frag = document.createDocumentFragment();
let line = null;
for (let i = 0; i < D.pos.length; i++) {
  const p = D.pos[i];
  if (p.t === 0) { line = document.createElement('span'); line.className = 'seq'; frag.appendChild(line); }
  const s = document.createElement('span');
  s.className = 'tok'; s.id = 'tok-' + i; s.dataset.i = i;
  s.textContent = T[p.tok].replace(/\n/g, '\u21b5\n');
  s.style.background = colour(p.kl);
  s.title = 'KL ' + p.kl.toFixed(3);
  line.appendChild(s);
}
box.appendChild(frag);
function topTable(title, top){
  let h = '<table><tr><th>' + title + '</th><th>p</th></tr>';
  for (const [id, pr] of top) h += '<tr><td>' + esc(show(T[id])) + '</td><td>' + pr.toFixed(3) + '</td></tr>';
  return h + '</table>';
}
function esc(s){ return s.replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c])); }
function select(i, sticky){
  const p = D.pos[i]; if (!p) return;
  if (cur !== null) document.getElementById('tok-' + cur).classList.remove('sel');
  cur = i; document.getElementById('tok-' + i).classList.add('sel');
  const nxt = p.next >= 0 ? esc(show(T[p.next])) : '<span class="muted">(end)</span>';
  let h = '<div><b>' + esc(show(T[p.tok])) + '</b> &rarr; ' + nxt + '</div>';
  h += '<div>KL(p_ref&#8214;p_hand) = <b id="detail-kl">' + p.kl.toFixed(4) + '</b> nats</div>';
  h += '<div id="detail-ref">' + topTable('reference top-5', p.ref) + '</div>';
  h += '<div id="detail-hand">' + topTable('hand top-5', p.hand) + '</div>';
  h += '<div id="detail-rules"><b>rules fired</b> (' + p.rules.length + ')';
  for (const [rid, desc] of p.rules) {
    const v = D.ver[rid];  // the rule's verdict state (a CSS class draws the mark); none for the "…" line
    h += '<div class="rule' + (v ? ' v-' + v : '') + '"><span class="rid">' + esc(rid) + '</span> ' + esc(desc) + '</div>';
  }
  if (!p.rules.length) h += '<div class="muted">none</div>';
  h += '</div>';
  document.getElementById('detail').innerHTML = h;
}
box.addEventListener('mouseover', e => { if (e.target.dataset.i !== undefined) select(+e.target.dataset.i); });
box.addEventListener('click', e => { if (e.target.dataset.i !== undefined) select(+e.target.dataset.i, true); });
const m = location.hash.match(/pos=(\d+)/);
select(m ? +m[1] : 0);
document.getElementById('status').textContent = 'rendered ' + D.pos.length + ' tokens';
})();
"""


def _fmt(x, f=".4f"):
    return "-" if x is None else format(x, f)


def ledger_svg(rows: list[dict], baselines: list[dict], width: int = 760, height: int = 300) -> str:
    """Bars = KL per cumulative rule group (with 95% CI whiskers); dashed lines = baselines."""
    ml, mr, mt, mb = 60, 150, 20, 70
    W, H = width - ml - mr, height - mt - mb
    vmax = max([r["kl_hi"] for r in rows] + [b["kl"] for b in baselines] + [1e-9]) * 1.08
    y = lambda v: mt + H * (1 - v / vmax)  # noqa: E731
    n = len(rows)
    bw = W / max(n, 1)
    parts = [f'<svg id="ledger-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + H}" stroke="#333"/>',
             f'<line x1="{ml}" y1="{mt + H}" x2="{ml + W}" y2="{mt + H}" stroke="#333"/>']
    for k in range(5):
        v = vmax * k / 4
        parts.append(f'<text x="{ml - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>'
                     f'<line x1="{ml}" y1="{y(v):.1f}" x2="{ml + W}" y2="{y(v):.1f}" stroke="#eee"/>')
    parts.append(f'<text x="14" y="{mt + H / 2}" transform="rotate(-90 14 {mt + H / 2})" text-anchor="middle">'
                 'KL(p_ref ‖ p_hand), nats/token</text>')
    for i, r in enumerate(rows):
        x = ml + i * bw + bw * 0.15
        w = bw * 0.7
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y(r["kl"]):.1f}" width="{w:.1f}" height="{mt + H - y(r["kl"]):.1f}" '
                     f'fill="#4a7fc1"><title>{html.escape(r["name"])}: KL {r["kl"]:.4f} '
                     f'[{r["kl_lo"]:.4f}, {r["kl_hi"]:.4f}], {r["rules"]} rules</title></rect>')
        cx = x + w / 2
        parts.append(f'<line x1="{cx:.1f}" y1="{y(r["kl_lo"]):.1f}" x2="{cx:.1f}" y2="{y(r["kl_hi"]):.1f}" stroke="#123"/>')
        label = html.escape(r["name"][:18])
        parts.append(f'<text x="{cx:.1f}" y="{mt + H + 14}" text-anchor="end" transform="rotate(-35 {cx:.1f} {mt + H + 14})">{label}</text>')
    colours = {"uniform": "#999", "unigram": "#d08000", "oracle bigram": "#2a9d2a"}
    for b in baselines:
        c = colours.get(b["name"], "#666")
        parts.append(f'<line class="baseline" x1="{ml}" y1="{y(b["kl"]):.1f}" x2="{ml + W}" y2="{y(b["kl"]):.1f}" '
                     f'stroke="{c}" stroke-dasharray="5,4"/><text x="{ml + W + 6}" y="{y(b["kl"]) + 4:.1f}" fill="{c}">'
                     f'{html.escape(b["name"])} {b["kl"]:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict], ledger: bool, tid: str) -> str:
    head = ["row" if ledger else "baseline", "KL", "95% CI", "CE_hand", "CE_ref", "unexplained", "explained", "top-1"]
    if ledger:
        head += ["rules", "numbers"]
    h = [f'<table id="{tid}"><tr>' + "".join(f"<th>{c}</th>" for c in head) + "</tr>"]
    for r in rows:
        cells = [html.escape(r["name"]), _fmt(r["kl"]), f"[{r['kl_lo']:.4f}, {r['kl_hi']:.4f}]", _fmt(r["ce_hand"]),
                 _fmt(r["ce_ref"]), _fmt(r["unexplained"], "+.4f"),
                 "-" if r["explained"] is None else f"{100 * r['explained']:.1f}%",
                 "-" if r["top1"] is None else f"{100 * r['top1']:.1f}%"]
        if ledger:
            cells += [str(r["rules"]), str(r["numbers"])]
        h.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(h) + "</table>"


RULES_SHOWN = 8  # per token on the page: the heads plus the largest acts (keeps the page a few MB)


def _shown(rules, ex, n: int, is_head: np.ndarray) -> list[list[str]]:
    """At position n of ex (handmodel.explain.Explained): [rule id, what it did] of the heads and of the
    RULES_SHOWN largest logit changes, in rule order, then a count of the rest. Only these are described (a
    few of ~650 acts). Lists, not tuples: what the page cache's JSON gives back is equal to what is computed."""
    idx = ex.rules_at(n)  # rule order
    keep = np.argsort(-ex.size[n, idx], kind="stable")[:RULES_SHOWN]  # stable: equal sizes keep rule order
    show = np.union1d(idx[keep], idx[is_head[idx]])
    out = [[str(rules.rule_ids[i]), str(ex.fired(n, i).desc)] for i in show.tolist()]
    if len(idx) > len(out):
        out.append(["…", f"{len(idx) - len(out)} more rules changed the logits less"])
    return out


def top5(m: np.ndarray) -> np.ndarray:
    """[N, 5]: np.argsort(-row)[:5] of each row of m, without sorting whole rows. A row whose six largest
    values (at or above its 6th largest, found by np.partition) are exactly six distinct values has one
    answer, read off them; any other row (a tie among them) is sorted in full, so ties keep the full sort's
    order."""
    neg = -np.asarray(m)
    N = len(neg)
    if neg.shape[1] <= 6 or N == 0:
        return np.argsort(neg, axis=1)[:, :5]
    r, c = np.nonzero(neg <= np.partition(neg, 5, axis=1)[:, 5:6])
    six = np.bincount(r, minlength=N) == 6
    rows = np.flatnonzero(six)
    cols = c[six[r]].reshape(-1, 6)  # np.nonzero is row-major: each such row's six columns together
    vals = neg[rows[:, None], cols]
    o = np.argsort(vals, axis=1, kind="stable")
    cols, vals = np.take_along_axis(cols, o, 1), np.take_along_axis(vals, o, 1)
    distinct = (np.diff(vals, axis=1) > 0).all(1)
    out = np.empty((N, 5), np.int64)
    out[rows[distinct]] = cols[distinct, :5]
    for k in np.concatenate([np.flatnonzero(~six), rows[~distinct]]):
        out[k] = np.argsort(neg[k])[:5]
    return out


def _top_pairs(logp: np.ndarray) -> list[list[list]]:
    """Per row of float32 log-probs: [[token, p rounded to 4 places]] for its top 5."""
    top = top5(logp)
    p = np.exp(np.take_along_axis(logp, top, 1))
    return [[[v, round(x, 4)] for v, x in zip(tr, pr)] for tr, pr in zip(top.tolist(), p.tolist())]


# a verdict state -> the class suffix of the rule's element (v-pass, v-fail, ...; CSS above)
VERDICT_CLASS = {"pass": "pass", "fail": "fail", "undecided": "undecided", "no component": "nocomp", "missing": "missing"}


def token_data(ev: Evaluation, max_tokens: int, verdicts: VerdictInfo | None = None,
               timings: dict | None = None, cache: bool = False) -> tuple[dict, int]:
    """The page's JSON: tokens, per position the top-5s and rules fired, and `ver`: each rule shown -> its
    verdict class (once per rule, not per position). `timings`: seconds per stage are added to it.
    cache: the positions come from / go to the page cache (page_key), when the evaluation has a cache folder."""
    key = page_key(ev, max_tokens) if cache and getattr(ev.ref, "dir", None) is not None else None
    got = _load_page(ev.ref.dir, key) if key else None
    if got is None:
        got = _positions(ev, max_tokens, timings if timings is not None else {})
        if key:
            _store_page(ev.ref.dir, key, got)
    pos, scale, n = got["pos"], got["scale"], got["n"]
    rules = ev.rules
    vi = verdicts if verdicts is not None else from_verdicts(rules.rule_ids, None, command="handmodel check-components")
    shown_ids = {rid for p in pos for rid, _ in p["rules"]} & set(rules.rule_ids)
    ver = {rid: VERDICT_CLASS[vi.of(rid)] for rid in sorted(shown_ids)}
    return {"toks": ev.vocab, "pos": pos, "scale": scale, "ver": ver}, n


def _positions(ev: Evaluation, max_tokens: int, tm: dict) -> dict:
    """{"pos": per position the token, KL, top-5s and rules shown; "scale": colour scale; "n": tokens}."""
    import time

    t0 = time.perf_counter()
    ref, hm, rules, vocab, last = ev.ref, ev.hand, ev.rules, ev.vocab, ev.last
    kl = np.asarray(last["kl"], np.float64)
    seqs = []
    n = 0
    for s in ref.seqs:  # whole sequences from the start, at least one
        if seqs and n + len(s) > max_tokens:
            break
        seqs.append(s)
        n += len(s)
    hand = hm.log_probs_batch(seqs)
    tm["hand log-probs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # engine speed: one probe pass, attention matrices; described below only for the rules shown
    ex = Explainer(rules).acts(seqs, rules.mask_of(None))
    tm["explain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    nxt = ref.next_tokens
    refs = _top_pairs(np.asarray(ref.logp[:n], np.float32))
    hands = _top_pairs(np.concatenate(hand) if hand else np.zeros((0, len(vocab)), np.float32))
    is_head = np.array([k == "head" for k in rules.rule_kinds], np.bool_)
    kls = kl[:n].tolist()
    pos = []
    i = 0
    for s in seqs:
        for t, tok in enumerate(np.asarray(s).tolist()):
            pos.append({"tok": tok, "t": t, "next": int(nxt[i]), "kl": round(kls[i], 5),
                        "ref": refs[i], "hand": hands[i], "rules": _shown(rules, ex, i, is_head)})
            i += 1
    tm["per-position records"] = time.perf_counter() - t0
    return {"pos": pos, "scale": float(np.percentile(kl[:n], 95)) if n else 1.0, "n": n}


# -- the page cache: the positions of the last report on this eval set, keyed by everything they are made of --
PAGE_CACHE_VERSION = 1
PAGES_KEPT = 4  # per eval set


def page_key(ev: Evaluation, max_tokens: int) -> str:
    """The all-rules ledger row's key (the hand model's code, the eval set and its reference log-probs, every
    rule and token set: verify.ledger.core.row_keys), the token texts, --max-tokens and this file's code.
    The verdict marks are not in it: they are read afresh on every run."""
    import hashlib

    from verify.ledger.core import row_keys

    row = row_keys(ev.rules, [ev.rules.mask_of(None)], ev.ref)[0]
    h = hashlib.sha256(repr((PAGE_CACHE_VERSION, row, int(max_tokens), RULES_SHOWN)).encode())
    h.update(json.dumps(list(ev.vocab), ensure_ascii=False).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:24]


def _page_file(folder: Path, key: str) -> Path:
    return Path(folder) / "report" / f"{key}.json"


def _load_page(folder: Path, key: str) -> dict | None:
    """The cached positions, checked: a header line {key, sha256 of the rest}, then the JSON. A file that
    names another key, fails its checksum or does not parse is reported, deleted and rebuilt."""
    import hashlib

    from verify.ledger.integrity import damaged

    f = _page_file(folder, key)
    if not f.exists():
        return None
    try:
        head, body = f.read_bytes().split(b"\n", 1)
        h = json.loads(head)
        if h.get("key") != key:
            why = f"it holds the page of key {str(h.get('key'))[:24]!r}"
        elif h.get("sha256") != hashlib.sha256(body).hexdigest():
            why = "checksum mismatch"
        else:
            got = json.loads(body)
            if isinstance(got, dict) and {"pos", "scale", "n"} <= got.keys() and len(got["pos"]) == got["n"]:
                return got
            why = "not a page's positions"
    except Exception as e:  # noqa: BLE001 -- any unreadable entry is rebuilt, never used
        why = f"unreadable: {type(e).__name__}: {str(e)[:80]}"
    damaged(f, why)
    f.unlink(missing_ok=True)
    return None


def _store_page(folder: Path, key: str, got: dict) -> None:
    """Atomic: written to a per-process temporary, then renamed over the entry (a reader sees all or nothing)."""
    import hashlib
    import os

    from verify.ledger.integrity import clean_stale

    f = _page_file(folder, key)
    body = json.dumps(got, ensure_ascii=False, separators=(",", ":")).encode()
    try:
        f.parent.mkdir(exist_ok=True)
        clean_stale(f.parent)  # temporaries of killed runs
        tmp = f.with_name(f".{key}.tmp{os.getpid()}")
        tmp.write_bytes(json.dumps({"key": key, "sha256": hashlib.sha256(body).hexdigest()}).encode() + b"\n" + body)
        tmp.replace(f)
        old = sorted(f.parent.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)[:-PAGES_KEPT]
        for p in old:  # a few MB each: only the latest pages stay
            p.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache: the next run computes the page again


def verdict_line(vi: VerdictInfo) -> str:
    """One visible line: how many rules are verified, or (none cached) that every rule shows as not verified."""
    if vi.status == "missing":
        return (f'<div id="verdicts" class="missing">No component verdicts cached for these rules and this checkpoint: '
                f'every rule is marked not verified (missing verdict). Compute them with '
                f'<code>{html.escape(vi.command)}</code>, then re-run the report.</div>')
    return (f'<div id="verdicts">Component checks ({html.escape(vi.status)}): {vi.n_verified():,} of {len(vi.state):,} '
            f'rules verified. Each rule listed is marked &#10003; verified or &#10007; not verified (failing, undecided, '
            f'no component or missing verdict); <code>{html.escape(vi.command)}</code> recomputes them.</div>')


def write_report(out: Path, ev: Evaluation, max_tokens: int = 3000, verdicts: VerdictInfo | None = None,
                 data: tuple[dict, int] | None = None) -> int:
    """`verdicts`: the cached component verdicts (verify/reports/verdicts.cached_verdicts); None: none cached.
    `data`: token_data's answer when the caller has it already (benchmarks/report_time.py times it apart)."""
    if verdicts is None:
        verdicts = from_verdicts(ev.rules.rule_ids, None, command="handmodel check-components")
    data, n = data if data is not None else token_data(ev, max_tokens, verdicts, cache=True)
    res = ev.to_json()
    h = res["header"]
    meta_rows = [("eval set", h["eval_set"]), ("tokens", f"{h['n_tokens']:,} in {h['n_sequences']} sequences"
                                                + (f" ({h['n_split']} split at n_ctx={h['n_ctx']})" if h["n_split"] else "")),
                 ("checkpoint", f"{h['checkpoint']} (hash {h['checkpoint_hash']})"),
                 ("rules", f"{h['rules']} ({h['n_rules']} rules, {h['n_groups']} groups)"),
                 ("baselines fitted on", h["train_text"])]
    meta = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>" for k, v in meta_rows)
    # every "<" escaped: no token text (e.g. "<!--" or "</script") can end or confuse the script element
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    f = res["final"]
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>handmodel report</title><style>{CSS}</style></head>
<body>
<h1>handmodel report: KL {f['kl']:.4f} nats/token, {'-' if f['explained'] is None else f"{100 * f['explained']:.1f}%"} of KL explained</h1>
<table id="meta">{meta}</table>
{verdict_line(verdicts)}
<h2>Ledger (rule groups added cumulatively)</h2>
{ledger_svg(res['ledger'], res['baselines'])}
{_table(res['ledger'], True, 'ledger-table')}
<h2>Baselines</h2>
{_table(res['baselines'], False, 'baseline-table')}
<h2>Eval text coloured by residual KL (all rules on)</h2>
<div class="legend">first {n:,} tokens (whole sequences); redder = larger KL(p_ref&#8214;p_hand), full colour at the
95th percentile ({data['scale']:.3f} nats). Hover or click a token. <span id="status">(needs JavaScript)</span></div>
<div id="detail"></div>
<div id="text"></div>
<script type="application/json" id="data">{blob}</script>
<script>{JS}</script>
</body></html>
"""
    Path(out).write_text(doc, encoding="utf-8")
    return n
