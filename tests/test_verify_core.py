"""verify/: reference cache, baselines, ledger metrics, CLI. Uses a tiny random reference (V=300)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_stories, make_tiny_checkpoint, require, write_corpus
from handmodel.errors import UserError
from verify.ledger import core as L
from verify.ledger import data as D

PRIOR = """group = "prior"
[[prior]]
id = "common"
doc = "frequent tokens"
next = { "." = 2.0, " the" = 1.5, " a" = 1.0 }
"""
BIGRAMS = """group = "bigrams"
[[bigram]]
id = "after_dot"
doc = "a story ends or goes on after a full stop"
rows = { "." = { "<|endoftext|>" = 1.0, " " = 0.5 } }
[[bigram]]
id = "the_noun"
doc = "nouns after the"
now = " the"
next = { " happy" = 1.0, " b" = 1.0 }
"""


def write_rules(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


@pytest.fixture
def rules_dir(tmp_path):
    return write_rules(tmp_path / "rules", {"10_prior.toml": PRIOR, "20_bigrams.toml": BIGRAMS})


def run(ckpt, rules, corpus, train, **kw):
    from verify.ledger.evaluate import evaluate

    return evaluate(ckpt, rules, corpus, 4, 0, train, log=lambda m: None, **kw)


# -- metrics -------------------------------------------------------------------------------------
def test_kl_rows_matches_direct_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 11)) * 3
    b = rng.normal(size=(7, 11))
    la = a - np.log(np.exp(a).sum(1, keepdims=True))
    lb = b - np.log(np.exp(b).sum(1, keepdims=True))
    direct = np.array([sum(np.exp(la[i, v]) * (la[i, v] - lb[i, v]) for v in range(11)) for i in range(7)])
    np.testing.assert_allclose(D.kl_rows(la, lb), direct, rtol=1e-5, atol=1e-6)
    assert np.all(D.kl_rows(la, la) < 1e-6)
    # extreme but finite log-probs never give NaN/inf (log space, no log of a softmax)
    la[0, :] = -80.0
    la[0, 0] = 0.0
    assert np.all(np.isfinite(D.kl_rows(la, lb)))


def test_bootstrap_ci_brackets_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    offsets = np.array([0, 5, 9, 20, 22, 30])
    kl = rng.random(30)
    w = L.boot_weights(5)
    m, lo, hi = L.mean_ci(kl, offsets, w)
    assert lo <= m <= hi and m == pytest.approx(kl.mean())
    assert L.mean_ci(kl, offsets, L.boot_weights(5)) == (m, lo, hi)
    assert L.mean_ci(np.full(30, 0.25), offsets, w)[1:] == pytest.approx((0.25, 0.25))


# -- cache -----------------------------------------------------------------------------------------
def test_checkpoint_hash_matches_reference(tiny_world):
    from reference.checkpoint import checkpoint_hash

    ckpt, _, _ = tiny_world
    assert D.checkpoint_info(ckpt).hash == checkpoint_hash(ckpt)


def test_cache_contents_and_invalidation(tiny_world, tmp_path):
    from reference.oracle import Oracle

    ckpt_dir, evalf, _ = tiny_world
    ck = D.checkpoint_info(ckpt_dir)
    spec = D.EvalSpec(corpus=evalf)
    a = D.get_ref_cache(ck, spec, log=lambda m: None)
    assert a.built and a.logp.dtype == np.float16 and isinstance(a.logp, np.memmap)
    # writable (a copy-on-write map): the hand model's numba kernels then see the same argument types as for
    # in-memory log-probs; a read-only array is another signature, compiled all over again (a minute or more)
    assert a.logp.flags.writeable
    o = Oracle.load(ckpt_dir)
    lp = np.concatenate(o.log_probs(a.seqs))
    np.testing.assert_allclose(a.logp.astype(np.float32), lp, atol=0.02)
    assert np.abs(a.logp.astype(np.float32) - lp).max() <= np.abs(lp).max() * 2 ** -10
    hn = a.has_next
    np.testing.assert_allclose(a.ce[hn], -lp[np.nonzero(hn)[0], a.next_tokens[hn]], rtol=1e-5)
    assert np.all(np.isnan(a.ce[~hn]))
    np.testing.assert_allclose(a.ent, -(np.exp(lp) * lp).sum(1), rtol=1e-4, atol=1e-5)
    assert a.meta["float16_precision"]["kl_err_vs_tempered"] < 1e-3
    # warm: same entry, not rebuilt
    assert not D.get_ref_cache(ck, spec, log=lambda m: None).built
    # the same file spelled another way (relative, absolute, a copy elsewhere): the same entry
    copy = tmp_path / "elsewhere" / evalf.name
    copy.parent.mkdir()
    shutil.copyfile(evalf, copy)
    for other_spelling in (Path(os.path.relpath(evalf)), evalf.resolve(), copy):
        again = D.get_ref_cache(ck, D.EvalSpec(corpus=other_spelling), log=lambda m: None)
        assert not again.built and again.meta["eval"]["path"] == str(other_spelling)
    # text changes -> new entry
    ev2 = write_corpus(tmp_path / "eval2.txt", make_stories(12, 2)[:-1])
    assert D.get_ref_cache(ck, D.EvalSpec(corpus=ev2), log=lambda m: None).built
    # checkpoint (weights) change -> new entry
    other = make_tiny_checkpoint(tmp_path / "ck2", seed=1)
    assert D.get_ref_cache(D.checkpoint_info(other), spec, log=lambda m: None).built
    # tokenizer change (same weights) -> new entry
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["normalizer"] = None if tj.get("normalizer") else {"type": "NFC"}
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UserError, match="not the tokenizer this model was trained with"):
        D.checkpoint_info(other)  # the card records the tokenizer it was saved with
    card = json.loads((other / "card.json").read_text())
    card["tokenizer_sha256"] = hashlib.sha256((other / "tokenizer.json").read_bytes()).hexdigest()
    (other / "card.json").write_text(json.dumps(card))
    ck3 = D.checkpoint_info(other)
    assert D.cache_key(ck3, spec.identity()) != D.cache_key(D.checkpoint_info(ckpt_dir), spec.identity())
    assert D.get_ref_cache(ck3, spec, log=lambda m: None).built


def test_long_stories_are_split_into_context_chunks():
    pieces, n_split = D.chunk([np.arange(5), np.arange(130)], 48)
    assert n_split == 1 and [len(p) for p in pieces] == [5, 48, 48, 34]
    np.testing.assert_array_equal(np.concatenate(pieces[1:]), np.arange(130))


# -- ledger against known answers ----------------------------------------------------------------
def test_ledger_numbers_equal_direct_computation(tiny_world, rules_dir):
    from handmodel import HandModel, load_rules

    ckpt, evalf, train = tiny_world
    res = run(ckpt, rules_dir, evalf, train)
    ref, hm, rules, vocab, last = res.ref, res.hand, res.rules, res.vocab, res.last
    assert [r["name"] for r in res.ledger] == ["(no rules)", "+ prior", "+ bigrams"]
    assert [r["rules"] for r in res.ledger] == [0, 1, 3]
    assert [r["numbers"] for r in res.ledger] == [0, 3, 7]
    lp16 = np.asarray(ref.logp, np.float32)
    hn = ref.has_next
    kl_uni = res.baselines[1]["kl"]
    for row, mask in zip(res.ledger, ([False] * 3, [True, False, False], [True] * 3)):
        hand = np.concatenate(HandModel(load_rules(rules_dir, vocab)).log_probs_batch(ref.seqs, np.array(mask)))
        p = np.exp(lp16)
        p /= p.sum(1, keepdims=True)
        kl = (p * (np.log(p) - hand)).sum(1)
        assert np.all(np.isfinite(kl))
        assert row["kl"] == pytest.approx(kl.mean(), abs=1e-5)
        ce_hand = -hand[np.nonzero(hn)[0], ref.next_tokens[hn]].mean()
        assert row["ce_hand"] == pytest.approx(ce_hand, abs=1e-5)
        assert row["ce_ref"] == pytest.approx(float(ref.ce[hn].astype(np.float64).mean()), abs=1e-6)
        assert row["unexplained"] == pytest.approx(row["ce_hand"] - row["ce_ref"])
        assert row["explained"] == pytest.approx(1 - row["kl"] / kl_uni)
        assert row["top1"] == pytest.approx(np.mean(hand.argmax(1) == lp16.argmax(1)))
        assert row["kl_lo"] <= row["kl"] <= row["kl_hi"]
    # float16 storage vs float32 truth: small
    from reference.oracle import Oracle

    lp32 = np.concatenate(Oracle.load(ckpt).log_probs(ref.seqs))
    hand = np.concatenate(hm.log_probs_batch(ref.seqs))
    assert abs(D.kl_rows(lp32, hand).mean() - res.final["kl"]) < 1e-3


def test_empty_rule_set_is_the_uniform_baseline(tiny_world, rules_dir):
    ckpt, evalf, train = tiny_world
    res = run(ckpt, rules_dir, evalf, train)
    uniform = res.baselines[0]
    none = res.ledger[0]
    V = res.ref.logp.shape[1]
    assert uniform["name"] == "uniform"
    assert none["kl"] == pytest.approx(uniform["kl"], abs=1e-5)
    assert none["ce_hand"] == pytest.approx(np.log(V), abs=1e-5) == uniform["ce_hand"]


def test_baselines_against_direct_computation(tiny_world, rules_dir):
    """unigram/bigram = mean reference distribution over train positions (per current token)."""
    from reference.corpus import encode_stories, read_stories
    from reference.oracle import Oracle

    ckpt, evalf, train = tiny_world
    res = run(ckpt, rules_dir, evalf, train)
    ref = res.ref
    o = Oracle.load(ckpt)
    seqs, _ = D.chunk(encode_stories(o.tokenizer, read_stories(train)), o.cfg.n_ctx)
    p = np.exp(np.concatenate(o.log_probs(seqs)).astype(np.float64))
    toks = np.concatenate(seqs)
    uni = p.mean(0)
    V = len(uni)
    big = np.array([p[toks == c].mean(0) if (toks == c).any() else uni for c in range(V)])
    q = np.exp(np.asarray(ref.logp, np.float64))
    q /= q.sum(1, keepdims=True)
    kl_uni = (q * (np.log(q) - np.log(uni))).sum(1).mean()
    kl_big = (q * (np.log(q) - np.log(big[ref.tokens]))).sum(1).mean()
    kl_unif = (q * (np.log(q) + np.log(V))).sum(1).mean()
    b = {r["name"]: r for r in res.baselines}
    assert b["uniform"]["kl"] == pytest.approx(kl_unif, abs=1e-4)
    assert b["unigram"]["kl"] == pytest.approx(kl_uni, abs=1e-4)
    assert b["oracle bigram"]["kl"] == pytest.approx(kl_big, abs=1e-4)
    assert b["oracle bigram"]["kl"] < b["unigram"]["kl"] < b["uniform"]["kl"]
    assert b["unigram"]["explained"] == pytest.approx(0.0, abs=1e-6)


def test_hand_model_equal_to_reference_gives_zero_kl(tiny_world, tmp_path):
    """A reference that IS a planted bigram (its cache written from the hand model's own log-probs): KL ~ 0."""
    from handmodel import HandModel, load_rules
    from handmodel.vocab import load_vocab
    from reference.corpus import cache_dir

    ckpt_dir, evalf, train = tiny_world
    rules = write_rules(tmp_path / "r", {"10_prior.toml": PRIOR, "20_bigrams.toml": BIGRAMS})
    ck = D.checkpoint_info(ckpt_dir)
    spec = D.EvalSpec(corpus=evalf)
    ref = D.get_ref_cache(ck, spec, log=lambda m: None)
    hand = np.concatenate(HandModel(load_rules(rules, load_vocab(ckpt_dir / "tokenizer.json"))).log_probs_batch(ref.seqs))
    # plant: overwrite the cached reference with the hand model's distributions (a bigram-only "reference")
    d = cache_dir() / "ref" / D.cache_key(ck, spec.identity())
    lp = np.load(d / "logp16.npy", mmap_mode="r+")
    lp[:] = hand.astype(np.float16)
    lp.flush()
    hn = ref.has_next
    ce = np.full(len(hand), np.nan, np.float32)
    ce[hn] = -hand[np.nonzero(hn)[0], ref.next_tokens[hn]]
    np.save(d / "ce.npy", ce)
    from verify.ledger.integrity import record  # a deliberate plant re-records the files (else it reads as damage)

    meta = json.loads((d / "meta.json").read_text())
    meta["files"].update({f: record(d / f) for f in ("logp16.npy", "ce.npy")})
    (d / "meta.json").write_text(json.dumps(meta))
    res = run(ckpt_dir, rules, evalf, train)
    f = res.final
    assert f["kl"] < 2e-4 and f["kl_hi"] < 2e-4
    assert f["unexplained"] == pytest.approx(0.0, abs=1e-5)
    assert f["top1"] > 0.99
    assert res.ledger[0]["kl"] > 0.02  # rules off: far from it (100x the planted KL bound)


# -- ablation / worst ------------------------------------------------------------------------------
def test_ablation_and_worst(tiny_world, tmp_path):
    ckpt, evalf, train = tiny_world
    bad = BIGRAMS + '\n[[bigram]]\nid = "wrong"\ndoc = "deliberately wrong"\nnow = " the"\nnext = { "!" = 9.0 }\n'
    rules = write_rules(tmp_path / "r", {"10_prior.toml": PRIOR, "20_bigrams.toml": bad})
    res = run(ckpt, rules, evalf, train, ablate=True, worst=4)
    ab = res.ablation
    assert len(ab) == 4
    assert [a["delta"] for a in ab] == sorted([a["delta"] for a in ab], reverse=True)
    wrong = next(a for a in ab if a["rule"] == "wrong")
    assert wrong["hurts"] and wrong["delta"] < 0
    assert all(a["kl_without"] == pytest.approx(res.final["kl"] + a["delta"]) for a in ab)
    w = res.worst
    assert len(w) == 4 and w[0]["kl"] >= w[-1]["kl"]
    kl = res.last["kl"]
    assert w[0]["kl"] == pytest.approx(float(np.max(kl)))
    assert len(w[0]["ref_top5"]) == 5 and len(w[0]["hand_top5"]) == 5
    assert sum(e["p"] for e in w[0]["ref_top5"]) <= 1.0 + 1e-3
    assert res.gap_by_current[0]["total"] >= res.gap_by_current[-1]["total"]
    assert sum(g["total"] for g in L.gap_by(res.ref, kl, res.vocab, "current", k=10 ** 6)) == pytest.approx(float(np.sum(kl)))


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(tiny_world, rules_dir, tmp_path):
    ckpt, evalf, train = tiny_world
    short = write_corpus(tmp_path / "short.txt", ["Hi."])
    with pytest.raises(UserError, match="eval text too short: .* tokens"):
        run(ckpt, rules_dir, short, train)
    with pytest.raises(UserError, match="checkpoint folder not found"):
        run(tmp_path / "nope", rules_dir, evalf, train)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(UserError, match="missing model.safetensors"):
        run(half, rules_dir, evalf, train)
    other = write_rules(tmp_path / "other", {"a.toml": 'vocab = "4096:deadbeef"\n' + PRIOR})
    with pytest.raises(UserError, match="vocabulary 4096:deadbeef"):
        run(ckpt, other, evalf, train)
    with pytest.raises(UserError, match="rules folder not found"):
        run(ckpt, tmp_path / "norules", evalf, train)
    with pytest.raises(UserError, match="no such file"):
        run(ckpt, rules_dir, tmp_path / "missing.txt", train)


# -- CLI ---------------------------------------------------------------------------------------------
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "verify.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_json_fail_above_and_no_torch_when_warm(tiny_world, rules_dir, tmp_path):
    ckpt, evalf, train = tiny_world
    common = ["--checkpoint", ckpt, "--rules", rules_dir, "--corpus", evalf, "--train-corpus", train]
    cold = _cli("verify", *common, "--json-out", tmp_path / "out.json")
    assert cold.returncode == 0, cold.stderr
    assert "Ledger" in cold.stdout and "wall time" in cold.stdout
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["header"]["n_tokens"] > 64 and res["final"]["rules"] == 3
    # warm: JSON on stdout, and torch never imported
    code = ("import sys, runpy; sys.argv=['handmodel', *sys.argv[1:]]\n"
            "from verify.cli import main\nrc = main(sys.argv[1:])\n"
            "sys.stderr.write('TORCH=%s' % ('torch' in sys.modules))\nsys.exit(rc)")
    warm = subprocess.run([sys.executable, "-c", code, "verify", *map(str, common), "--json"], capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr
    assert "TORCH=False" in warm.stderr
    j = json.loads(warm.stdout)
    assert j["final"]["kl"] == pytest.approx(res["final"]["kl"]) and not j["header"]["cache_built"]
    gate = _cli("verify", *common, "--fail-above", 1e-9)
    assert gate.returncode == 1 and "FAIL" in gate.stdout
    assert _cli("verify", *common, "--fail-above", 1e9).returncode == 0
    bad = _cli("verify", *common[:2], "--rules", tmp_path / "nothing", *common[4:])
    assert bad.returncode == 2 and "rules folder not found" in bad.stderr and "Traceback" not in bad.stderr
    help_ = _cli("verify", "--help")
    for phrase in ("KL(p_ref ‖ p_hand)", "unexplained loss", "1 − KL_hand / KL_unigram", "oracle bigram", "float16"):
        assert phrase in help_.stdout


def test_sampled_eval_set_is_deterministic(tiny_world, rules_dir):
    ckpt, _, train = tiny_world
    from verify.ledger.evaluate import evaluate

    a = evaluate(ckpt, rules_dir, None, 3, 7, train, log=lambda m: None)
    ref = a.ref
    assert a.header["eval"] == {"kind": "sampled", "n": 3, "seed": 7, "max_len": D.SAMPLE_MAX_LEN}
    assert ref.built and len(ref.offsets) - 1 >= 3
    assert all(s[0] == 0 for s in ref.seqs)  # every sampled story starts after EOT (id 0 here)
    from reference.oracle import Oracle

    seqs = D.sample_sequences(Oracle.load(ckpt), 3, 7)
    np.testing.assert_array_equal(np.concatenate(seqs[:1]), ref.seqs[0][: len(seqs[0])])


@pytest.mark.shared
def test_real_text_from_shared_corpus(shared_corpus, rules_dir, tmp_path, tiny_world):
    """Real TinyStories text (copied to tmp at test time, never into the repo) runs end to end."""
    from reference.corpus import read_stories

    ckpt, _, _ = tiny_world
    ev = write_corpus(tmp_path / "valid_head.txt", read_stories(shared_corpus / "valid.txt")[:10])
    tr = write_corpus(tmp_path / "train_head.txt", read_stories(shared_corpus / "train.txt")[:40])
    res = run(ckpt, rules_dir, ev, tr, worst=3)
    assert res.header["n_tokens"] > 500 and np.isfinite(res.final["kl"])
    assert res.header["n_split"] > 0  # real stories are longer than this tiny model's context


def test_ledger_row_cache_recomputes_only_changed_rows(tiny_world, tmp_path):
    """Rows come back from the cache when their rules are unchanged; editing the last file changes only
    the rows that include it, and cached rows equal freshly computed ones."""
    ckpt, evalf, train = tiny_world
    rules = write_rules(tmp_path / "r", {"10_prior.toml": PRIOR, "20_bigrams.toml": BIGRAMS})
    first = run(ckpt, rules, evalf, train)
    ref, hm, compiled, _, _ = first.ref, first.hand, first.rules, first.vocab, first.last
    masks = [m for _, m in L.group_masks(compiled)]
    k1 = L.row_keys(compiled, masks, ref)
    assert all((ref.dir / "ledger" / f"{k}.npz").exists() for k in k1)
    (rules / "20_bigrams.toml").write_text(BIGRAMS.replace('" happy" = 1.0', '" happy" = 2.5'), encoding="utf-8")
    second = run(ckpt, rules, evalf, train)
    from handmodel import load_rules

    k2 = L.row_keys(load_rules(rules, compiled.vocab), masks, ref)
    assert k2[:2] == k1[:2] and k2[2] != k1[2]  # (no rules), + prior unchanged; + bigrams recomputed
    assert second.ledger[:2] == first.ledger[:2]
    assert second.ledger[2]["kl"] != first.ledger[2]["kl"]
    fresh, _ = L.run_ledger(second.hand, second.rules, ref, second.baselines[1]["kl"],
                            L.boot_weights(len(ref.offsets) - 1), cache=False)
    assert [r["kl"] for r in fresh] == pytest.approx([r["kl"] for r in second.ledger], abs=1e-12)


def test_reference_statistics_store_checks_what_it_reads(tmp_path, capsys):
    """verify/ledger/refstats.py: what it saved comes back as saved; a damaged or swapped file is reported,
    deleted and not used; each kind keeps its KEEP most recently used files."""
    from verify.ledger.refstats import KEEP, RefStatsStore

    store = RefStatsStore(tmp_path)
    a = {"S": np.linspace(0, 1, 7), "arg": np.arange(7, dtype=np.int64)}
    want = {"S": ((7,), "f8"), "arg": ((7,), "i8")}
    assert store.load("ref-x", want) is None  # nothing saved yet: no message
    store.save("ref-x", a)
    got = store.load("ref-x", want)
    assert set(got) == {"S", "arg"} and all(np.array_equal(got[k], a[k]) for k in a)
    assert capsys.readouterr().err == ""
    f = tmp_path / "stats" / "ref-x.npz"
    shutil.copy(f, tmp_path / "stats" / "ref-y.npz")  # a file under another name
    assert store.load("ref-y", want) is None and "holds 'ref-x'" in capsys.readouterr().err
    assert not (tmp_path / "stats" / "ref-y.npz").exists()
    with np.load(f, allow_pickle=False) as z:  # other arrays under the right name and the old checksum
        np.savez(f, name=z["name"], crc=z["crc"], S=a["S"] + 1.0, arg=a["arg"])
    assert store.load("ref-x", want) is None
    assert "checksum mismatch" in capsys.readouterr().err and not f.exists()
    store.save("ref-x", a)
    data = bytearray(f.read_bytes())
    i = data.index(a["S"][3].tobytes())  # a flipped byte: the zip's own CRC catches it
    data[i] ^= 0x01
    f.write_bytes(bytes(data))
    assert store.load("ref-x", want) is None and "unreadable" in capsys.readouterr().err
    f.write_bytes(b"not a zip")
    assert store.load("ref-x", want) is None and "unreadable" in capsys.readouterr().err
    store.save("ref-x", a)
    for k in range(KEEP):
        store.save(f"atoms-{k}", {"R": np.full((2, 3), float(k))})
        os.utime(tmp_path / "stats" / f"atoms-{k}.npz", ns=((k + 1) * 10**9, (k + 1) * 10**9))
    store.load("atoms-0", {"R": ((2, 3), "f8")})  # the oldest, used: now the most recent
    store.save("atoms-new", {"R": np.zeros((2, 3))})
    left = sorted(p.stem for p in (tmp_path / "stats").glob("atoms-*.npz"))
    assert len(left) == KEEP and "atoms-0" in left and "atoms-1" not in left and "atoms-new" in left, left
    assert (tmp_path / "stats" / "ref-x.npz").exists()  # another kind: not evicted


def test_a_full_pass_keeps_reference_statistics_next_to_the_reference_cache(tiny_world, tmp_path, capsys):
    """The ledger's whole-eval-set passes save the reference statistics in the reference entry's stats/ folder;
    a new process reads them there, and a damaged one is computed again with the same ledger."""
    from handmodel import engine

    ckpt, evalf, train = tiny_world
    rules = write_rules(tmp_path / "r", {"10_prior.toml": PRIOR, "20_bigrams.toml": BIGRAMS})
    first = run(ckpt, rules, evalf, train)
    stats = first.ref.dir / "stats"
    shutil.rmtree(stats, ignore_errors=True)  # the eval set's entry is shared with other tests: start from nothing
    shutil.rmtree(first.ref.dir / "ledger")
    engine._REF_STATS.clear()
    assert run(ckpt, rules, evalf, train).ledger == first.ledger
    kinds = sorted(p.name.split("-")[0] for p in stats.glob("*.npz"))
    assert kinds.count("ref") == 1 and set(kinds) == {"base", "ref"}, kinds  # no classes, so no atom masses
    for p in stats.glob("ref-*.npz"):  # other statistics under the right name and checksum
        with np.load(p, allow_pickle=False) as z:
            np.savez(p, **{k: z[k] for k in z.files if k != "S"}, S=z["S"] * 0.5)
    shutil.rmtree(first.ref.dir / "ledger")  # the rows must be computed again
    engine._REF_STATS.clear()  # as in a new process
    capsys.readouterr()
    second = run(ckpt, rules, evalf, train)
    assert "was damaged" in capsys.readouterr().err
    assert [r["kl"] for r in second.ledger] == [r["kl"] for r in first.ledger]
    assert sorted(p.name.split("-")[0] for p in stats.glob("*.npz")) == kinds
