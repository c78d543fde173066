"""A ruleset written from the components alone, no output fitting: the prior and the bigram rows (issue 21).

  prior        the log of the reference's mean next-token distribution over training positions (the unigram:
               the best constant under KL(p_ref ‖ ·); the prior check compares its centred logits with the mean
               centred log p_ref, verify/claims/measure.py `_prior`; the shipped prior is the same quantity)
  bigram rows  per token seen at least MIN_COUNT times: the token-alone write after it (log p_ref − log p_ref
               with E[tok] mean-ablated where the direct path and the MLP read it, heads held: the bigram check's
               component, ref_side.token_alone_ablated), averaged over its training positions, its K largest
               |entries| after the row's median shift (tables.top_k)

Every number comes from train.txt windows; each row's doc states what the component does in the reference
(the tokens the current token itself pushes up and down at its own position). The point: rules drafted from
their component pass their checks, and the verified ledger counts what they explain (research/README.md).
Usage: PYTHONPATH=. python research/faithful/construct_bigram.py OUT [n_train] [k] [min_count]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from handmodel import vocab_fingerprint
from handmodel.writer import inline_table, name_part, q
from verify.claims import ref_side as R

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import centred, shipped, top_k, value_stats  # noqa: E402

CHECK = 'check = { expect = "none", why = "its claim is the component check: what the current token writes at its own position" }\n'


def _desc(vocab, support, w, n=4) -> tuple[str, str]:
    up = [i for i in np.argsort(-w) if w[i] > 0][:n]
    down = [i for i in np.argsort(w) if w[i] < 0][:n]
    show = lambda ix: ", ".join(f"{vocab[support[i]]!r} ({w[i]:+.2f})" for i in ix)  # noqa: E731
    return show(up), show(down)


@torch.inference_mode()
def main(out: str, n_train: int = 512, k: int = 32, min_count: int = 20) -> None:
    ckpt, oracle, train = shipped(n_train)
    model, V, vocab = oracle.model, oracle.cfg.vocab_size, oracle.vocab
    means = R.context_means(model, [train[i:i + 8] for i in range(0, len(train), 8)])
    write = torch.zeros(V, V, dtype=torch.float64)
    prior = torch.zeros(V, dtype=torch.float64)  # summed p_ref

    def each(b):
        lp = centred(b.lp).reshape(-1, V)
        prior.add_(b.lp.double().exp().reshape(-1, V).sum(0))
        write.index_add_(0, b.idx.reshape(-1), lp - centred(R.token_alone_ablated(model, b, means)).reshape(-1, V))

    st = value_stats(oracle, train, each)
    cnt = st.count
    prior = torch.log(prior / cnt.sum())
    rows_of = np.flatnonzero(cnt.numpy() >= min_count)
    rows = top_k(write[rows_of] / cnt[rows_of, None], k)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=False)
    fp = vocab_fingerprint(vocab)
    head = (f"# constructed by research/faithful/construct_bigram.py from the reference's components on {len(train) * train.shape[1]:,}\n"
            f"# train.txt positions (checkpoint {ckpt.hash}; k {k}, tokens seen >= {min_count} times)\nvocab = \"{fp}\"\n")
    items = [(q(vocab[t]), round(float(prior[t]), 3)) for t in range(V)]
    (outp / "00_prior.toml").write_text(head + 'group = "prior"\n\n[[prior]]\nid = "prior.mean"\n'
                                        'doc = "The reference\'s mean output: the log of its next-token distribution averaged over training positions."\n'
                                        + CHECK + f"next = {inline_table(items)}\n", encoding="utf-8")
    blocks, used = [], set()
    order = np.argsort(-cnt[rows_of].numpy())
    for j in order:
        c = int(rows_of[j])
        r = rows[j].numpy()
        support = np.flatnonzero(r)
        w = r[support]
        rid = f"self.{name_part(vocab[c])}"
        while rid in used:
            rid += "_"
        used.add(rid)
        up, down = _desc(vocab, support, w)
        doc = (f"What {vocab[c]!r} itself writes at its own position (direct path + MLP, attention held): "
               f"up {up}; down {down}.")
        blocks.append(f"# seen {int(cnt[c])} times in the training windows\n[[bigram]]\nid = \"{rid}\"\ndoc = {q(doc)}\n" + CHECK
                      + f"now = {q(vocab[c])}\nnext = {inline_table((q(vocab[t]), round(float(x), 3)) for t, x in zip(support, w))}\n")
    (outp / "30_bigram_self.toml").write_text(head + 'group = "bigram: token-alone rows"\n\n' + "\n".join(blocks), encoding="utf-8")
    print(f"wrote {outp}: prior ({V} numbers) and {len(blocks)} rows of {k} ({len(blocks) * k:,} numbers)")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
