"""The reference transformer itself: shapes of every hook, causal masking, and its guards."""
from __future__ import annotations

import pytest
import torch

from reference.model import HOOKS, ModelConfig, OneLayerTransformer

torch.set_num_threads(1)

CFG = ModelConfig(vocab_size=50, n_ctx=12, d_model=32, n_heads=4, d_mlp=48)


@pytest.fixture(scope="module")
def model() -> OneLayerTransformer:
    torch.manual_seed(0)
    m = OneLayerTransformer(CFG).eval()
    with torch.no_grad():  # larger Q/K than at init, so attention patterns are far from uniform
        m.W_Q.mul_(4.0)
        m.W_K.mul_(4.0)
    return m


def test_forward_and_every_hook_have_the_documented_shapes(model):
    B, T, V, D, H, N = 3, 7, CFG.vocab_size, CFG.d_model, CFG.n_heads, CFG.d_mlp
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    cache: dict = {}
    with torch.no_grad():
        logits = model(idx, cache=cache)
    assert logits.shape == (B, T, V)
    expected = {
        "embed": (B, T, D), "pos_embed": (B, T, D), "resid_pre": (B, T, D),
        "attn.scores": (B, H, T, T), "attn.pattern": (B, H, T, T), "attn.head_out": (B, T, H, D),
        "attn_out": (B, T, D), "resid_mid": (B, T, D), "mlp.pre": (B, T, N), "mlp.post": (B, T, N),
        "mlp_out": (B, T, D), "resid_post": (B, T, D), "ln_final.scale": (B, T, 1), "logits": (B, T, V),
    }
    assert set(cache) == set(HOOKS) == set(expected)
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert CFG.d_head == D // H


def test_cache_pieces_add_up_to_the_residual_stream(model):
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.n_ctx), generator=torch.Generator().manual_seed(2))
    c: dict = {}
    with torch.no_grad():
        model(idx, cache=c)
    torch.testing.assert_close(c["resid_pre"], c["embed"] + c["pos_embed"])
    torch.testing.assert_close(c["attn_out"], c["attn.head_out"].sum(2) + model.b_O)
    torch.testing.assert_close(c["resid_mid"], c["resid_pre"] + c["attn_out"])
    torch.testing.assert_close(c["mlp.post"], torch.relu(c["mlp.pre"]))
    torch.testing.assert_close(c["resid_post"], c["resid_mid"] + c["mlp_out"])
    x = c["resid_post"]
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(c["logits"], centred / c["ln_final.scale"] * model.ln_final.weight
                               @ model.W_U + model.ln_final.bias @ model.W_U + model.b_U, rtol=1e-5, atol=1e-5)
    assert (c["mlp.post"] == 0).any() and (c["mlp.post"] > 0).any()  # ReLU: some neurons exactly off


def test_attention_is_causal_and_rows_sum_to_one(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    c: dict = {}
    with torch.no_grad():
        model(idx, cache=c)
    pat = c["attn.pattern"]
    torch.testing.assert_close(pat.sum(-1), torch.ones(2, CFG.n_heads, 9))
    above = ~torch.tril(torch.ones(9, 9, dtype=torch.bool))
    assert (pat[..., above] == 0).all()
    assert torch.isneginf(c["attn.scores"][..., above]).all()


@pytest.mark.parametrize("changed_pos", [0, 3, 7, 11])
def test_changing_a_future_token_never_changes_earlier_logits(model, changed_pos):
    g = torch.Generator().manual_seed(changed_pos)
    idx = torch.randint(0, CFG.vocab_size, (1, CFG.n_ctx), generator=g)
    other = idx.clone()
    other[0, changed_pos:] = (idx[0, changed_pos:] + 1 + torch.randint(0, CFG.vocab_size - 1, (CFG.n_ctx - changed_pos,),
                                                                         generator=g)) % CFG.vocab_size
    assert (other[0, changed_pos:] != idx[0, changed_pos:]).all()
    with torch.no_grad():
        a, b = model(idx), model(other)
    assert torch.equal(a[0, :changed_pos], b[0, :changed_pos])  # bit-exact, not just close
    assert not torch.allclose(a[0, changed_pos], b[0, changed_pos])


def test_prefix_logits_match_the_full_sequence(model):
    idx = torch.randint(0, CFG.vocab_size, (1, CFG.n_ctx), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)
        for t in (1, 5, CFG.n_ctx - 1):
            torch.testing.assert_close(model(idx[:, :t]), full[:, :t], rtol=1e-5, atol=1e-5)


def test_ablate_attn_is_token_by_token(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    c: dict = {}
    with torch.no_grad():
        out = model(idx, cache=c, ablate_attn=True)
        x0 = model.W_E[idx] + model.W_pos[:6]
        torch.testing.assert_close(out, model.unembed(x0 + model.mlp(x0)))
    assert "attn.pattern" not in c and torch.equal(c["attn_out"], torch.zeros_like(c["attn_out"]))


def test_sequence_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match=r"sequence length 13 exceeds the model's context n_ctx=12"):
        model(torch.zeros(1, 13, dtype=torch.int64))


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_heads=4"):
        OneLayerTransformer(ModelConfig(vocab_size=10, n_ctx=4, d_model=30, n_heads=4, d_mlp=8))


def test_config_dict_round_trip_ignores_unknown_keys():
    d = CFG.to_dict()
    assert ModelConfig.from_dict({**d, "comment": "extra"}) == CFG
