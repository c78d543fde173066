"""The long tail, measured (`handmodel catalog`, issue 20): KL explained on the eval set against the number
of rules switched on — rules added in order of the KL each removes (the catalog's ablation ΔKL, largest
first) — and against the explicit numbers those rules write. Two curves: every rule, and the verified
rules only (component check passes; same order). Each point is one real engine pass with that prefix of
rules on and the rest off (nothing refitted); prefix sizes are log-spaced, so points in between are not
measured. The counts to reach 50/80/90% of the all-rules explained figure are read off those points."""
from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field

import numpy as np

LEVELS = (0.5, 0.8, 0.9)
DEFAULT_POINTS = 20  # log-spaced prefix sizes asked for (rounding merges a few at the small end)


@dataclass
class LongTailPoint:
    curve: str  # "all" | "verified"
    n_rules: int  # the first n_rules of the curve's order switched on, every other rule off
    n_numbers: int  # explicit numbers those rules write
    kl: float  # KL(p_ref ‖ p_hand), nats/token, on the eval set
    explained: float | None  # 1 − KL / KL_unigram
    top1: float
    last_rule: str  # the rule this prefix ends with


@dataclass
class LevelCount:
    curve: str
    level: float  # a share of the final all-rules explained figure (0.5, 0.8, 0.9)
    target: float  # the explained figure to reach: level × final explained
    n_rules: int | None  # the smallest measured prefix at or above target (None: not reached)
    n_numbers: int | None
    after: int | None  # the measured prefix before it: the level is first reached in (after, n_rules]
    best: float | None  # the curve's largest measured explained (what it got to when not reached)


@dataclass
class LongTail:
    order: list[str]  # every rule id, in the order the curves add them
    points: list[LongTailPoint]
    levels: list[LevelCount]
    final_explained: float | None  # all rules on
    n_rules: int
    n_verified: int
    verdicts: str  # where the verified set came from (VerdictInfo.note)
    passes: int  # engine passes run (the others came from the ledger's row cache)
    seconds: float
    notes: list[str] = field(default_factory=list)

    def curve(self, name: str) -> list[LongTailPoint]:
        return [p for p in self.points if p.curve == name]

    def level(self, curve: str, level: float) -> LevelCount:
        return next(c for c in self.levels if c.curve == curve and c.level == level)

    def to_json(self) -> dict:
        return asdict(self)


def prefix_sizes(n: int, k: int = DEFAULT_POINTS) -> list[int]:
    """About k log-spaced prefix sizes in [1, n], always including n (none for n = 0)."""
    if n <= 0:
        return []
    s = np.unique(np.round(np.geomspace(1, n, max(1, min(k, n)))).astype(np.int64))
    return sorted(set(int(x) for x in s) | {n})


def rule_order(rules, ablation: list[dict]) -> list[int]:
    """Rule indices, largest ΔKL first (ties: file order); rules the ablation lacks go last, in file order."""
    idx = {r: i for i, r in enumerate(rules.rule_ids)}
    delta = {idx[a["rule"]]: float(a["delta"]) for a in ablation}
    ranked = sorted(delta, key=lambda i: (-delta[i], i))
    return ranked + [i for i in range(len(rules.rule_ids)) if i not in delta]


def level_counts(curve: str, pts: list[LongTailPoint], final: float | None) -> list[LevelCount]:
    """For each level, the first measured point (by rule count) whose explained reaches level × final."""
    pts = sorted(pts, key=lambda p: p.n_rules)
    vals = [p.explained for p in pts if p.explained is not None]
    best = max(vals) if vals else None
    out = []
    for lv in LEVELS:
        if final is None or final <= 0:  # no positive all-rules figure: the levels are undefined
            out.append(LevelCount(curve, lv, float("nan"), None, None, None, best))
            continue
        target = lv * final
        hit = next((k for k, p in enumerate(pts) if p.explained is not None and p.explained >= target), None)
        if hit is None:
            out.append(LevelCount(curve, lv, target, None, None, pts[-1].n_rules if pts else None, best))
        else:
            out.append(LevelCount(curve, lv, target, pts[hit].n_rules, pts[hit].n_numbers,
                                  pts[hit - 1].n_rules if hit else 0, best))
    return out


def long_tail(hm, rules, ref, kl_uni: float, ablation: list[dict], verified, weights=None,
              k: int = DEFAULT_POINTS, verdicts_note: str = "", cache: bool = True, log=None) -> LongTail:
    """Both curves. `verified`: [n_rules] bool (None: no verdicts, so the verified curve is empty). Rows come
    from the ledger's row cache when the same rules were measured before (keyed by the compiled rules and
    the eval set, verify/ledger/core.row_keys); the rest are engine passes (stream_metrics_rows)."""
    from verify.ledger import core as L

    t0 = time.perf_counter()
    n = len(rules.rule_ids)
    order = rule_order(rules, ablation)
    ver = np.zeros(n, bool) if verified is None else np.asarray(verified, bool)
    vorder = [i for i in order if ver[i]]
    numbers = np.asarray(rules.rule_numbers, np.int64)
    plan: list[tuple[str, int, np.ndarray, int]] = []  # (curve, size, mask, last rule)
    for curve, seq in (("all", order), ("verified", vorder)):
        for s in prefix_sizes(len(seq), k):
            m = np.zeros(n, bool)
            m[seq[:s]] = True
            plan.append((curve, s, m, seq[s - 1]))
    masks = [m for _, _, m, _ in plan]
    keys = L.row_keys(rules, masks, ref) if cache else [None] * len(masks)
    # the ledger's row cache (same store as `verify`'s rows; its load checks key, shape and checksum)
    got = [L._load_row(ref, key) for key in keys]
    todo: dict[str, int] = {}  # one pass per distinct mask (the verified set may equal a prefix of all)
    for j, m in enumerate(got):
        if m is None:
            todo.setdefault(keys[j] if keys[j] is not None else f"#{j}", j)
    if todo:
        if log:
            log(f"long tail: {len(todo)} engine passes over {len(ref.tokens):,} positions "
                f"({len(masks) - len(todo)} rows cached)")
        # one mask at a time, each row stored as it is done (a killed run keeps its rows): prefixes in ΔKL
        # order differ in their bigram rules, so stream_metrics_rows could not fuse them anyway
        for step, j in enumerate(todo.values()):
            t1 = time.perf_counter()
            got[j] = hm.stream_metrics_rows(ref.seqs, ref.logp, [masks[j]])[0]
            L._store_row(ref, keys[j], got[j])
            if log:
                log(f"long tail: {plan[j][0]} {plan[j][1]:,} rules ({step + 1}/{len(todo)}, {time.perf_counter() - t1:.1f} s)")
        for j in range(len(got)):
            if got[j] is None:
                got[j] = got[todo[keys[j]]]
    if weights is None:
        weights = L.boot_weights(len(ref.offsets) - 1, n_boot=1)  # the CI is not shown; the mean is exact
    points = []
    for (curve, s, m, last), row in zip(plan, got):
        r = L.summarize(f"{curve} {s}", row, ref, weights, kl_uni)
        points.append(LongTailPoint(curve, s, int(numbers[m].sum()), r["kl"], r["explained"], r["top1"],
                                    str(rules.rule_ids[last])))
    full = [p for p in points if p.curve == "all" and p.n_rules == n]
    final = full[0].explained if full else None
    levels = level_counts("all", [p for p in points if p.curve == "all"], final) + \
        level_counts("verified", [p for p in points if p.curve == "verified"], final)
    notes = [] if final is not None and final > 0 else \
        ["the all-rules explained figure is not positive: the 50/80/90% levels are undefined"]
    return LongTail([str(rules.rule_ids[i]) for i in order], points, levels, final, n, int(ver.sum()), verdicts_note,
                    len(todo), round(time.perf_counter() - t0, 2), notes)


# -- the image -------------------------------------------------------------------------------------
COLOURS = {"all": "#2b6cb0", "verified": "#2a9d2a"}
LABELS = {"all": "all rules", "verified": "verified rules only"}


def _log_ticks(lo: float, hi: float) -> list[float]:
    out = []
    e = int(np.floor(np.log10(lo)))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo * 0.9999 <= v <= hi * 1.0001:
                out.append(float(v))
        e += 1
    return out


def _fmt_n(v: float) -> str:
    return f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"


def _panel(lt: LongTail, x0: float, y0: float, w: float, h: float, key: str, xlabel: str,
           ylo: float, yhi: float) -> list[str]:
    ml, mb, mt = 58, 46, 8
    W, H = w - ml - 12, h - mt - mb
    xs = [getattr(p, key) for p in lt.points if getattr(p, key) > 0]
    lo, hi = (min(xs), max(xs)) if xs else (1, 10)
    lo = 10 ** np.floor(np.log10(lo))
    hi = max(hi * 1.12, lo * 10)  # room right of the last point
    X = lambda v: x0 + ml + W * (np.log10(v) - np.log10(lo)) / (np.log10(hi) - np.log10(lo))  # noqa: E731
    Y = lambda v: y0 + mt + H * (1 - (v - ylo) / (yhi - ylo))  # noqa: E731
    p = [f'<g class="panel" data-x="{key}">',
         f'<rect x="{x0 + ml}" y="{y0 + mt}" width="{W}" height="{H}" fill="none" stroke="#333"/>']
    step = next(s for s in (5, 10, 20, 25, 50) if (yhi - ylo) * 100 / s <= 8)
    for t in range(int(np.ceil(ylo * 100 / step)), int(np.floor(yhi * 100 / step)) + 1):
        v = t * step / 100
        p.append(f'<line x1="{x0 + ml}" y1="{Y(v):.1f}" x2="{x0 + ml + W}" y2="{Y(v):.1f}" stroke="#eee"/>'
                 f'<text x="{x0 + ml - 5}" y="{Y(v) + 4:.1f}" text-anchor="end">{t * step}%</text>')
    for v in _log_ticks(lo, hi):
        p.append(f'<line x1="{X(v):.1f}" y1="{y0 + mt + H}" x2="{X(v):.1f}" y2="{y0 + mt + H + 4}" stroke="#333"/>'
                 f'<text x="{X(v):.1f}" y="{y0 + mt + H + 16}" text-anchor="middle">{_fmt_n(v)}</text>')
    p.append(f'<text x="{x0 + ml + W / 2}" y="{y0 + mt + H + 34}" text-anchor="middle">{html.escape(xlabel)}</text>')
    yc = y0 + mt + H / 2
    p.append(f'<text x="{x0 + 14}" y="{yc}" transform="rotate(-90 {x0 + 14} {yc})" text-anchor="middle">'
             'KL explained (% of the unigram KL)</text>')
    if lt.final_explained is not None and lt.final_explained > 0:
        for lv in LEVELS:
            v = lv * lt.final_explained
            p.append(f'<line class="level" x1="{x0 + ml}" y1="{Y(v):.1f}" x2="{x0 + ml + W}" y2="{Y(v):.1f}" '
                     f'stroke="#c05621" stroke-dasharray="5,4"/><text x="{x0 + ml + 4}" y="{Y(v) - 3:.1f}" '
                     f'fill="#c05621">{int(lv * 100)}% of all rules ({100 * v:.1f}%)</text>')
    for curve in ("all", "verified"):
        pts = [q for q in lt.curve(curve) if q.explained is not None and getattr(q, key) > 0]
        if not pts:
            continue
        c = COLOURS[curve]
        xy = " ".join(f"{X(getattr(q, key)):.1f},{Y(q.explained):.1f}" for q in pts)
        p.append(f'<polyline class="curve-{curve}" points="{xy}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        for q in pts:
            p.append(f'<circle class="point-{curve}" cx="{X(getattr(q, key)):.1f}" cy="{Y(q.explained):.1f}" r="3" '
                     f'fill="{c}"><title>{LABELS[curve]}: {q.n_rules:,} rules, {q.n_numbers:,} numbers, '
                     f'{100 * q.explained:.1f}% explained (KL {q.kl:.4f})</title></circle>')
    p.append("</g>")
    return p


def long_tail_svg(lt: LongTail, eval_set: str = "", width: int = 980, height: int = 410) -> str:
    """A self-contained SVG: explained against rules (left) and numbers (right), log x axes; both curves,
    circles at the measured points, dashed lines at 50/80/90% of the all-rules explained figure."""
    vals = [p.explained for p in lt.points if p.explained is not None] + [0.0]
    ylo, yhi = min(vals), max(vals + [lt.final_explained or 0.0])
    pad = 0.04 * max(yhi - ylo, 0.1)
    ylo, yhi = ylo - pad, yhi + pad
    top = 52
    ph = height - top - 24
    pw = width / 2
    parts = [f'<svg id="long-tail" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">The long tail: KL '
             f'explained with the first n rules switched on (largest ΔKL first){html.escape(" — " + eval_set) if eval_set else ""}</text>']
    lx = 70
    for curve in ("all", "verified"):
        n = lt.n_rules if curve == "all" else lt.n_verified
        parts.append(f'<line x1="{lx}" y1="34" x2="{lx + 22}" y2="34" stroke="{COLOURS[curve]}" stroke-width="2"/>'
                     f'<circle cx="{lx + 11}" cy="34" r="3" fill="{COLOURS[curve]}"/>'
                     f'<text x="{lx + 28}" y="38">{LABELS[curve]} ({n:,})</text>')
        lx += 200
    parts.append(f'<text x="{lx}" y="38" fill="#555">circles: measured engine passes; the lines between them are '
                 'not measured</text>')
    parts += _panel(lt, 0, top, pw, ph, "n_rules", "rules switched on (log scale)", ylo, yhi)
    parts += _panel(lt, pw, top, pw, ph, "n_numbers", "explicit numbers of those rules (log scale)", ylo, yhi)
    parts.append("</svg>")
    return "".join(parts) + "\n"


# -- the catalog's section -------------------------------------------------------------------------
def _cell(c: LevelCount, what: str) -> str:
    v = c.n_rules if what == "rules" else c.n_numbers
    return "not reached" if v is None else f"{v:,}"


def long_tail_markdown(lt: LongTail, svg_name: str) -> list[str]:
    fin = "-" if lt.final_explained is None else f"{100 * lt.final_explained:.1f}%"
    lines = ["", "## Long tail: explained against rules switched on", "", f"![long tail]({svg_name})", "",
             f"Rules switched on one prefix at a time in order of the KL each removes (ΔKL below, largest first), every "
             f"other rule off and nothing refitted; each point is one engine pass over the eval set. `verified`: only "
             f"the rules whose component check passes, in the same order ({lt.n_verified} of {lt.n_rules}; "
             f"{_md(lt.verdicts)}). Prefix sizes are log-spaced: **points between the measured ones are not "
             f"measured**, so a count below is the smallest measured prefix that reaches the level (first reached "
             f"after the prefix in the last column). Levels are shares of the all-rules figure ({fin} explained).", "",
             *[f"**Note**: {_md(n)}.\n" for n in lt.notes],
             "| curve | level | explained to reach | rules | numbers | reached after (rules) |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in lt.levels:
        after = "-" if c.after is None or c.n_rules is None else f"{c.after:,}"
        if c.n_rules is None and c.best is not None:
            after = f"best measured: {100 * c.best:.1f}%"
        target = "-" if np.isnan(c.target) else f"{100 * c.target:.1f}%"
        lines.append(f"| {c.curve} | {int(c.level * 100)}% | {target} | {_cell(c, 'rules')} | "
                     f"{_cell(c, 'numbers')} | {after} |")
    lines += ["", f"Measured points ({lt.passes} engine passes in {lt.seconds:.0f} s; the rest from the ledger's row "
              "cache):", "", "| curve | rules | numbers | KL | explained | top-1 | last rule added |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for p in lt.points:
        ex = "-" if p.explained is None else f"{100 * p.explained:.1f}%"
        lines.append(f"| {p.curve} | {p.n_rules:,} | {p.n_numbers:,} | {p.kl:.4f} | {ex} | {100 * p.top1:.1f}% | "
                     f"`{p.last_rule}` |")
    return lines


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")
