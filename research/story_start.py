"""Write the `story.start` rule of 60_long_tail.toml: the first prediction of a story.

Every story of valid.txt is scored as its own sequence, so position 0 is always '<|endoftext|>' with nothing
before it. The drafted rules never saw that context: `suggest` fits on 256-token windows cut from the
stream of training stories ([EOT] s1 [EOT] s2 …), where '<|endoftext|>' almost always follows a previous
story. At position 0 the reference and the fitted rules then disagree by ~1 nat (reference: 'Once' 0.44,
'once' 0.24; rules: 'once' 0.39, 'Once' 0.34).

The rule is a neuron that fires (activation 1) only there — current token '<|endoftext|>' and no earlier
token at all — and whose `next` table moves the hand model's distribution at that one context onto the
reference's for the K tokens the reference finds likeliest: for v in the top K,
next[v] = log p_ref(v) − log p_hand(v) + log((1 − P_hand(top K)) / (1 − P_ref(top K))), which makes those K
probabilities equal the reference's and scales the rest of the hand distribution to the remaining mass.
The numbers come from the reference's output at the single context [EOT], not from any corpus text, and
from the hand model without this rule (so re-run after every re-draft of the other files).

    python -m research.story_start            # rewrites the story.start block of rules/60_long_tail.toml
    python -m research.story_start --k 128    # fewer numbers
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

RULES = Path(__file__).resolve().parents[1] / "rules"
FILE_NAME = "60_long_tail.toml"
RULE_ID = "story.start"
BEGIN = "# --- story.start (written by research/story_start.py) ---"
END = "# --- end story.start ---"
# the block as found in a file, whichever script path its marker names (files written before the move say rules/)
BLOCK = re.compile(r"^# --- story\.start \(written by [\w/.]+\) ---$.*?^" + re.escape(END) + "$", re.S | re.M)


def correction(ref_lp, hand_lp, k: int):
    """(token ids, logit corrections) for the reference's top-k tokens, see the module doc."""
    import numpy as np

    r = np.asarray(ref_lp, np.float64)
    h = np.asarray(hand_lp, np.float64)
    top = np.argsort(-r, kind="stable")[:k]
    p_ref, p_hand = np.exp(r[top]).sum(), np.exp(h[top]).sum()
    shift = np.log1p(-min(p_hand, 1 - 1e-12)) - np.log1p(-min(p_ref, 1 - 1e-12))
    return top, r[top] - h[top] + shift


def corrected(hand_lp, top, delta):
    """The hand model's log-probs at [EOT] with the rule on, its numbers rounded as the file writes them."""
    import numpy as np

    from handmodel.writer import num

    z = np.asarray(hand_lp, np.float64).copy()
    z[top] += [float(num(d)) for d in delta]
    return z - np.logaddexp.reduce(z)


def kl(ref_lp, hand_lp) -> float:
    import numpy as np

    r = np.asarray(ref_lp, np.float64)
    h = np.asarray(hand_lp, np.float64)
    return float((np.exp(r) * (r - h)).sum())


def block(vocab: list[str], top, delta, k: int, before: float, after: float) -> str:
    from handmodel.writer import inline_table, q

    items = [(q(vocab[int(i)]), float(d)) for i, d in zip(top, delta)]
    first = ", ".join(repr(vocab[int(i)]) for i in top[:4])
    doc = (f"The first prediction of a story ('<|endoftext|>' with nothing before it): the reference's own "
           f"distribution there, for its {k} likeliest tokens ({first}); the fitted rules only ever saw "
           "'<|endoftext|>' after a previous story.")
    return "\n".join([
        BEGIN,
        f"# K = {k}: KL(ref ‖ hand) at the context [EOT] {before:.3f} nats without this rule, {after:.3f} with it.",
        "[[neuron]]",
        f'id = "{RULE_ID}"',
        f"doc = {q(doc)}",
        'check = { expect = "none", why = "fires at one context only (a story\'s first position); its numbers are '
        'the reference\'s output there, not a claim about other contexts" }',
        "threshold = 0.0",
        'now = { "<|endoftext|>" = 1.0 }',
        'present = { "@all" = -1.0 }',
        f"next = {inline_table(items)}",
        END,
    ])


def put_block(text: str, new: str) -> str:
    """`text` with its story.start block replaced by `new`, or `new` appended when it has none."""
    return BLOCK.sub(lambda m: new, text, count=1) if BLOCK.search(text) else text.rstrip("\n") + "\n\n" + new + "\n"


def main() -> int:
    import numpy as np

    from handmodel import HandModel, load_rules
    from handmodel.vocab import load_vocab
    from reference.oracle import Oracle

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=256, help="tokens of the reference's distribution matched")
    ap.add_argument("--rules", default=str(RULES), help=f"ruleset directory; the rule goes into its {FILE_NAME}")
    a = ap.parse_args()
    if a.k < 1:
        ap.error(f"--k {a.k}: must be at least 1 (tokens of the reference's distribution to match)")
    file = Path(a.rules) / FILE_NAME
    if not file.is_file():
        print(f"{file}: no such file; the story.start rule goes into the ruleset's long-tail file "
              f"(create it, e.g. with a `group = \"long tail\"` line, or pass --rules DIR)", file=sys.stderr)
        return 2
    oracle = Oracle.load()
    vocab = load_vocab(oracle.path / "tokenizer.json")
    seq = np.array([vocab.index("<|endoftext|>")])
    ref_lp = oracle.log_probs([seq])[0][0]
    rules = load_rules(a.rules, vocab)
    mask = np.array([rid != RULE_ID for rid in rules.rule_ids])
    hm = HandModel(rules)
    hand_lp = hm.log_probs(seq, mask=mask)[0]
    top, delta = correction(ref_lp, hand_lp, a.k)
    before, after = kl(ref_lp, hand_lp), kl(ref_lp, corrected(hand_lp, top, delta))
    new = block(vocab, top, delta, a.k, before, after)
    text = file.read_text()
    file.write_text(put_block(text, new))
    print(f"{file.name}: {RULE_ID} with {a.k} entries; KL at [EOT] {before:.4f} -> {after:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
