"""The key/value-cache sampler (reference/sampling.py) equals the full-prefix forward it replaces."""
from __future__ import annotations

import numpy as np
import torch

from reference.model import ModelConfig, OneLayerTransformer
from reference.sampling import KVCache, sample_stories


def _model(seed: int = 0) -> OneLayerTransformer:
    torch.manual_seed(seed)
    m = OneLayerTransformer(ModelConfig(vocab_size=50, n_ctx=24, d_model=32, n_heads=4, d_mlp=64))
    with torch.no_grad():
        m.W_U.mul_(40.0)  # peaked distributions: some stories end early at EOT
        for p in (m.b_Q, m.b_K, m.b_V, m.b_in, m.b_U):
            p.normal_(0.0, 0.3)
    return m.eval()


def _full_prefix_sampler(model, eot, n, seed, max_len, batch):
    """The sampler this one replaced (whole prefix re-run every step): the twin."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for b in range(0, n, batch):
            B = min(batch, n - b)
            ids = torch.full((B, 1), eot, dtype=torch.int64)
            done = torch.zeros(B, dtype=torch.bool)
            lengths = torch.full((B,), max_len, dtype=torch.int64)
            while ids.shape[1] < max_len and not bool(done.all()):
                nxt = torch.multinomial(model(ids)[:, -1].float().softmax(-1), 1, generator=gen)[:, 0]
                nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
                ids = torch.cat([ids, nxt[:, None]], 1)
                newly = (~done) & (nxt == eot)
                lengths[newly] = ids.shape[1]
                done |= newly
            out += [ids[r, : int(lengths[r])].numpy().astype(np.int32) for r in range(B)]
    return out


def test_kv_step_logits_equal_the_full_forward():
    m = _model()
    ids = torch.randint(0, 50, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = m(ids)
        c = KVCache(m, 3, 24)
        steps = torch.stack([c.step(ids[:, t]) for t in range(24)], 1)
    torch.testing.assert_close(steps, full, atol=2e-4, rtol=1e-4)


def test_sampled_stories_equal_the_full_prefix_sampler():
    m = _model(3)
    eot = 7
    got = sample_stories(m, eot, n=11, seed=5, max_len=20, batch=4)
    want = _full_prefix_sampler(m, eot, 11, 5, 20, 4)
    assert len(got) == 11
    assert any(len(s) < 20 for s in got) and any(len(s) == 20 for s in got)  # both stopping rules exercised
    for g, w in zip(got, want):
        assert g.dtype == np.int32 and g[0] == eot
        np.testing.assert_array_equal(g, w)
