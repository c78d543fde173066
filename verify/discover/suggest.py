"""`handmodel suggest`: draft a whole ruleset from the reference, for a person to read, edit and refit.

Pipeline (every number fitted on TRAINING text; valid.txt is only ever scored by `verify`):
1. bigram structure (bigrams.py): unigram prior, token classes, class rows, per-token exceptions,
   from the oracle bigram table that `verify` also uses as a baseline;
2. heads (heads.py): one hand [[head]] per reference head, its position/source-score tables fitted
   to the reference's attention patterns;
3. [[head_out]] rows for the source tokens each head attends to most, and a refit of the frequent
   tokens' bigram rows with the heads in place, by moment matching (iterative scaling): for a rule
   whose contribution is (activation φ) × (logit δ_v on its support), the KL(p_ref ‖ p_hand)-optimal
   δ makes Σ_t φ_t p_hand,t(v) = Σ_t φ_t p_ref,t(v) on the support; each round moves
   δ_v += η (log E_ref − log E_hand), with p_hand computed by the real engine from the written files.
Files are rewritten every round and reloaded with handmodel.load_rules, so what is fitted is exactly
what the engine runs. Its options: suggest_options.py. (Over 400 lines: one pipeline whose stages share the
draft's state; splitting it would restructure the algorithm.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handmodel.errors import UserError
from handmodel.writer import inline_table, name_part, num, q

from .bigrams import draft_bigrams
from .draft_files import DRAFT_CHECK, FileSet, ranked, write_bigram_files
from .heads import HeadDraft, draft_heads, hand_attention
from .neurons import NeuronDraft, draft_neurons, hand_activation, reference_activations
from .suggest_options import DEFAULTS, OPTIONS_FILE, SuggestOptions

EPS = 1e-9
# Moment matching on a sample over-trusts rare tokens (a token seen twice after a source gets a huge
# ratio). Both expectations get a pseudo-probability SMOOTH per unit of feature mass, which shrinks
# those ratios toward 1, and a support entry must carry at least that much reference mass.
SMOOTH = 2e-4


def _ratio_step(e_ref: np.ndarray, e_hand: np.ndarray, mass: float) -> np.ndarray:
    lam = SMOOTH * max(mass, EPS)
    return np.clip(np.log(e_ref + lam) - np.log(e_hand + lam), -2, 2)


@dataclass
class HeadOut:
    head: int  # index into the head drafts
    src: int
    support: np.ndarray
    delta: np.ndarray
    mass: float = 0.0  # attention mass the source receives on the training sample (per position)


@dataclass
class Draft:
    files: FileSet
    heads: list[HeadDraft] = field(default_factory=list)
    outs: list[HeadOut] = field(default_factory=list)
    neurons: list[NeuronDraft] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def head_id(h: HeadDraft) -> str:
    return f"head{h.ref_head}"


def head_block(h: HeadDraft, vocab: list[str], class_names: list[str] | None = None) -> tuple[str, int]:
    pos = ", ".join(f"{d} = {num(w)}" for d, w in enumerate(h.position)) + f", default = {num(h.pos_default)}"
    entries = [f"{{ src = {q(vocab[t])}, w = {num(w)} }}" for t, w in zip(h.score_tok, h.score_w)]
    if h.query is not None and class_names:
        # query-dependent part: which class of source tokens it looks at depends on the current token's class
        for a, b, w in zip(h.query.now, h.query.src, h.query.w):
            entries.append(f"{{ now = \"@{class_names[a]}\", src = \"@{class_names[b]}\", w = {num(w)} }}")
    scores = ",\n  ".join(entries)
    what = {"previous-token": "a previous-token head: it mostly attends to the token just before the current one",
            "self": "it mostly attends to the current token itself",
            "content": "a content head: where it looks depends mostly on which tokens are in the context"}[h.kind]
    doc = f"Reference head {h.ref_head} is {what}."
    text = (f"# fitted to the reference head's attention on training text: KL(ref attention ‖ this) = {h.fit_kl:.3f} nats "
            f"(position table alone: {h.uniform_kl:.3f}); mean reference attention at distance 1: {h.prev_share:.2f}, "
            f"at distance 0: {h.self_share:.2f}\n"
            f"[[head]]\nid = \"{head_id(h)}\"\ndoc = {q(doc)}\n" + DRAFT_CHECK + f"position = {{ {pos} }}\n"
            + (f"score = [\n  {scores}\n]\n" if entries else ""))
    return text, len(h.position) + 1 + len(entries)


def head_out_block(o: HeadOut, h: HeadDraft, vocab: list[str], rid: str, counts=None) -> str:
    top = ", ".join(repr(vocab[o.support[i]]) for i in ranked(o.support, o.delta, counts)[:3]) or "nothing in particular"
    doc = f"When head {h.ref_head} attends to {vocab[o.src]!r}, the reference favours {top}."
    items = [(q(vocab[t]), float(w)) for t, w in zip(o.support, o.delta)]
    return (f"# attention mass on this source per training position: {o.mass:.4f}; fitted by moment matching\n"
            f"[[head_out]]\nid = \"{rid}\"\ndoc = {q(doc)}\n" + DRAFT_CHECK + f"head = \"{head_id(h)}\"\nsrc = {q(vocab[o.src])}\n"
            f"next = {inline_table(items)}\n")


def write_head_files(fs: FileSet, heads: list[HeadDraft], outs: list[HeadOut], class_names: list[str] | None = None,
                     counts=None) -> None:
    V = fs.vocab
    for h in heads:
        fname = f"{40 + h.ref_head}_head{h.ref_head}.toml"
        fs.start(fname, f"head {h.ref_head} ({h.kind})",
                 f"Reference head {h.ref_head}: where it looks ([[head]], fitted to its attention patterns) and\n"
                 "what each attended source token adds to the logits ([[head_out]], fitted by moment matching).")
        fs.add(fname, head_block(h, V, class_names)[0])
        used: set[str] = set()
        for o in outs:
            if heads[o.head] is not h or not len(o.support):
                continue
            rid = f"{head_id(h)}.{name_part(V[o.src])}"
            while rid in used:
                rid += "_"
            used.add(rid)
            fs.add(fname, head_out_block(o, h, V, rid, counts))


COPY_FILE = "45_copying.toml"


def copy_supported() -> bool:
    from handmodel.rulefile import KEYS

    return "copy" in KEYS["head_out"]


def story_words(vocab: list[str], counts: np.ndarray, min_count: int, skip_top: int = 150) -> np.ndarray:
    """Tokens a story may repeat (names, objects): whole words with a leading space, seen often enough,
    outside the most frequent (function) words."""
    import re

    rank = np.argsort(-counts)
    top = set(rank[:skip_top].tolist())
    word = re.compile(r"^ [A-Za-z]{2,}$")
    return np.array([v for v in range(len(vocab)) if counts[v] >= min_count and v not in top and word.match(vocab[v])],
                    dtype=np.int64)


def write_copy_file(fs: FileSet, heads: list[HeadDraft], words: np.ndarray, weights: list[float],
                    by_class: np.ndarray | None = None, class_names: list[str] | None = None) -> None:
    """One copy rule per head; with `by_class` ([H, K] joint-fit corrections per class of the current
    token) one rule per head and class instead, each holding the whole copy weight after that class
    (so each rule is a claim of its own: "after @class, an attended story word becomes likelier")."""
    V = fs.vocab
    fs.start(COPY_FILE, "copying", "Copying: when a head attends to a story word (a name, an object) seen earlier, that\n"
             "same word becomes likelier next. [[head_out]] copy rules: one weight per head"
             + (" and class of the current token (joint fit)." if by_class is not None else " (moment matching)."))
    toks = ", ".join(q(V[t]) for t in words)
    fs.add(COPY_FILE, f"[[class]]\nid = \"story_words\"\ndoc = {q('Whole words a story may repeat: names and objects, not the 150 most frequent words')}\n"
                      f"tokens = [{toks}]\n")
    if by_class is None:
        for h, w in zip(heads, weights):
            fs.add(COPY_FILE, f"[[head_out]]\nid = \"{head_id(h)}.copy\"\n"
                              f"doc = {q(f'When head {h.ref_head} attends to a story word, that word becomes likelier next (copying).')}\n"
                              + DRAFT_CHECK + f"head = \"{head_id(h)}\"\nsrc = \"@story_words\"\ncopy = {num(w)}\n")
        return
    others = ", ".join(f'"@{c}"' for c in class_names)
    fs.add(COPY_FILE, f"[[class]]\nid = \"unclustered\"\ndoc = \"Tokens in none of the {len(class_names)} classes (too rare to cluster).\"\n"
                      f"tokens = [\"@all\"]\nexcept = [{others}]\n")
    for hi, h in enumerate(heads):
        total = weights[hi] + by_class[hi]
        for k in np.argsort(-total):
            w = float(total[k])
            how = "likelier" if w > 0 else "less likely"
            fs.add(COPY_FILE, f"[[head_out]]\nid = \"{head_id(h)}.copy.{class_names[k]}\"\n"
                              f"doc = {q(f'After a @{class_names[k]} token, a story word head {h.ref_head} attends to becomes {how} next.')}\n"
                              + DRAFT_CHECK + f"head = \"{head_id(h)}\"\nnow = \"@{class_names[k]}\"\n"
                              f"src = \"@story_words\"\ncopy = {num(w)}\n")
        fs.add(COPY_FILE, f"[[head_out]]\nid = \"{head_id(h)}.copy.unclustered\"\n"
                          f"doc = {q(f'After a rare token, a story word head {h.ref_head} attends to becomes likelier next.')}\n"
                          + DRAFT_CHECK + f"head = \"{head_id(h)}\"\nnow = \"@unclustered\"\n"
                          f"src = \"@story_words\"\ncopy = {num(weights[hi])}\n")


def copy_expectation(attn: list[list[np.ndarray]], sample, member: np.ndarray, P: np.ndarray) -> np.ndarray:
    """[H] Σ_t Σ_s A_h(t,s)·[tok_s ∈ words]·P[t, tok_s]: the probability mass each head's copy feature sees."""
    T = sample.windows.shape[1]
    out = np.zeros(len(attn))
    for hi, per_window in enumerate(attn):
        for b, (w, A) in enumerate(zip(sample.windows, per_window)):
            out[hi] += float(((A * member[w][None, :]) * P[b * T:(b + 1) * T][:, w]).sum())
    return out


def neuron_doc(neuron: int, now, attend, nxt) -> str:
    """A neuron rule's doc from its own (fitted) entries: `now`/`nxt` [(label, w, training count)], `attend`
    [(head, label, w, count)]; entries named by |w| × √count (a class counts all its members' occurrences)."""
    def top(items, sign, n):
        idx = ranked(np.arange(len(items)), np.array([x[-2] for x in items], float),
                     np.array([x[-1] for x in items], float), sign)
        return [items[i] for i in idx[:n]]

    def names(items):
        return ", ".join(x[0] for x in items) or "nothing"

    doc = f"Started from reference neuron {neuron}: fires after {names(top(now, 1.0, 3))}"
    for sign, word in ((1.0, "more"), (-1.0, "less")):
        t = top(attend, sign, 1)
        if t:
            doc += f"; {word} when head {t[0][0]} attends to {t[0][1]}"
    return doc + f"; pushes {names(top(nxt, 1.0, 3))} up and {names(top(nxt, -1.0, 2))} down."


PATTERN_FILE = "48_neuron_patterns.toml"


def pattern_names(heads: list[HeadDraft], patterns, vocab: list[str], counts=None) -> list[str]:
    """Ids of the shared patterns: kind, number and the two tokens that weigh most (|w| × √count)."""
    out = []
    for j, p in enumerate(patterns):
        top = ranked(p.tokens, np.abs(p.w), counts)[:2] if len(p.tokens) else []
        tail = "_".join(name_part(vocab[p.tokens[i]]) for i in top) or "empty"
        kind = "out" if p.head < 0 else f"{head_id(heads[p.head])}.read"
        out.append(f"{kind}{j:02d}.{tail}")
    return out


def write_pattern_file(fs: FileSet, heads: list[HeadDraft], neurons: list[NeuronDraft], patterns, names, counts=None) -> None:
    """48_neuron_patterns.toml: the shared weighted token sets the neurons read and write ([[weights]]); a
    pattern no neuron references after the cuts is not written."""
    users = [0] * len(patterns)
    for d in neurons:
        for j, _ in d.next_sets:
            users[j] += 1
        for _, j, _ in d.attend_sets:
            users[j] += 1
    if not any(users):
        return
    V = fs.vocab
    fs.start(PATTERN_FILE, None, "Weighted token sets shared by the neurons (joint fit): output patterns (a neuron adds\n"
             "x × pattern to the logits) and read patterns per head (a neuron's input gains x × the head's attention\n"
             "weighted by the pattern). Each pattern is paid for once; a neuron's reference is one number.")
    for j, p in enumerate(patterns):
        if not users[j]:
            continue
        up = ", ".join(repr(V[p.tokens[i]]) for i in ranked(p.tokens, p.w, counts)[:4]) or "nothing"
        down = ", ".join(repr(V[p.tokens[i]]) for i in ranked(p.tokens, p.w, counts, -1.0)[:3]) or "nothing"
        if p.head < 0:
            doc = f"Output pattern shared by {users[j]} neurons: raises {up}; lowers {down}."
        else:
            doc = (f"What {users[j]} neurons read from head {heads[p.head].ref_head}: attention on {up} counts "
                   f"positively, on {down} negatively.")
        order = np.argsort(-np.abs(p.w), kind="stable")
        items = [(q(V[p.tokens[i]]), float(p.w[i])) for i in order if num(p.w[i]) != "0.000"]
        fs.add(PATTERN_FILE, f"[[weights]]\nid = \"{names[j]}\"\ndoc = {q(doc)}\ntokens = {inline_table(items)}\n")


def write_neuron_file(fs: FileSet, heads: list[HeadDraft], neurons: list[NeuronDraft], class_names=(), counts=None,
                      class_members=(), patterns=()) -> None:
    """50_neurons.toml; class-level entries (joint fit with --neuron-classes) are written as "@class" keys,
    references to shared patterns (joint fit with shared patterns; written to PATTERN_FILE) as "@pattern" keys."""
    if not neurons:
        return
    V = fs.vocab
    pnames = pattern_names(heads, patterns, V, counts)
    write_pattern_file(fs, heads, neurons, patterns, pnames, counts)
    pat = [f"\"@{n}\"" for n in pnames]
    pcnt = [float(np.asarray(counts, float)[p.tokens].sum()) if counts is not None else 1.0 for p in patterns]
    fname = "50_neurons.toml"
    fs.start(fname, "neurons", "MLP neurons whose firing depends on context, not only on the current token\n"
             "(largest contextual activation variance x logit effect first). `now`: mean activation after each\n"
             "token; `attend`: what the head outputs add; `next`: fitted by moment matching.")
    cls = [f"\"@{n}\"" for n in class_names]  # class ids need no escaping (q() would write a literal @@ token)
    cnt = np.asarray(counts, float) if counts is not None else np.ones(len(V))
    ccnt = [float(cnt[m].sum()) for m in class_members] if len(class_members) else [1.0] * len(class_names)
    for d in neurons:
        now = inline_table([(q(V[t]), float(w)) for t, w in zip(d.now_tok, d.now_w)] + [(cls[k], w) for k, w in d.now_cls])
        att: dict[str, list[str]] = {}
        for hi, src, w in d.attend:
            att.setdefault(head_id(heads[hi]), []).append(f"{q(V[src])} = {num(w)}")
        for hi, k, w in d.attend_cls:
            att.setdefault(head_id(heads[hi]), []).append(f"{cls[k]} = {num(w)}")
        for hi, j, w in d.attend_sets:
            att.setdefault(head_id(heads[hi]), []).append(f"{pat[j]} = {num(w)}")
        attend = ", ".join(f'"{h}" = {{ {", ".join(e)} }}' for h, e in att.items())
        doc = neuron_doc(d.neuron,
                         [(repr(V[t]), w, cnt[t]) for t, w in zip(d.now_tok, d.now_w)] + [(f"@{class_names[k]}", w, ccnt[k]) for k, w in d.now_cls],
                         [(heads[hi].ref_head, repr(V[t]), w, cnt[t]) for hi, t, w in d.attend]
                         + [(heads[hi].ref_head, f"@{class_names[k]}", w, ccnt[k]) for hi, k, w in d.attend_cls]
                         + [(heads[hi].ref_head, f"@{pnames[j]}", w, pcnt[j]) for hi, j, w in d.attend_sets],
                         [(repr(V[t]), w, cnt[t]) for t, w in zip(d.support, d.delta)] + [(f"@{class_names[k]}", w, ccnt[k]) for k, w in d.next_cls]
                         + [(f"@{pnames[j]}", w, pcnt[j]) for j, w in d.next_sets])
        nxt = inline_table([(q(V[t]), float(w)) for t, w in zip(d.support, d.delta)] + [(cls[k], w) for k, w in d.next_cls]
                           + [(pat[j], w) for j, w in d.next_sets])
        fs.add(fname, f"# contextual share of its activation variance on training text: {d.ctx_share:.2f}; "
                      f"mean activation {d.mean_act:.3f}\n"
                      f"[[neuron]]\nid = \"neuron.{d.neuron}\"\ndoc = {q(doc)}\n" + DRAFT_CHECK + f"threshold = {num(d.threshold)}\nnow = {now}\n"
                      + (f"attend = {{ {attend} }}\n" if attend else "") + f"next = {nxt}\n")


class TrainSample:
    """Training windows with the reference's next-token probabilities (float32, in memory)."""

    def __init__(self, oracle, windows: np.ndarray):
        self.windows = windows
        self.seqs = [w.astype(np.int32) for w in windows]
        lp = np.concatenate(oracle.log_probs(list(windows)))
        self.logp = lp
        self.p = np.exp(lp)
        self.tokens = windows.ravel()

    def hand_p(self, hm) -> np.ndarray:
        return np.exp(np.concatenate(hm.log_probs_batch(self.seqs)))

    def kl(self, hm) -> float:
        return float(np.mean(hm.stream_metrics(self.seqs, self.logp)["kl"]))


def head_attention(sample: TrainSample, h: HeadDraft, V: int) -> list[np.ndarray]:
    """Hand head h's attention [T, T] (float32) on every training window; computed once, read by the
    head_out masses and the copy features every round."""
    score = np.zeros(V)
    score[h.score_tok] = h.score_w
    return [hand_attention(w, h.position, h.pos_default, score).astype(np.float32) for w in sample.windows]


def attention_masses(sample: TrainSample, attn: list[np.ndarray], V: int, src: np.ndarray) -> np.ndarray:
    """[N, len(src)] attention mass of a hand head (attn: head_attention) on each source token, per position."""
    col = np.full(V, -1)
    col[src] = np.arange(len(src))
    out = np.zeros((sample.windows.size, len(src)), np.float32)
    T = sample.windows.shape[1]
    for b, (w, A) in enumerate(zip(sample.windows, attn)):
        c = col[w]
        keep = c >= 0
        block = np.zeros((T, len(src)), np.float32)
        np.add.at(block.T, c[keep], A[:, keep].T)
        out[b * T:(b + 1) * T] = block
    return out


def suggest(oracle, out_dir: Path, train_corpus: Path, opts: SuggestOptions = DEFAULTS, *, log=print,
            command: str = "") -> dict:
    """Draft a ruleset into out_dir (see the module doc) with `opts`, then write them to out_dir/OPTIONS_FILE
    (with `command`, the command line, as a comment) so the draft can be made again."""
    summary = _draft(oracle, Path(out_dir), train_corpus, opts, log)
    head = ("handmodel suggest options: `handmodel suggest --config THIS_FILE --out NEW_FOLDER` drafts these rules again\n"
            f"(checkpoint {oracle.hash}, training text {Path(train_corpus).name})" + (f"\nrun as: {command}" if command else ""))
    path = Path(out_dir) / OPTIONS_FILE
    path.write_text(opts.to_toml(head), encoding="utf-8")
    summary["options"] = str(path)
    return summary


def _draft(oracle, out_dir: Path, train_corpus: Path, opts: SuggestOptions, log) -> dict:
    """`opts.target`: an existing rules folder; the draft then spends its numbers where those rules leave the
    most KL on the training sample (token rows ∝ KL left after each token, head sources ∝ KL-weighted
    attention mass) instead of by frequency."""
    budget, n_classes, class_k, k_max, with_heads = opts.budget, opts.classes, opts.class_k, opts.k_max, opts.heads
    n_src, k_out, n_scores, positions, rounds = opts.sources, opts.k_out, opts.scores, opts.positions, opts.rounds
    min_count, att_positions, att_steps, n_neurons = opts.min_count, opts.att_positions, opts.att_steps, opts.neurons
    target, copy, joint_steps, joint_positions = opts.target, opts.copy, opts.joint_steps, opts.joint_positions
    n_query, joint_lr, neuron_classes, prune_cuts = opts.query_scores, opts.joint_lr, opts.neuron_classes, opts.prune_cuts
    prune_window, shared, held_positions = opts.prune_window, opts.shared, opts.held_positions
    faithful = opts.faithful
    from verify.ledger import data as D
    from verify.ledger.baselines import get_tables

    from handmodel import HandModel, load_rules

    from .common import sample_windows

    from .fit import check_training_text
    from .jointfit import pattern_sizes

    check_training_text(train_corpus)  # never fit on what is reported
    shared = (shared[0], shared[1], pattern_sizes(shared[2]), shared[3])  # size: N or (per output, per read pattern)
    if joint_steps < 0 or n_query < 0 or neuron_classes < 0 or min(shared[:2] + shared[2] + shared[3:]) < 0:
        raise UserError("--joint-steps, --query-scores, --neuron-classes and the --shared-* options must be >= 0")
    if (shared[0] or shared[1]) and not (min(shared[2]) and shared[3] and joint_steps and n_neurons):
        raise UserError("--shared-out/--shared-read need --shared-size > 0, --shared-refs > 0, --joint-steps > 0 and "
                        "--neurons > 0 (the patterns are fitted jointly with the neurons that use them)")
    if faithful < 0 or (faithful > 0 and not joint_steps):
        raise UserError("--faithful must be >= 0, and > 0 only with --joint-steps > 0 (the anchors are terms of the joint fit)")
    if prune_cuts < 1:
        raise UserError("--prune-cuts must be >= 1 (1: one cut straight to the kept sizes)")
    if prune_window is not None:
        from .jointfit import check_window

        try:
            check_window(prune_window)
        except ValueError as e:
            raise UserError(f"--prune-window: {e} (fractions of --joint-steps, e.g. 0.3:0.65)") from None
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.glob("*.toml")):
        raise UserError(f"{out_dir}: already holds rule files; suggest writes a fresh draft into an empty or new folder")
    ckpt = D.checkpoint_info(oracle.path)
    tables = get_tables(ckpt, Path(train_corpus), log=log)
    counts = np.load(tables.dir / "counts.npy")
    vocab = oracle.vocab
    V = len(vocab)
    fs = FileSet(out_dir, vocab, f"checkpoint {ckpt.hash}, training text {Path(train_corpus).name}"
                 + (f", targeting where {Path(target).name}/ leaves KL" if target is not None else ""))
    windows = sample_windows(oracle, train_corpus, positions, window=min(256, oracle.cfg.n_ctx),
                             max_chars=positions * 8)
    sample = TrainSample(oracle, windows)
    pos_weight = None  # per training position: how much the target rules leave unexplained
    row_weight = None
    if target is not None:
        pos_weight = HandModel(load_rules(target, vocab)).stream_metrics(sample.seqs, sample.logp)["kl"]
        row_weight = np.bincount(sample.tokens, weights=pos_weight, minlength=V)
        log(f"targeting {target}: its training-sample KL is {pos_weight.mean():.4f}")
    log("drafting bigram structure from the oracle bigram table")
    bd = draft_bigrams(tables.log_unigram, tables.log_bigram, counts, vocab, budget, n_classes, class_k, k_max,
                       min_count=min_count, row_weight=row_weight)
    write_bigram_files(fs, bd, counts)
    draft = Draft(fs)
    summary: dict = {"bigram_numbers": bd.n_numbers, "classes": len(bd.class_names)}
    if not with_heads:
        fs.write()
        rules = load_rules(out_dir, vocab)
        summary.update(rules=len(rules.rule_ids), numbers=int(np.sum(rules.rule_numbers)),
                       seconds=round(time.perf_counter() - t0, 1))
        return summary

    log(f"training sample: {windows.size:,} positions in {len(windows)} windows")
    fs.write()
    hm = HandModel(load_rules(out_dir, vocab))
    kl_bigram = sample.kl(hm)
    draft.history.append({"stage": "bigram draft", "train_kl": kl_bigram})
    log(f"train KL with the bigram draft: {kl_bigram:.4f}")

    n_att = max(4, min(len(windows), att_positions // windows.shape[1]))  # attention fit: [B, T, T] per step
    heads = draft_heads(oracle, windows[:n_att], n_scores=n_scores, min_count=min_count, steps=att_steps, log=log)
    draft.heads = heads
    # sources: the tokens each head puts most attention mass on
    masses = []
    attn: list[list[np.ndarray]] = []
    for hi, h in enumerate(heads):
        cand = np.flatnonzero(counts >= min_count)
        attn.append(head_attention(sample, h, V))
        M = attention_masses(sample, attn[-1], V, cand)
        tot = M.sum(0) if pos_weight is None else pos_weight.astype(np.float32) @ M
        keep = np.argsort(-tot)[:n_src]
        src = cand[keep]
        M = np.ascontiguousarray(M[:, keep])
        masses.append((hi, src, M, M.T @ sample.p))
        for j, s in enumerate(src):
            draft.outs.append(HeadOut(hi, int(s), np.zeros(0, np.int64), np.zeros(0), float(M[:, j].mean())))
    # choose each head_out row's support from the gap between the reference and the bigram draft
    P_hand = sample.hand_p(hm)
    k = 0
    for hi, src, M, E_ref in masses:
        E_hand = M.T @ P_hand
        for j in range(len(src)):
            o = draft.outs[k]
            k += 1
            er, eh = E_ref[j], E_hand[j]
            lam = SMOOTH * max(float(M[:, j].sum()), EPS)
            gain = er * (np.log(er + lam) - np.log(eh + lam))
            sup = np.argsort(-gain)[:k_out]
            sup = sup[(gain[sup] > 0) & (er[sup] >= lam)]
            o.support = sup.astype(np.int64)
            o.delta = np.zeros(len(sup))
    if n_neurons > 0:
        from .common import typical_ln_scale

        acts = reference_activations(oracle, windows)
        ln_scale = typical_ln_scale(oracle, windows)
        draft.neurons = draft_neurons(oracle, acts, sample.tokens, [(hi, src, M) for hi, src, M, _ in masses],
                                      ln_scale, n_neurons=n_neurons, min_count=min_count)
        neuron_var = acts[:, [nd.neuron for nd in draft.neurons]].var(0)  # the activation anchors' scale
        del acts
        by_head = {hi: (src, M) for hi, src, M, _ in masses}
        neuron_feats = []
        for nd in draft.neurons:
            a = hand_activation(nd, sample.tokens, by_head).astype(np.float32)
            neuron_feats.append((a, a @ sample.p[:, nd.support]))
        log(f"neurons: {len(draft.neurons)} drafted (most contextual first: "
            + ", ".join(str(nd.neuron) for nd in draft.neurons[:8]) + ", ...)")
    # frequent tokens' rows are refitted with the heads in place (rare rows keep the oracle-bigram fit)
    sample_counts = np.bincount(sample.tokens, minlength=V)
    refit = [c for c in bd.token_rows if sample_counts[c] >= 200]
    order = np.argsort(sample.tokens, kind="stable")
    bounds = np.searchsorted(sample.tokens[order], np.arange(V + 1))
    where = {c: order[bounds[c]:bounds[c + 1]] for c in refit}
    W = [float(o.mass) * sample.windows.size for o in draft.outs]  # total attention mass per head_out source

    def snapshot():
        return ([o.delta.copy() for o in draft.outs], [nd.delta.copy() for nd in draft.neurons],
                {c: bd.token_rows[c].delta.copy() for c in refit}, list(copy_w))

    def restore(snap):
        copy_w[:] = snap[3]
        for o, d in zip(draft.outs, snap[0]):
            o.delta = d
        for nd, d in zip(draft.neurons, snap[1]):
            nd.delta = d
        for c, d in snap[2].items():
            bd.token_rows[c].delta = d

    use_copy = copy and copy_supported()
    words = story_words(vocab, counts, min_count) if use_copy else np.zeros(0, np.int64)
    use_copy = use_copy and len(words) > 0  # a tiny vocabulary may have no such words
    copy_w = [0.0] * len(heads)
    member = np.zeros(V, bool)
    member[words] = True
    copy_ref = copy_expectation(attn, sample, member, sample.p) if use_copy else None

    copy_cls = None  # [H, K] per-class copy corrections (joint fit only)
    patterns: list = []  # shared weighted token sets (joint fit with `shared` only)

    def rewrite():
        write_bigram_files(fs, bd, counts)
        write_head_files(fs, heads, draft.outs, bd.class_names, counts)
        if use_copy:
            write_copy_file(fs, heads, words, copy_w, copy_cls, bd.class_names)
        write_neuron_file(fs, heads, draft.neurons, bd.class_names, counts, bd.class_members, patterns)
        fs.write()
        return HandModel(load_rules(out_dir, vocab))

    # Moment-matching rounds. The features overlap (a position feeds several head_out rows, a neuron and
    # its bigram row), so a full step can overshoot: a round that raises the training KL is undone and
    # the step halved, which keeps the recorded KL monotone.
    hm = rewrite()
    best_kl = sample.kl(hm)
    draft.history.append({"stage": "heads + neurons drafted", "train_kl": best_kl})
    eta = 0.8
    for r in range(rounds):
        P_hand = sample.hand_p(hm)
        snap = snapshot()
        k = 0
        for hi, src, M, E_ref in masses:
            E_hand = M.T @ P_hand
            for j in range(len(src)):
                o = draft.outs[k]
                k += 1
                if len(o.support):
                    o.delta = o.delta + eta * _ratio_step(E_ref[j, o.support], E_hand[j, o.support], W[k - 1])
        for nd, (a, e_ref) in zip(draft.neurons, neuron_feats if draft.neurons else []):
            e_hand = a @ P_hand[:, nd.support]
            scale = max(float(np.percentile(a[a > 0], 99)) if (a > 0).any() else 1.0, 1e-6)  # GIS: step / feature size
            nd.delta = nd.delta + (eta / scale) * _ratio_step(e_ref, e_hand, float(a.sum()))
        if use_copy:  # one scalar per head; the feature's total per position is at most 1 (attention sums to 1)
            e_hand = copy_expectation(attn, sample, member, P_hand)
            for hi in range(len(heads)):
                copy_w[hi] += eta * float(_ratio_step(np.array([copy_ref[hi]]), np.array([e_hand[hi]]), 1.0)[0])
        for c in refit:
            idx = where[c]
            row = bd.token_rows[c]
            er = sample.p[idx][:, row.support].mean(0)
            eh = P_hand[idx][:, row.support].mean(0)
            row.delta = row.delta + 0.5 * eta * _ratio_step(er, eh, 1.0)
        hm = rewrite()
        kl = sample.kl(hm)
        if kl > best_kl:
            log(f"round {r}: train KL {kl:.4f} > {best_kl:.4f}: step undone, halved")
            restore(snap)
            eta /= 2
            hm = rewrite()
            continue
        best_kl = kl
        draft.history.append({"stage": f"moment matching round {r}", "train_kl": kl})
        log(f"round {r}: train KL {kl:.4f}")
    if joint_steps > 0:
        import torch

        from .jointfit import build_net, joint_fit, net_kl, read_back

        T = windows.shape[1]
        allw = sample_windows(oracle, train_corpus, joint_positions + held_positions, window=T,
                              max_chars=(joint_positions + held_positions) * 8)
        n_held = max(2, min(held_positions // T, len(allw) // 4))
        held, train_w = allw[-n_held:], allw[:-n_held]
        net = build_net(bd, heads, draft.outs, words if use_copy else np.zeros(0, np.int64), copy_w, V,
                        query=n_query > 0, neurons=draft.neurons, neuron_classes=neuron_classes, shared=shared)
        held_sample = TrainSample(oracle, held)
        ref_held = torch.from_numpy(held_sample.logp.reshape(*held.shape, V))
        anchors = None
        if faithful > 0:
            from .anchors import anchor_targets
            from .common import typical_ln_scale

            anchors = anchor_targets(oracle, windows, heads, draft.outs, draft.neurons,
                                     neuron_var if draft.neurons else np.zeros(0),
                                     ln_scale if draft.neurons else typical_ln_scale(oracle, windows), bd=bd)
            log(f"faithful fit: anchors read off the reference on {windows.size:,} training positions, λ = {faithful:g}")
        res = joint_fit(oracle, net, train_w, held, ref_held, joint_steps, lr=joint_lr, n_query=n_query,
                         cuts=prune_cuts, window=prune_window, log=log, anchors=anchors, lam=faithful)
        qs, copy_cls, patterns[:] = read_back(net, bd, heads, draft.outs, copy_w, neurons=draft.neurons)
        for h, qq in zip(heads, qs):
            h.query = qq
        hm = rewrite()
        engine_kl = held_sample.kl(hm)
        torch_kl = net_kl(net, held, ref_held)
        best_kl = sample.kl(hm)
        draft.history.append({"stage": "joint fit", "train_kl": best_kl, "held_kl": engine_kl,
                              "held_kl_torch": torch_kl, "held_kl_start": res["held_kl_start"],
                              "steps": joint_steps}
                             | ({"faithful": faithful, "held_anchors_start": res["held_anchors_start"],
                                 "held_anchors": res["held_anchors"]} if "held_anchors" in res else {}))
        if "held_anchors" in res:
            log(f"faithful fit: held-out anchor terms {res['held_anchors_start']} -> {res['held_anchors']}")
        log(f"joint fit: held-out KL {engine_kl:.4f} by the engine from the written files, {torch_kl:.4f} by the "
            f"torch model (numbers rounded to 3 decimals when written); training-sample KL {best_kl:.4f}")
    rules = hm.rules
    summary.update(rules=len(rules.rule_ids), numbers=int(np.sum(rules.rule_numbers)), history=draft.history,
                   heads=[{"head": h.ref_head, "kind": h.kind, "attention_kl": h.fit_kl} for h in heads],
                   neurons=[nd.neuron for nd in draft.neurons],
                   seconds=round(time.perf_counter() - t0, 1))
    return summary
