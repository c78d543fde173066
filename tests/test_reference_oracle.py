"""The oracle API against brute-force computations through the model, on a tiny trained checkpoint."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from handmodel.errors import UserError
from reference.oracle import Factored, Oracle

torch.set_num_threads(1)
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint) -> Oracle:
    return Oracle.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def mean_pos_oracle(oracle) -> Oracle:
    """The same model with every position embedding replaced by their mean: what pos=None stands for."""
    m = copy.deepcopy(oracle.model)
    with torch.no_grad():
        m.W_pos[:] = m.W_pos.mean(0)
    return Oracle(m, oracle.card, oracle.path)


def rand_ids(oracle, n, seed):
    return np.random.default_rng(seed).integers(0, oracle.cfg.vocab_size, size=n)


def test_load_and_text(oracle):
    assert oracle.cfg.vocab_size == 300 and oracle.cfg.n_ctx == 32
    assert oracle.card["steps"] == 60 and oracle.card["finished"] is True
    assert len(oracle.vocab) == oracle.cfg.vocab_size
    assert oracle.vocab[oracle.eot] == "<|endoftext|>"
    text = "Tom said, “Let’s play!” 🙂"
    ids = oracle.encode(text)
    assert ids.dtype == np.int32 and oracle.decode(ids) == text
    assert len(oracle.hash) == 16


def test_attention_patterns_sum_to_one(oracle):
    c = oracle.run_with_cache(rand_ids(oracle, oracle.cfg.n_ctx, 0))
    pat = c["attn.pattern"]  # [H, T, T]
    assert pat.shape == (oracle.cfg.n_heads, oracle.cfg.n_ctx, oracle.cfg.n_ctx)
    np.testing.assert_allclose(pat.sum(-1), 1.0, rtol=0, atol=1e-5)
    assert (pat >= 0).all() and (np.triu(np.ones_like(pat[0]), 1)[None] * pat == 0).all()
    cb = oracle.run_with_cache(np.stack([rand_ids(oracle, 10, 1), rand_ids(oracle, 10, 2)]))
    assert cb["attn.pattern"].shape == (2, oracle.cfg.n_heads, 10, 10)
    np.testing.assert_allclose(cb["attn.pattern"].sum(-1), 1.0, rtol=0, atol=1e-5)
    single = oracle.run_with_cache(rand_ids(oracle, 10, 2))
    for k in single:
        np.testing.assert_allclose(cb[k][1], single[k], **TOL, err_msg=k)


def test_log_probs_match_the_model(oracle):
    ids = rand_ids(oracle, 20, 3)
    (lp,) = oracle.log_probs([ids])
    assert lp.shape == (20, oracle.cfg.vocab_size) and lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = torch.log_softmax(oracle.model(torch.from_numpy(ids)[None]), -1)[0].numpy()
    np.testing.assert_allclose(lp, ref, **TOL)
    (lp1,) = oracle.log_probs(ids)  # a bare 1-D array is one sequence
    np.testing.assert_array_equal(lp1, lp)


@pytest.mark.parametrize("batch_tokens", [8192, 40, 1])
def test_batched_log_probs_of_different_lengths_equal_one_at_a_time(oracle, batch_tokens):
    lengths = [5, 32, 1, 17, 5, 9, 31]
    seqs = [rand_ids(oracle, n, 100 + i) for i, n in enumerate(lengths)]
    seqs[2] = [int(seqs[2][0])]  # plain Python lists work too
    batched = oracle.log_probs(seqs, batch_tokens=batch_tokens)
    assert [b.shape for b in batched] == [(n, oracle.cfg.vocab_size) for n in lengths]
    for s, b in zip(seqs, batched):
        (alone,) = oracle.log_probs([s])
        np.testing.assert_allclose(b, alone, **TOL)


def test_direct_path_matches_the_model_with_attention_removed(oracle, mean_pos_oracle):
    toks = [0, 1, 7, 42, 299]
    for pos in (0, 5, oracle.cfg.n_ctx - 1):
        dp = oracle.direct_path(toks, pos=pos)
        assert dp.shape == (len(toks), oracle.cfg.vocab_size)
        for i, t in enumerate(toks):
            seq = torch.full((1, pos + 1), t, dtype=torch.int64)
            with torch.no_grad():
                ref = oracle.model(seq, ablate_attn=True)[0, pos].numpy()
            np.testing.assert_allclose(dp[i], ref, **TOL)
    full = oracle.direct_path()  # every token, mean position
    assert full.shape == (oracle.cfg.vocab_size, oracle.cfg.vocab_size)
    with torch.no_grad():
        ref = mean_pos_oracle.model(torch.arange(oracle.cfg.vocab_size)[:, None], ablate_attn=True)[:, 0].numpy()
    np.testing.assert_allclose(full, ref, **TOL)
    np.testing.assert_allclose(oracle.direct_path(toks), full[toks], **TOL)


def test_qk_matches_attention_scores_in_the_model(oracle, mean_pos_oracle):
    rng = np.random.default_rng(4)
    V = oracle.cfg.vocab_size
    for head in range(oracle.cfg.n_heads):
        for src_pos, dst_pos in [(0, 0), (0, 3), (2, 9), (30, 31)]:
            qk = oracle.qk(head, dst_pos=dst_pos, src_pos=src_pos)
            assert isinstance(qk, Factored) and qk.shape == (V, V)
            for dst, src in rng.integers(0, V, size=(3, 2)):
                seq = rng.integers(0, V, size=dst_pos + 1)
                seq[src_pos], seq[dst_pos] = src, dst
                if src_pos == dst_pos and src != dst:
                    continue
                score = oracle.run_with_cache(seq)["attn.scores"][head, dst_pos, src_pos]
                np.testing.assert_allclose(qk.rows([dst])[0, src], score, **TOL)
                np.testing.assert_allclose(qk.cols([src])[dst, 0], score, **TOL)
    # pos=None: the model whose positions all look like the mean position
    qk = oracle.qk(1)
    seq = np.array([5, 77, 123, 200])
    scores = mean_pos_oracle.run_with_cache(seq)["attn.scores"][1]
    for d in range(4):
        np.testing.assert_allclose(qk.rows([seq[d]])[0, seq[: d + 1]], scores[d, : d + 1], **TOL)


def test_ov_write_matches_each_head_output(oracle):
    """head_out[t, h] = sum_s pattern[h, t, s] * v(tok_s at s) W_O[h]: the brute-force definition of OV."""
    seq = rand_ids(oracle, 12, 5)
    c = oracle.run_with_cache(seq)
    for h in range(oracle.cfg.n_heads):
        writes = np.stack([oracle.ov_write(h, [t], src_pos=s)[0] for s, t in enumerate(seq)])  # [T, D]
        np.testing.assert_allclose(c["attn.pattern"][h] @ writes, c["attn.head_out"][:, h], **TOL)
    one = oracle.run_with_cache(seq[:1])  # a head on the first token attends only to it
    np.testing.assert_allclose(oracle.ov_write(2, seq[:1], src_pos=0)[0], one["attn.head_out"][0, 2], **TOL)


def test_ov_logit_effect_matches_the_direct_logit_attribution(oracle):
    """Through LNf at scale sigma_t, head h's write changes the logits at t by U(gamma * centre(write)) / sigma_t."""
    m = oracle.model
    seq = rand_ids(oracle, 10, 6)
    c = oracle.run_with_cache(seq)
    gamma, W_U = m.ln_final.weight.detach().numpy(), m.W_U.detach().numpy()

    def dla(x, scale):  # direct logit attribution of a residual piece x [D]
        return ((x - x.mean()) * gamma / scale) @ W_U

    # the attribution is exact: the pieces of the residual add up to the logits
    t = 9
    sc = float(c["ln_final.scale"][t, 0])
    pieces = [c["embed"][t], c["pos_embed"][t], m.b_O.detach().numpy(), c["mlp_out"][t]] + list(c["attn.head_out"][t])
    total = sum(dla(p, sc) for p in pieces) + m.ln_final.bias.detach().numpy() @ W_U + m.b_U.detach().numpy()
    np.testing.assert_allclose(total, c["logits"][t], rtol=1e-4, atol=1e-4)
    for h in range(oracle.cfg.n_heads):
        expect = dla(c["attn.head_out"][t, h], sc)
        got = sum(c["attn.pattern"][h, t, s] * oracle.ov(h, src_pos=s, ln_scale=sc).rows([seq[s]])[0] for s in range(t + 1))
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)
    ov = oracle.ov(0)
    assert ov.shape == (oracle.cfg.vocab_size, oracle.cfg.vocab_size)
    np.testing.assert_allclose(oracle.ov(0, ln_scale=2.0).full(), ov.full() / 2.0, **TOL)


def test_factored_matrix_helpers():
    rng = np.random.default_rng(7)
    f = Factored(rng.standard_normal((37, 5)), rng.standard_normal((5, 23)))
    full = f.left @ f.right
    assert f.shape == (37, 23)
    np.testing.assert_allclose(f.full(), full)
    np.testing.assert_allclose(f.rows([3, 0, 36]), full[[3, 0, 36]])
    np.testing.assert_allclose(f.cols([22, 1]), full[:, [22, 1]])
    order = np.argsort(full, axis=None)
    for largest, idx in ((True, order[::-1][:9]), (False, order[:9])):
        got = f.top_entries(9, chunk=4, largest=largest)
        want = [(int(r), int(c), float(full[r, c])) for r, c in zip(*np.unravel_index(idx, full.shape))]
        assert [(r, c) for r, c, _ in got] == [(r, c) for r, c, _ in want]
        np.testing.assert_allclose([v for *_, v in got], [v for *_, v in want])
    assert len(f.top_entries(10_000)) == 37 * 23


@pytest.mark.parametrize("ids, msg", [
    ([3, 300, 4], r"token id 300 is out of range: this model's vocabulary has ids 0\.\.299"),
    ([-1, 2], r"token id -1 is out of range: this model's vocabulary has ids 0\.\.299"),
    (list(range(33)), r"sequence of 33 tokens is longer than the context \(32\); split it \(verify does this for you\) or pass a shorter one"),
    ([], r"a token sequence must be a non-empty 1-D list of ids \(got shape \(0,\)\)"),
    ([1.5, 2.0], r"token ids must be integers \(got float64\)"),
])
def test_bad_token_sequences(oracle, ids, msg):
    for call in (lambda: oracle.log_probs([ids]), lambda: oracle.run_with_cache(ids)):
        with pytest.raises(UserError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("head", [4, -1, 99])
def test_unknown_head(oracle, head):
    for call in (oracle.qk, oracle.ov, lambda h: oracle.ov_write(h, [1])):
        with pytest.raises(UserError, match=rf"^head {head} does not exist: this model has heads 0\.\.3$"):
            call(head)


def test_sample_is_seeded_and_greedy_is_argmax(oracle):
    a = oracle.sample("Once upon a time", max_new=20, seed=1)
    assert a.startswith("Once upon a time")
    assert a == oracle.sample("Once upon a time", max_new=20, seed=1)
    assert oracle.sample("Tom", max_new=10, top_k=1, seed=3) == oracle.sample("Tom", max_new=10, temperature=0)
    greedy = oracle.sample("Tom", max_new=5, temperature=0)
    ids = [oracle.eot] + oracle.encode("Tom").tolist()
    for _ in range(5):
        nxt = int(oracle.log_probs([ids])[0][-1].argmax())
        if nxt == oracle.eot:
            break
        ids.append(nxt)
    assert greedy == "Tom" + oracle.decode(ids[1 + len(oracle.encode("Tom")):])
    # generation stops at the context end at the latest: [EOT] + n_ctx - 1 new tokens
    long = oracle.sample("", max_new=500, temperature=2.0, seed=0)
    assert long == oracle.sample("", max_new=oracle.cfg.n_ctx - 1, temperature=2.0, seed=0)
    with pytest.raises(UserError, match=r"--temperature must be >= 0 \(got -1\.0\); 0 means greedy"):
        oracle.sample("x", temperature=-1.0)
