"""State the claims of the shipped rules and record which ones the reference refutes.

A rule drafted by `handmodel suggest` says `check = { expect = "none" }`: a fitted correction, no
claim. This script is the researcher's pass over the ruleset that states claims for the rules a reader
is most likely to rely on (the most frequent rows, the heads, their most attended sources, the most
contextual neurons), runs `handmodel check-rules` on them (same example budget as the pytest cases),
and marks each claim the reference refutes `expect = "fail"` with the measured reason, so the
failure stays visible (strict xfail) instead of disappearing.

    python -m research.claims                  # rewrites the check lines of rules/*.toml in place
    python -m research.claims --rules drafts/  # the same for another ruleset

Re-run after `suggest`; edit CLAIMS below to claim more (or differently).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 10  # the shipped pytest cases' default budget (tests/test_shipped_rules_check.py)

# (file, kind, how many rules from the top of the file (None: all), claim) — files list the most frequent /
# most attended rules first. A fitted row's numbers are corrections on top of everything else that fires,
# so a row is claimed `together`: its raised tokens as one pool gain probability (after the row's current
# token vs the reference's unigram; with the head_out's source inserted earlier vs a neutral token), its
# lowered tokens lose it. A head_out row claims only its entries of weight ≥ 1 (the smaller ones are
# fine corrections that change with the context). The prior is the reference's measured mean
# distribution, not a claim about contexts: no claim.
ROW = "together = 1, fraction = 0.6"
HEAD_OUT = "together = 1, min_weight = 1.0, fraction = 0.6"
CLAIMS = [
    ("20_bigram_classes.toml", "bigram", None, ROW),
    ("30_bigram_tokens.toml", "bigram", None, ROW),
    ("40_head0.toml", "head", 1, "fraction = 0.6"),
    ("41_head1.toml", "head", 1, "fraction = 0.6"),
    ("42_head2.toml", "head", 1, "fraction = 0.6"),
    ("43_head3.toml", "head", 1, "fraction = 0.5"),
    ("40_head0.toml", "head_out", None, HEAD_OUT),
    ("41_head1.toml", "head_out", None, HEAD_OUT),
    ("42_head2.toml", "head_out", None, HEAD_OUT),
    ("43_head3.toml", "head_out", None, HEAD_OUT),
    # the joint fit repurposes its neurons (a neuron rule no longer describes the reference neuron it started
    # from): the most active ones claim their behaviour instead (check-rules `feature`)
    ("50_neurons.toml", "neuron", 40, "feature = 1, together = 1, fraction = 0.6"),
    # every copying rule: with a story word inserted earlier, the reference makes that same word likelier
    # (after the rule's `now` tokens) than with a neutral token in its place
    ("45_copying.toml", "head_out", None, "fraction = 0.6"),
]
CHECK_LINE = re.compile(r"^check = \{.*\}$", re.M)


def set_check(text: str, rid: str, body: str) -> str:
    """Replace the `check = {...}` line of rule `rid` (the first one after its id line)."""
    m = re.search(r'^id = "' + re.escape(rid) + r'"$', text, re.M)
    if m is None:
        raise SystemExit(f"rule {rid} not found")
    c = CHECK_LINE.search(text, m.end())
    nxt = re.search(r"^\[\[", text[m.end():], re.M)
    if c is None or (nxt is not None and c.start() > m.end() + nxt.start()):
        raise SystemExit(f"rule {rid} has no check line to replace")
    return text[:c.start()] + f"check = {{ {body} }}" + text[c.end():]


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", type=Path, default=ROOT / "rules",
                    help="ruleset directory whose check lines are rewritten")
    rules_dir = ap.parse_args().rules
    if not rules_dir.is_dir():
        ap.error(f"--rules {rules_dir}: no such directory (a ruleset folder such as rules/ or a suggest --out folder)")
    texts = {f.name: f.read_text(encoding="utf-8") for f in rules_dir.glob("*.toml")}
    claimed: dict[str, tuple[str, str]] = {}
    for fname, kind, n, claim in CLAIMS:
        if fname not in texts:  # a draft without that file (e.g. suggest --neurons 0)
            print(f"  ({fname} is not in this ruleset: its claims are skipped)")
            continue
        for r in tomllib.loads(texts[fname]).get(kind, [])[:n]:
            texts[fname] = set_check(texts[fname], r["id"], claim)
            claimed[r["id"]] = (fname, claim)
    for fname, t in texts.items():
        (rules_dir / fname).write_text(t, encoding="utf-8")
    # the same checker, arguments and example budget as tests/test_shipped_rules_check.py, so what is
    # marked here is exactly what the pytest cases will find
    from verify.claims import Checker

    corpus = ROOT.parent / "shared" / "corpus" / "tinystories" / "train.txt"
    checker = Checker.from_paths(rules_dir, ROOT / "reference" / "default", corpus if corpus.exists() else None,
                                 examples=EXAMPLES, shrink_calls=max(100, 5 * EXAMPLES))
    by_id = {r.id: r for r in checker.rules.rules}
    res = [checker.check(by_id[rid]).to_dict() for rid in claimed]
    n_fail = 0
    for x in res:
        if x["status"] != "fail":
            continue
        n_fail += 1
        fname, claim = claimed[x["id"]]
        why = f"reference disagrees: {x['measured']}"[:200]
        texts[fname] = set_check(texts[fname], x["id"], f'{claim}, expect = "fail", why = {toml_str(why)}')
    for fname, t in texts.items():
        (rules_dir / fname).write_text(t, encoding="utf-8")
    from collections import Counter

    n_rules = len(checker.rules.rules)
    st = Counter(x["status"] for x in res)
    print(f"{n_rules} rules; {len(claimed)} claims stated: {st['pass']} pass, {n_fail} refuted by the reference "
          f"(marked expect = \"fail\"), {st['no claim']} testable claim none (e.g. no weight ≥ min_weight), "
          f"{st['error']} errors; {n_rules - len(claimed)} rules state no claim")
    for x in res:
        print(f"  {x['status']:9s} {x['id']}: {x['measured'][:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
