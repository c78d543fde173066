"""The sampled fallback's baseline metrics shipped beside a checkpoint (verify/ledger/baselines.py): used only
for exactly the eval set they were computed on, equal to fitting the tables, and never when damaged."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from verify.ledger import baselines as B


@pytest.fixture
def rules_dir(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "10_prior.toml").write_text('group = "prior"\n[[prior]]\nid = "common"\ndoc = "frequent tokens"\n'
                                     'next = { "." = 2.0, " the" = 1.5 }\n', encoding="utf-8")
    return d


def _eval(ckpt, rules_dir, seed=7):
    from verify.ledger.evaluate import evaluate

    return evaluate(ckpt, rules_dir, None, 3, seed, None, log=lambda m: None)


@pytest.fixture
def shipped(tiny_world, rules_dir, tmp_path, monkeypatch):
    """A copy of the tiny checkpoint with its fallback metrics shipped for the 3-story, seed-7 eval set (tables
    fitted on 8 sampled stories instead of 256: the same code, in seconds)."""
    monkeypatch.setattr(B, "FALLBACK_SAMPLED", 8)
    ckpt = shutil.copytree(tiny_world[0], tmp_path / "ckpt")
    ev = _eval(ckpt, rules_dir)  # fits the tables on sampled stories, the usual way
    from verify.ledger.data import checkpoint_info

    B.ship_metrics(checkpoint_info(ckpt), ev.ref, B.baseline_metrics(ev.ref, B.get_tables(ev.ckpt, None)))
    return ckpt, ev


def test_shipped_metrics_replace_the_fit_and_equal_it(shipped, rules_dir, tmp_path, monkeypatch):
    ckpt, fitted = shipped
    shutil.rmtree(Path(os.environ["HANDMODEL_CACHE"]) / "baselines")  # no tables: a fit would be needed

    def no_fit(*a, **k):
        raise AssertionError("fitted the tables although the shipped metrics are this eval set's")

    monkeypatch.setattr(B, "get_tables", no_fit)
    ev = _eval(ckpt, rules_dir)
    assert ev.baselines == fitted.baselines
    assert "shipped with the checkpoint" in ev.header["train_text"]


def test_another_eval_set_or_damage_means_fitting(shipped, rules_dir, capsys):
    ckpt, fitted = shipped
    calls = []
    real = B.get_tables

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "get_tables", counting)
        _eval(ckpt, rules_dir, seed=8)  # other stories: the shipped metrics are not theirs
        assert calls == [1]
        f = ckpt / B.SHIPPED_METRICS
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["unigram|kl"] = arrays["unigram|kl"] + np.float32(0.25)  # a value changed, the checksum not
        np.savez_compressed(f, **arrays)
        ev = _eval(ckpt, rules_dir)
        assert calls == [1, 1] and ev.baselines == fitted.baselines
    assert "shipped baseline metrics are damaged (checksum mismatch)" in capsys.readouterr().err


def test_the_shipped_checkpoints_file_names_it():
    """The file beside the shipped model is for that model and the fallback's tables."""
    from verify.ledger.data import checkpoint_info

    ckpt = checkpoint_info(None)
    f = ckpt.path / B.SHIPPED_METRICS
    assert f.exists(), "re-make it: python -m verify.ledger.baselines --ship"
    with np.load(f, allow_pickle=False) as z:
        key = str(z["key"])
        assert all(z[f"{n}|kl"].shape == z["unigram|kl"].shape for n in B.NAMES)
    assert key.startswith(f"{ckpt.hash}-sampled{B.FALLBACK_SAMPLED}s{B.FALLBACK_SEED}-v{B.TABLES_VERSION}|")
