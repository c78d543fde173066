"""The torch semantics (verify/discover/torchsem.py, through torchrules.TorchRules and jointfit's dense heads)
== the numpy twin (handmodel/twin.py) on random small rulesets: every rule kind, classes, weighted sets,
copy, negative thresholds. No reference model and no numba: a synthetic vocabulary."""
from __future__ import annotations

import numpy as np
import pytest

VOCAB = [f"w{i}" for i in range(24)]


def _tok(rng) -> str:
    return f"w{int(rng.integers(0, len(VOCAB)))}"


def _ref(rng, plain_only: bool = False) -> str:
    """A random reference: a token, a class, @all or (outside plain-only places) the weighted set."""
    opts = ["tok", "tok", "@c0", "@c1", "@all"] + ([] if plain_only else ["@ws"])
    k = opts[int(rng.integers(0, len(opts)))]
    return f'"{_tok(rng)}"' if k == "tok" else f'"{k}"'


def _table(rng, n: int, plain_only: bool = False) -> str:
    keys = list(dict.fromkeys(_ref(rng, plain_only) for _ in range(n)))
    return "{ " + ", ".join(f"{k} = {rng.normal():.4f}" for k in keys) + " }"


def random_ruleset(seed: int) -> str:
    """A rule file using every rule kind with random sets, numbers and options."""
    rng = np.random.default_rng(seed)
    f = []
    for c in range(2):
        toks = ", ".join(f'"{t}"' for t in dict.fromkeys(_tok(rng) for _ in range(5)))
        f.append(f'[[class]]\nid = "c{c}"\ndoc = "c"\ntokens = [{toks}]\n')
    f.append(f'[[weights]]\nid = "ws"\ndoc = "w"\ntokens = {{ "{_tok(rng)}" = 1.0, "@c0" = {rng.normal():.3f}, '
             f'"{_tok(rng)}" = -0.5 }}\n')
    f.append(f'[[prior]]\nid = "p"\ndoc = "p"\nnext = {_table(rng, 3)}\n')
    rows = ", ".join(f"{k} = {_table(rng, 2)}" for k in dict.fromkeys(_ref(rng, True) for _ in range(3)))
    f.append(f'[[bigram]]\nid = "b"\ndoc = "b"\nrows = {{ {rows} }}\n')
    f.append(f'[[skip]]\nid = "s"\ndoc = "s"\nearlier = {_ref(rng, True)}\nnow = {_ref(rng, True)}\nnext = {_table(rng, 2)}\n')
    for h in range(2):
        pos = ", ".join(f"{d} = {rng.normal():.3f}" for d in sorted(set(rng.integers(0, 6, 3).tolist())))
        scores = ", ".join(f"{{ now = {_ref(rng, True)}, src = {_ref(rng, True)}, w = {rng.normal() * 2:.3f} }}"
                           for _ in range(int(rng.integers(0, 4))))
        f.append(f'[[head]]\nid = "h{h}"\ndoc = "h"\nposition = {{ {pos}, default = {rng.normal():.3f} }}\n'
                 f'score = [{scores}]\n')
        copy = f"copy = {rng.normal():.3f}\n" if rng.random() < 0.7 else ""
        nxt = f"next = {_table(rng, 2)}\n" if not copy or rng.random() < 0.5 else ""
        f.append(f'[[head_out]]\nid = "o{h}"\ndoc = "o"\nhead = "h{h}"\nsrc = {_ref(rng, True)}\nnow = {_ref(rng, True)}\n'
                 + copy + nxt)
    for n in range(3):
        f.append(f'[[neuron]]\nid = "n{n}"\ndoc = "n"\nthreshold = {rng.normal():.3f}\nnow = {_table(rng, 2)}\n'
                 f'present = {_table(rng, 1, True)}\nattend = {{ h{n % 2} = {_table(rng, 2)} }}\nnext = {_table(rng, 2)}\n')
    return "\n".join(f)


def _compiled(tmp_path, seed):
    from handmodel import load_rules

    d = tmp_path / f"r{seed}"
    d.mkdir()
    (d / "rules.toml").write_text(random_ruleset(seed), encoding="utf-8")
    return load_rules(d, VOCAB)


@pytest.mark.parametrize("seed", range(6))
def test_torch_semantics_equal_the_twin_on_random_rulesets(tmp_path, seed):
    import torch

    from handmodel import twin
    from verify.discover.slots import read_slots
    from verify.discover.torchrules import TorchRules

    rules = _compiled(tmp_path, seed)
    assert set(rules.rule_kinds) == {"prior", "bigram", "skip", "head", "head_out", "neuron"}
    W = np.random.default_rng(100 + seed).integers(0, len(VOCAB), size=(4, 12)).astype(np.int64)
    S = read_slots(rules)
    got = TorchRules(rules, S, W).logits(torch.as_tensor(S.values, dtype=torch.float64)).numpy()
    want = np.stack([twin.logits(rules, w) for w in W])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    # with a head switched off in the twin the logits differ: the test sees the heads' outputs
    mask = np.array([r.kind != "head" for r in rules.rules])
    assert not np.allclose(np.stack([twin.logits(rules, w, mask) for w in W]), want)


@pytest.mark.parametrize("seed", range(3))
def test_dense_head_attention_equals_the_twin(seed):
    """jointfit's and heads' dense head (position table + a score per source token): torch == twin."""
    import torch

    from handmodel import twin
    from verify.discover import torchsem as sem

    rng = np.random.default_rng(seed)
    T, V, D = 10, 24, int(rng.integers(0, 14))
    table, default, score = rng.normal(size=D), float(rng.normal()), rng.normal(size=V)
    X = rng.integers(0, V, size=(3, T))
    A = sem.causal_attention(sem.position_scores(torch.as_tensor(table), torch.tensor(default, dtype=torch.float64), T)[None]
                             + torch.as_tensor(score)[torch.as_tensor(X)][:, None, :]).numpy()
    for b in range(3):
        want = twin.attention_pattern(table, default, score[X[b]])
        np.testing.assert_allclose(A[b], want, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(A[b].sum(1), 1.0)
    w = rng.normal(size=(3, T))
    np.testing.assert_allclose(sem.attention_mass(torch.as_tensor(A), torch.as_tensor(w)).numpy(),
                               np.einsum("bts,bs->bt", A, w), rtol=1e-12)
