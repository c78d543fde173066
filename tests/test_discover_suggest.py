"""`handmodel suggest` on a tiny reference trained on text with planted regularities
(tests/planted.py): it must find the planted bigrams and the planted skip-trigram again."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from handmodel.errors import UserError
from verify.discover.suggest_options import SuggestOptions


@pytest.fixture(scope="session")
def drafted(planted, tmp_path_factory):
    from reference.oracle import Oracle
    from verify.discover.suggest import suggest

    ckpt, train = planted
    out = tmp_path_factory.mktemp("suggest") / "rules"
    o = Oracle.load(ckpt)
    summary = suggest(o, out, train, SuggestOptions(budget=600, classes=6, class_k=8, sources=20, k_out=6, scores=30,
                      positions=2048, rounds=3, min_count=5, att_positions=1024, att_steps=60, neurons=4), log=lambda m: None)
    return o, out, summary


def test_draft_writes_the_options_it_ran_with(drafted):
    """OUT/suggest.conf holds the options of the run (so `suggest --config` can redraft it); load_rules skips it."""
    from verify.discover.suggest_options import OPTIONS_FILE

    o, out, s = drafted
    assert s["options"] == str(out / OPTIONS_FILE)
    assert SuggestOptions.load(out / OPTIONS_FILE) == SuggestOptions(
        budget=600, classes=6, class_k=8, sources=20, k_out=6, scores=30, positions=2048, rounds=3, min_count=5,
        att_positions=1024, att_steps=60, neurons=4)


def test_draft_recovers_planted_bigrams(drafted):
    from handmodel import HandModel, load_rules
    from planted import B, BIGRAMS

    o, out, _ = drafted
    rules = load_rules(out, o.vocab)
    hm = HandModel(rules)
    bigram_only = np.array([k in ("prior", "bigram") for k in rules.rule_kinds])
    index = {s: i for i, s in enumerate(o.vocab)}
    for word, succ in BIGRAMS.items():
        if word not in index or word == B:  # after B the planted skip-trigram mixes C into the bigram statistics
            continue
        lp = hm.log_probs(np.array([index[word]], dtype=np.int32), mask=bigram_only)[0]
        best = succ[0][0]
        assert o.vocab[int(lp.argmax())] == best, f"after {word!r} the draft prefers {o.vocab[int(lp.argmax())]!r}, planted {best!r}"


def test_draft_recovers_planted_skip_trigram(drafted):
    """Some head attends to A (' zap' / 'zap') and its [[head_out]] row for A boosts C (' moon') most."""
    import tomllib

    from planted import A, A_TOKEN, C

    o, out, _ = drafted
    found = []
    for f in sorted(out.glob("4*_head*.toml")):
        data = tomllib.loads(f.read_text())
        for r in data.get("head_out", []):
            if r["src"] in (A, A_TOKEN):
                top = max(r["next"], key=r["next"].get)
                found.append((r["id"], top))
    assert found, "no [[head_out]] rule for the planted source token"
    assert any(top == C for _, top in found), found


def test_draft_is_readable_and_fit_lowers_train_kl(drafted):
    from handmodel import load_rules

    o, out, s = drafted
    rules = load_rules(out, o.vocab)
    assert all(d.strip() for d in rules.rule_docs)
    import tomllib

    for f in out.glob("*.toml"):  # a draft states no claims: check-rules reports "no claim" until a person does
        data = tomllib.loads(f.read_text())
        for kind, tables in data.items():
            if kind in ("class", "group", "vocab"):
                continue
            assert all(t["check"]["expect"] == "none" for t in tables), f"{f.name}: {kind}"

    assert len(set(rules.rule_ids)) == len(rules.rule_ids) == s["rules"]
    assert int(np.sum(rules.rule_numbers)) == s["numbers"]
    text = (out / "40_head0.toml").read_text()
    assert "# fitted to the reference head's attention" in text and "# drafted by `handmodel suggest`" in text
    classes = rules.sets.class_names[1:]
    assert classes and all(c.startswith("like_") for c in classes) and not any("cluster" in c for c in classes)
    assert [k for k in rules.rule_kinds if k == "neuron"] == ["neuron"] * 4
    assert all(f"neuron.{n}" in rules.rule_ids for n in s["neurons"])
    kl = [h["train_kl"] for h in s["history"]]
    assert kl[-1] < kl[0] * 0.95, kl  # heads explain part of what the bigram draft leaves
    assert all(b <= a + 1e-3 for a, b in zip(kl[1:], kl[2:])), kl


def test_project_is_the_kl_optimal_sparse_row():
    """bigrams.project puts exactly the target mass on its support and keeps the base shape elsewhere."""
    from verify.discover.bigrams import log_softmax, project

    rng = np.random.default_rng(0)
    base = rng.normal(size=50)
    target = np.exp(log_softmax(rng.normal(size=50) * 2))
    row = project(target, base, 7)
    z = base.copy()
    z[row.support] += row.delta
    q = np.exp(log_softmax(z))
    np.testing.assert_allclose(q[row.support], target[row.support], rtol=1e-9)
    off = np.setdiff1d(np.arange(50), row.support)
    np.testing.assert_allclose(q[off] / q[off].sum(), np.exp(log_softmax(base[off])), rtol=1e-9)
    kl = lambda qq: float(np.sum(target * (np.log(target) - np.log(qq))))  # noqa: E731
    for _ in range(5):  # no other 7-sparse change on that support does better
        z2 = z.copy()
        z2[row.support] += rng.normal(size=7) * 0.1
        assert kl(q) <= kl(np.exp(log_softmax(z2))) + 1e-12


def test_bad_input(planted, tmp_path):
    from reference.oracle import Oracle
    from verify.discover.suggest import suggest

    ckpt, train = planted
    full = tmp_path / "full"
    full.mkdir()
    (full / "a.toml").write_text("# mine\n")
    with pytest.raises(UserError, match="already holds rule files"):
        suggest(Oracle.load(ckpt), full, train, log=lambda m: None)
    assert (full / "a.toml").read_text() == "# mine\n"
    r = subprocess.run([sys.executable, "-m", "verify.cli", "suggest", "--out", str(tmp_path / "x"), "--checkpoint", str(ckpt),
                        "--train-corpus", str(train.with_name("valid.txt"))], capture_output=True, text=True)
    assert r.returncode == 2 and "valid.txt is for reporting" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_target_spends_numbers_where_the_given_rules_leave_kl(drafted, planted, tmp_path):
    """--target: token rows go to the tokens after which the target rules leave the most KL."""
    import shutil

    from handmodel import HandModel, load_rules
    from verify.discover.common import sample_windows
    from verify.discover.suggest import suggest

    o, out, _ = drafted
    ckpt, train = planted
    prior_only = tmp_path / "prior_only"
    prior_only.mkdir()
    shutil.copy(out / "00_prior.toml", prior_only / "00_prior.toml")
    w = sample_windows(o, train, 2048, window=min(256, o.cfg.n_ctx), max_chars=2048 * 8)
    seqs = [x.astype(np.int32) for x in w]
    kl = HandModel(load_rules(prior_only, o.vocab)).stream_metrics(seqs, np.concatenate(o.log_probs(list(w))))["kl"]
    left = np.bincount(w.ravel(), weights=kl, minlength=len(o.vocab))
    worst = int(np.argmax(left))
    s = suggest(o, tmp_path / "t", train, SuggestOptions(budget=40, classes=0, heads=False, positions=2048, min_count=5,
                target=str(prior_only)), log=lambda m: None)
    assert s["rules"] >= 2
    rules = load_rules(tmp_path / "t", o.vocab)
    rows = {r.rows[0][0] for r in rules.rules if r.kind == "bigram" and len(r.rows) == 1}
    rows |= {now for r in rules.rules if r.kind == "bigram" for now, _ in r.rows}
    assert worst in rows, f"no row for {o.vocab[worst]!r}, where the prior alone leaves the most KL"


def test_copy_rules_are_drafted_as_valid_rule_files(tmp_path):
    """story_words keeps rare whole words; the copying file loads and its rules copy the attended word."""
    from handmodel import HandModel, load_rules
    from verify.discover.draft_files import FileSet
    from verify.discover.heads import HeadDraft
    from verify.discover.suggest import story_words, write_copy_file

    vocab = ["<|endoftext|>", " the", ".", " Lily", " ball", "ing", " a"]
    counts = np.array([50, 900, 800, 40, 30, 60, 700])
    words = story_words(vocab, counts, min_count=20, skip_top=3)
    assert [vocab[w] for w in words] == [" Lily", " ball"]
    h = HeadDraft(0, np.zeros(2), 0.0, np.zeros(0, np.int64), np.zeros(0), 0.0, 0.0, 0.0, 0.0, "content")
    fs = FileSet(tmp_path, vocab, "test")
    write_copy_file(fs, [h], words, [2.0])
    fs.add(fs.start("40_head0.toml", "head 0", "x") or "40_head0.toml",
           '[[head]]\nid = "head0"\ndoc = "uniform attention"\n')
    fs.write()
    rules = load_rules(tmp_path, vocab)
    lp = HandModel(rules).log_probs(np.array([0, 3, 1], dtype=np.int32))
    z = np.zeros(len(vocab))
    z[3] = 2.0 / 3  # at t=2 the head spreads 1/3 on each position; ' Lily' (a story word) is at one of them
    np.testing.assert_allclose(lp[2], z - np.log(np.exp(z).sum()), atol=1e-5)


def test_attention_features_read_one_attention_computation():
    """head_attention is computed once per window; the head_out masses and the copy feature read it: masses over
    every token sum to 1 per position, and the copy feature equals its definition summed by hand."""
    from types import SimpleNamespace

    from verify.discover.heads import HeadDraft
    from verify.discover.suggest import attention_masses, copy_expectation, head_attention

    rng = np.random.default_rng(0)
    V, T = 9, 6
    windows = rng.integers(0, V, size=(3, T))
    sample = SimpleNamespace(windows=windows)
    h = HeadDraft(0, np.array([1.0, 0.5]), -0.3, np.array([2, 5]), np.array([1.5, -1.0]), 0, 0, 0, 0, "content")
    attn = head_attention(sample, h, V)
    M = attention_masses(sample, attn, V, np.arange(V))
    np.testing.assert_allclose(M.sum(1), 1.0, atol=1e-6)
    P = rng.dirichlet(np.ones(V), size=3 * T).astype(np.float32)
    member = np.zeros(V, bool)
    member[[2, 3, 7]] = True
    want = sum(attn[b][t, s] * P[b * T + t, windows[b, s]]
               for b in range(3) for t in range(T) for s in range(T) if member[windows[b, s]])
    assert copy_expectation([attn], sample, member, P)[0] == pytest.approx(want, rel=1e-5)


def test_joint_fit_writes_exactly_what_it_fitted_and_lowers_held_out_kl(planted, tmp_path):
    """--joint-steps: the torch model (jointfit.py) and the engine reading the written files give the same
    held-out KL; the fit does not raise it; query-dependent scores and per-class copy rules are valid rules."""
    import tomllib

    from handmodel import load_rules
    from reference.oracle import Oracle
    from verify.discover.suggest import suggest

    ckpt, train = planted
    o = Oracle.load(ckpt)
    out = tmp_path / "joint"
    s = suggest(o, out, train, SuggestOptions(budget=600, classes=6, class_k=8, sources=20, k_out=6, scores=30, positions=2048,
                rounds=1, min_count=5, att_positions=1024, att_steps=30, neurons=3, joint_steps=30,
                joint_positions=4096, held_positions=1024, query_scores=8, joint_lr=0.05, neuron_classes=2), log=lambda m: None)
    joint = s["history"][-1]
    assert joint["stage"] == "joint fit"
    assert abs(joint["held_kl"] - joint["held_kl_torch"]) < 2e-3, joint  # same semantics, 3-decimal rounding
    rules = load_rules(out, o.vocab)
    assert int(np.sum(rules.rule_numbers)) == s["numbers"]
    heads = [tomllib.loads(f.read_text())["head"][0] for f in sorted(out.glob("4*_head*.toml"))]
    query = [e for h in heads for e in h["score"] if "now" in e]
    assert query and all(e["now"].startswith("@like_") and e["src"].startswith("@like_") for e in query)
    assert sum(1 for h in heads for e in h["score"] if "now" in e) <= 8 * len(heads)
    assert [k for k in rules.rule_kinds if k == "neuron"] == ["neuron"] * 3  # fitted jointly, thresholds included
    # class-level neuron entries (--neuron-classes 2): at most 2 per kind and neuron, written as "@class" keys
    neurons = tomllib.loads((out / "50_neurons.toml").read_text())["neuron"]
    ncls = [sum(k.startswith("@") for k in n.get(key, {})) for n in neurons for key in ("now", "next")]
    natt = [sum(k.startswith("@") for h in n.get("attend", {}).values() for k in h) for n in neurons]
    assert max(ncls + natt) <= 2 and sum(ncls) + sum(natt) > 0, (ncls, natt)
    # the step kept is the best on held-out windows (the starting point included)
    assert joint["held_kl"] < joint["held_kl_start"], joint


def test_joint_fit_bad_input(planted, tmp_path):
    from reference.oracle import Oracle
    from verify.discover.suggest import suggest

    ckpt, train = planted
    with pytest.raises(UserError, match="must be >= 0"):
        suggest(Oracle.load(ckpt), tmp_path / "j", train, SuggestOptions(joint_steps=-1), log=lambda m: None)
    with pytest.raises(UserError, match=r"neuron-classes and the --shared-\* options must be >= 0"):
        suggest(Oracle.load(ckpt), tmp_path / "j", train, SuggestOptions(neuron_classes=-1), log=lambda m: None)
    assert not (tmp_path / "j").exists()


def test_docs_name_the_consequential_entries_first():
    """Draft docs rank a row's entries by |w| × √count: a huge number on a token that never occurs is not
    what the row is about."""
    from verify.discover.draft_files import ranked

    support = np.array([0, 1, 2, 3])
    delta = np.array([6.0, 1.5, -2.0, 0.5])
    counts = np.array([0, 10_000, 50, 400])
    assert ranked(support, delta, counts).tolist() == [1, 3, 0]  # 150, 10, 6: the rare token last
    assert ranked(support, delta, counts, -1.0).tolist() == [2]
    assert ranked(support, delta, None).tolist() == [0, 1, 3]  # no counts: by weight


def test_neuron_doc_describes_the_fitted_entries_tokens_and_classes():
    from verify.discover.suggest import neuron_doc

    doc = neuron_doc(7, [("' and'", 1.0, 5000.0), ("@like_period", 0.5, 90000.0), ("' zz'", 3.0, 1.0), ("' x'", -2.0, 10.0)],
                     [(3, "@like_period", -1.5, 90000.0), (1, "' No'", 2.0, 50.0)],
                     [("'.'", -0.4, 80000.0), ("' the'", 0.3, 90000.0), ("' umb'", 0.9, 3.0)])
    assert doc == ("Started from reference neuron 7: fires after @like_period, ' and', ' zz'; more when head 1 attends to "
                   "' No'; less when head 3 attends to @like_period; pushes ' the', ' umb' up and '.' down.")


def test_prune_schedule_falls_cubically_to_the_kept_size():
    from verify.discover.jointfit import prune_schedule

    plan = prune_schedule(1100, 4, 4096, 800)
    steps, kept = [s for s, _ in plan], [k for _, k in plan]
    assert steps == sorted(steps) and len(set(steps)) == 4 and 1 <= steps[0] and steps[-1] < 1100 // 2
    assert kept == sorted(kept, reverse=True) and kept[-1] == 800 and kept[0] < 4096
    assert kept[0] - kept[1] > kept[1] - kept[2] > kept[2] - kept[3]  # big cuts first, gentle at the end
    assert prune_schedule(1100, 1, 64, 6) == [(366, 6)]  # one cut at a third (drafts 1-5)
    late = prune_schedule(1000, 4, 4096, 800, window=(0.3, 0.65))
    assert [s for s, _ in late] == [300, 417, 533, 650] and [k for _, k in late] == [k for _, k in plan]
    assert prune_schedule(1000, 1, 64, 6, window=(0.3, 0.65)) == [(300, 6)]
    with pytest.raises(ValueError, match="0 < start <= end < 1"):
        prune_schedule(1000, 4, 64, 6, window=(0.7, 0.3))


def test_suggest_cli_rejects_a_malformed_prune_window():
    from handmodel.errors import UserError
    from verify.cli.discover import _fraction_pair

    assert _fraction_pair("0.3:0.65", "--prune-window") == (0.3, 0.65) and _fraction_pair(None, "x") is None
    with pytest.raises(UserError, match="START:END"):
        _fraction_pair("0.3-0.65", "--prune-window")


def test_neuron_class_cuts_never_bring_back_a_removed_entry():
    """Adam's momentum keeps moving masked entries; a later cut must rank only what survived."""
    import torch
    from types import SimpleNamespace

    from verify.discover.jointfit import _cut_neuron_classes

    K, H, n = 6, 2, 3
    g = torch.Generator().manual_seed(0)
    net = SimpleNamespace(K=K, H=H, lab=torch.arange(K), nc_now=torch.randn(K, n, generator=g),
                          nc_att=torch.randn(H, K, n, generator=g), nc_out=torch.randn(n, K, generator=g),
                          nc_now_m=torch.ones(K, n), nc_att_m=torch.ones(H, K, n), nc_out_m=torch.ones(n, K))
    train = np.tile(np.arange(K), (4, 2))
    _cut_neuron_classes(net, train, 3)
    first = [m.clone() for m in (net.nc_now_m, net.nc_att_m, net.nc_out_m)]
    assert float(net.nc_now_m.sum()) == 3 * n and float(net.nc_out_m.sum()) == 3 * n
    for p in (net.nc_now, net.nc_att, net.nc_out):  # momentum: removed entries grow large
        p += 100.0 * torch.sign(p) * (p == 0)
        p[p == 0] = 100.0
    _cut_neuron_classes(net, train, 2)
    for before, after in zip(first, (net.nc_now_m, net.nc_att_m, net.nc_out_m)):
        assert bool((after <= before).all())
    assert float(net.nc_now_m.sum()) == 2 * n


def _pattern_net(seed: int, V: int = 12, H: int = 2, n: int = 5, mo: int = 3, mr: int = 2):
    """The shared-pattern parameters and masks of a joint-fit net (what _cut_shared reads), random."""
    import torch
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    net = SimpleNamespace(V=V, H=H, sh_out=mo, sh_read=mr, so=torch.randn(mo, V, generator=g),
                          so_c=torch.randn(n, mo, generator=g), sr=torch.randn(H, mr, V, generator=g),
                          sr_c=torch.randn(H, mr, n, generator=g))
    for name in ("so", "so_c", "sr", "sr_c"):
        setattr(net, name + "_m", torch.ones_like(getattr(net, name)))
    return net


def test_shared_pattern_cuts_keep_the_sizes_and_never_bring_back_a_removed_entry():
    from verify.discover.jointfit import _cut_shared

    V, net = 12, _pattern_net(seed=1)
    train = np.tile(np.arange(V), (3, 2))
    _cut_shared(net, train, 6, 6, 2)
    assert (net.so_m.sum(1) == 6).all() and (net.sr_m.sum(2) == 6).all()
    assert (net.so_c_m.sum(1) == 2).all() and (net.sr_c_m.sum((0, 1)) == 2).all()  # read refs: over all heads
    assert float((net.so * (1 - net.so_m)).abs().sum()) == 0.0
    first = [m.clone() for m in (net.so_m, net.so_c_m, net.sr_m, net.sr_c_m)]
    for p in (net.so, net.so_c, net.sr, net.sr_c):  # momentum: removed entries grow large
        p[p == 0] = 100.0
    _cut_shared(net, train, 4, 4, 1)
    for before, after in zip(first, (net.so_m, net.so_c_m, net.sr_m, net.sr_c_m)):
        assert bool((after <= before).all())
    assert (net.so_m.sum(1) == 4).all() and (net.sr_c_m.sum((0, 1)) == 1).all()


def test_output_and_read_patterns_can_keep_different_sizes():
    """--shared-size OUT:READ: one cut keeps OUT tokens per output pattern and READ per read pattern."""
    from handmodel.errors import UserError
    from verify.cli.discover import _size_pair
    from verify.discover.jointfit import _cut_shared, pattern_sizes

    assert pattern_sizes(_size_pair("500", "--shared-size")) == (500, 500)
    assert pattern_sizes(_size_pair("1200:600", "--shared-size")) == (1200, 600)
    for bad in ("12:x", "1:2:3", ""):
        with pytest.raises(UserError, match="OUT:READ"):
            _size_pair(bad, "--shared-size")
    assert pattern_sizes(7) == (7, 7) and pattern_sizes((9, 4)) == (9, 4)
    V, net = 12, _pattern_net(seed=2)
    _cut_shared(net, np.tile(np.arange(V), (3, 2)), 8, 3, 2)
    assert (net.so_m.sum(1) == 8).all() and (net.sr_m.sum(2) == 3).all()


def test_shared_patterns_change_the_net_as_documented():
    """An output pattern adds act · x · pattern to the logits; a read pattern adds x · Σ_s a(s) pattern[seq_s]
    to the neuron's input (checked against a direct computation on the built net)."""
    import torch

    from verify.discover.bigrams import BigramDraft
    from verify.discover.jointfit import build_net
    from verify.discover.neurons import NeuronDraft
    from verify.discover.heads import HeadDraft

    V, K = 10, 2
    bd = BigramDraft.__new__(BigramDraft)
    bd.class_names, bd.label, bd.token_rows, bd.class_rows = ["a", "b"], np.array([0, 1] * 5), {}, []
    bd.prior = np.zeros(V)
    head = HeadDraft.__new__(HeadDraft)
    head.position, head.pos_default = np.array([0.5, 0.2]), 0.0
    head.score_tok, head.score_w = np.array([3]), np.array([1.0])
    neu = NeuronDraft(0, np.array([1]), np.array([2.0]), [], np.zeros(0, np.int64), np.zeros(0), threshold=0.5)
    net = build_net(bd, [head], [], np.zeros(0, np.int64), [0.0], V, query=False, neurons=[neu], shared=(1, 1, 3, 1))
    X = torch.tensor([[1, 3, 4, 1, 7]])
    with torch.no_grad():
        base = net(X)
        net.so.zero_(); net.so[0, 5] = 1.5; net.so_c[0, 0] = 2.0
        net.sr.zero_(); net.sr[0, 0, 3] = 4.0; net.sr_c[0, 0, 0] = -0.25
        lp = net(X)
        A = net.attention(X, 0)[0]  # [T, T]
        pre = 2.0 * (X[0] == 1).float() - 0.5 - 0.25 * 4.0 * (A * (X[0] == 3).float()[None]).sum(1)
        z = torch.zeros(5, V)
        z[:, 5] = torch.relu(pre) * 2.0 * 1.5
        want = torch.log_softmax(z, -1)
    assert torch.allclose(base, torch.log_softmax(torch.zeros(5, V), -1), atol=1e-6)
    assert torch.allclose(lp[0], want, atol=1e-5)


@pytest.mark.parametrize("size", [4, (4, 3)])
def test_joint_fit_with_shared_patterns_writes_weights_tables_the_engine_reads_the_same(planted, tmp_path, size):
    """--shared-*: the patterns are written as [[weights]] tables (largest |weight| 1, at most --shared-size
    tokens, OUT:READ per kind), each neuron references at most --shared-refs of each kind, and the engine reading the files gives
    the torch model's held-out KL."""
    import tomllib

    from handmodel import load_rules
    from reference.oracle import Oracle
    from verify.discover.suggest import PATTERN_FILE, suggest

    ckpt, train = planted
    o = Oracle.load(ckpt)
    out = tmp_path / "shared"
    s = suggest(o, out, train, SuggestOptions(budget=600, classes=6, class_k=8, sources=20, k_out=6, scores=30, positions=2048,
                rounds=1, min_count=5, att_positions=1024, att_steps=30, neurons=3, joint_steps=30,
                joint_positions=4096, held_positions=1024, query_scores=8, joint_lr=0.05, neuron_classes=2,
                shared_out=2, shared_read=1, shared_size=size, shared_refs=1), log=lambda m: None)
    joint = s["history"][-1]
    assert abs(joint["held_kl"] - joint["held_kl_torch"]) < 2e-3, joint
    rules = load_rules(out, o.vocab)
    assert int(np.sum(rules.rule_numbers)) == s["numbers"]
    sets = tomllib.loads((out / PATTERN_FILE).read_text())["weights"]
    n_out_tokens, n_read_tokens = (size, size) if isinstance(size, int) else size
    assert sets and all(0 < len(w["tokens"]) <= (n_out_tokens if w["id"].startswith("out") else n_read_tokens)
                        and max(abs(x) for x in w["tokens"].values()) == 1.0 for w in sets)
    names = {"@" + w["id"] for w in sets}
    neurons = tomllib.loads((out / "50_neurons.toml").read_text())["neuron"]
    n_out = [sum(k in names for k in n["next"]) for n in neurons]
    n_read = [sum(k in names for h in n.get("attend", {}).values() for k in h) for n in neurons]
    assert max(n_out + n_read) <= 1 and sum(n_out) + sum(n_read) > 0, (n_out, n_read)
    used = {k for n in neurons for k in n["next"]} | {k for n in neurons for h in n.get("attend", {}).values() for k in h}
    assert names <= used  # an unreferenced pattern is not written
    with pytest.raises(UserError, match="shared-size"):
        suggest(o, tmp_path / "bad", train, SuggestOptions(neurons=3, joint_steps=5, shared_out=2, shared_read=0, shared_size=0, shared_refs=1), log=lambda m: None)


# -- faithful fit (issue 21): anchoring terms weighted by --faithful λ (verify/discover/anchors.py)

def _tiny_draft(oracle, windows):
    """A one-head, one-neuron draft on the planted reference: its [[head]] fitted to nothing (flat position
    table), one head_out row, and a neuron reading the current token whose reference neuron is the planted
    ' the' neuron (tests/planted.py)."""
    from verify.discover.bigrams import BigramDraft
    from verify.discover.heads import HeadDraft
    from verify.discover.neurons import NeuronDraft, reference_activations
    from verify.discover.suggest import HeadOut

    V = oracle.cfg.vocab_size
    bd = BigramDraft.__new__(BigramDraft)
    bd.class_names, bd.label, bd.token_rows, bd.class_rows = [], np.full(V, -1), {}, []
    bd.prior = np.zeros(V)
    head = HeadDraft.__new__(HeadDraft)
    head.ref_head, head.position, head.pos_default = 0, np.zeros(4), 0.0
    head.score_tok, head.score_w = np.zeros(0, np.int64), np.zeros(0)
    acts = reference_activations(oracle, windows)
    n = int(np.argmax(acts.var(0)))  # the reference neuron that varies most
    the, dog = oracle.vocab.index(" the"), oracle.vocab.index(" dog")
    # a neuron that reads every token a little (the fit must find which ones): now = 0.1 on all
    neu = NeuronDraft(n, np.arange(V), np.full(V, 0.1), [], np.array([dog]), np.zeros(1))
    outs = [HeadOut(0, the, np.array([dog]), np.zeros(1))]
    return bd, [head], outs, [neu], acts[:, [n]].var(0)


def _tiny_fit(oracle, lam, windows, held, steps=40):
    import torch

    from verify.discover.anchors import anchor_targets
    from verify.discover.jointfit import build_net, joint_fit

    bd, heads, outs, neurons, var = _tiny_draft(oracle, windows)
    V = oracle.cfg.vocab_size
    net = build_net(bd, heads, outs, np.zeros(0, np.int64), [0.0], V, query=False, neurons=neurons)
    tg = anchor_targets(oracle, windows, heads, outs, neurons, var, 1.0)
    with torch.inference_mode():
        ref_h = torch.log_softmax(oracle.model(torch.from_numpy(held)).float(), -1).clone()
    res = joint_fit(oracle, net, windows, held, ref_h, steps, batch=4, lr=0.05, n_query=0, log=lambda m: None,
                    anchors=tg, lam=lam)
    return net, tg, res


def test_faithful_zero_is_exactly_the_plain_joint_fit(oracle, planted):
    """λ = 0 with the anchor targets given fits exactly what the fit without anchors fits (same numbers, bit
    for bit), and `suggest` rejects a negative λ or one without a joint fit."""
    import torch

    from verify.discover.common import sample_windows
    from verify.discover.jointfit import build_net, joint_fit
    from verify.discover.suggest import suggest

    windows = sample_windows(oracle, planted[1], 4096, window=64)
    held = windows[-8:]
    net0, _, res0 = _tiny_fit(oracle, 0.0, windows[:-8], held, steps=15)
    bd, heads, outs, neurons, _ = _tiny_draft(oracle, windows[:-8])
    plain = build_net(bd, heads, outs, np.zeros(0, np.int64), [0.0], oracle.cfg.vocab_size, query=False, neurons=neurons)
    with torch.inference_mode():
        ref_h = torch.log_softmax(oracle.model(torch.from_numpy(held)).float(), -1).clone()
    res = joint_fit(oracle, plain, windows[:-8], held, ref_h, 15, batch=4, lr=0.05, n_query=0, log=lambda m: None)
    a, b = net0.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res0["held_kl"] == res["held_kl"] and "held_anchors" not in res0
    for bad in (SuggestOptions(faithful=-1.0, joint_steps=5), SuggestOptions(faithful=1.0, joint_steps=0)):
        with pytest.raises(UserError, match="--faithful"):
            suggest(oracle, planted[0].parent / "never", planted[1], bad, log=lambda m: None)


def test_faithful_fit_pulls_a_hand_neuron_toward_its_reference_neuron_on_held_out_text(oracle, planted):
    """A large λ makes the hand neuron's activation measurably closer to the reference neuron's on held-out
    windows (the planted valid.txt, never fitted on): the normalised squared error falls below 3/4 of the
    plain fit's, and the Pearson r the component check reads (verify/claims/measure.py) reaches ≥ 0.8, ≥ 0.5 above it;
    the attention and head_out anchor terms fall too."""
    import torch

    from verify.discover.anchors import anchor_loss, reference_run
    from verify.discover.common import sample_windows

    windows = sample_windows(oracle, planted[1], 8192, window=64)
    held_text = sample_windows(oracle, planted[1].parent / "valid.txt", 2048, window=64)
    fits = {lam: _tiny_fit(oracle, lam, windows[:-8], windows[-8:], steps=60) for lam in (0.0, 10.0)}
    X = torch.from_numpy(held_text)
    err, r, terms = {}, {}, {}
    for lam, (net, tg, _) in fits.items():
        lp_ref, cache = reference_run(oracle.model, X)
        net.trace = True
        with torch.no_grad():
            net(X)
            _, terms[lam] = anchor_loss(net, lp_ref, cache, tg)
        net.trace = False
        act = net.last["act"][:, 0].numpy()
        post = cache["mlp.post"][..., int(tg.neuron_ref[0])].reshape(-1).float().numpy()
        err[lam] = float(((act - post) ** 2).mean() / post.var())
        on = (act > 0) | (post > 0)
        r[lam] = float(np.corrcoef(act[on], post[on])[0, 1]) if act[on].std() > 0 else 0.0
    assert err[10.0] < 0.75 * err[0.0], (err, r)  # measured 1.18 -> 0.69
    assert r[10.0] >= 0.8 and r[10.0] >= r[0.0] + 0.5, (err, r)  # measured -0.99 -> 0.99
    assert terms[10.0].attention < terms[0.0].attention and terms[10.0].head_out < terms[0.0].head_out, terms


def test_faithful_suggest_writes_what_it_fitted_and_lowers_the_anchor_terms(planted, tmp_path):
    """--faithful 3 end to end: the engine reading the written files gives the torch model's held-out KL, and
    the held-out anchor terms of the step kept are below those of the moment-matched start."""
    from reference.oracle import Oracle
    from verify.discover.suggest import suggest

    ckpt, train = planted
    s = suggest(Oracle.load(ckpt), tmp_path / "faithful", train, SuggestOptions(
        budget=600, classes=6, class_k=8, sources=20, k_out=6, scores=30, positions=2048, rounds=1, min_count=5,
        att_positions=1024, att_steps=30, neurons=3, joint_steps=30, joint_positions=4096, held_positions=1024,
        query_scores=8, joint_lr=0.05, neuron_classes=2, faithful=3.0), log=lambda m: None)
    joint = s["history"][-1]
    assert joint["faithful"] == 3.0
    assert abs(joint["held_kl"] - joint["held_kl_torch"]) < 2e-3, joint
    before, after = joint["held_anchors_start"], joint["held_anchors"]
    assert sum(after.values()) < sum(before.values()), (before, after)


def test_faithful_fit_starts_from_the_centred_prior_which_changes_no_distribution(oracle, planted):
    """With λ > 0 the dense prior is centred before the first step (the prior anchor's target has mean 0; a constant
    moves no probability): the starting held-out KL is the uncentred prior's, and the fitted prior stays centred."""
    import torch

    from verify.discover.anchors import anchor_targets
    from verify.discover.common import sample_windows
    from verify.discover.jointfit import build_net, joint_fit

    windows = sample_windows(oracle, planted[1], 4096, window=64)
    held = windows[-8:]
    with torch.inference_mode():
        ref_h = torch.log_softmax(oracle.model(torch.from_numpy(held)).float(), -1).clone()
    starts, priors = {}, {}
    for lam in (0.0, 1.0):
        bd, heads, outs, neurons, var = _tiny_draft(oracle, windows[:-8])
        bd.prior = np.linspace(-12.0, -3.0, oracle.cfg.vocab_size)
        net = build_net(bd, heads, outs, np.zeros(0, np.int64), [0.0], oracle.cfg.vocab_size, query=False, neurons=neurons)
        tg = anchor_targets(oracle, windows[:-8], heads, outs, neurons, var, 1.0)
        res = joint_fit(oracle, net, windows[:-8], held, ref_h, 3, batch=4, lr=0.05, n_query=0, log=lambda m: None,
                        anchors=tg, lam=lam)
        starts[lam], priors[lam] = res["held_kl_start"], net.prior.detach().numpy()
    assert abs(starts[1.0] - starts[0.0]) < 1e-4, starts
    assert abs(priors[1.0].mean()) < 0.2 and priors[0.0].mean() < -6, (priors[1.0].mean(), priors[0.0].mean())


def test_faithful_fit_pulls_a_bigram_row_toward_the_token_alone_write(oracle, planted):
    """The bigram anchor: with a large λ a token row's values on its support end near the reference's
    token-alone write after that token (what verify/claims/measure.py `_bigram` compares the row with), far
    nearer than the plain fit leaves them, and the term is reported; with no bigram draft it is 0."""
    import torch

    from verify.discover.anchors import anchor_loss, anchor_targets, reference_run
    from verify.discover.bigrams import SparseRow
    from verify.discover.common import sample_windows
    from verify.discover.jointfit import build_net, joint_fit

    windows = sample_windows(oracle, planted[1], 8192, window=64)
    train, held = windows[:-8], windows[-8:]
    the = oracle.vocab.index(" the")
    with torch.inference_mode():
        ref_h = torch.log_softmax(oracle.model(torch.from_numpy(held)).float(), -1).clone()
    err, terms = {}, {}
    for lam in (0.0, 10.0):
        bd, heads, outs, neurons, var = _tiny_draft(oracle, train)
        probe = SparseRow(np.arange(oracle.cfg.vocab_size), np.zeros(oracle.cfg.vocab_size))
        bd.token_rows = {the: probe}
        full = anchor_targets(oracle, train, heads, outs, neurons, var, 1.0, bd=bd).bigram_target[1]
        support = np.sort(np.argsort(-np.abs(full))[:12])  # the row writes the 12 tokens the write moves most
        bd.token_rows = {the: SparseRow(support, np.zeros(len(support)))}
        tg = anchor_targets(oracle, train, heads, outs, neurons, var, 1.0, bd=bd)
        target = tg.bigram_target[1]
        assert np.allclose(target, full[support], atol=1e-6) and tg.bigram_weight[1].sum() > 0
        net = build_net(bd, heads, outs, np.zeros(0, np.int64), [0.0], oracle.cfg.vocab_size, query=False, neurons=neurons)
        res = joint_fit(oracle, net, train, held, ref_h, 60, batch=4, lr=0.05, n_query=0, log=lambda m: None,
                        anchors=tg, lam=lam)
        if lam:  # the held-out objective that picks the step kept counts the term too
            assert res["held_anchors"]["bigram"] < 0.5 * res["held_anchors_start"]["bigram"], res
        row = net.tr_v.detach().numpy()
        err[lam] = float(((row - target) ** 2).sum() / (target ** 2).sum())
        lp_ref, cache = reference_run(oracle.model, torch.from_numpy(held))
        net.trace = True
        with torch.no_grad():
            net(torch.from_numpy(held))
            _, terms[lam] = anchor_loss(net, lp_ref, cache, tg)
    assert err[10.0] < 0.5 * err[0.0] and err[10.0] < 0.5, err  # measured 8.31 -> 0.007
    assert terms[10.0].bigram < terms[0.0].bigram, terms
    bare = anchor_targets(oracle, train, heads, outs, neurons, var, 1.0)
    assert all(len(t) == 0 for t in bare.bigram_target)
