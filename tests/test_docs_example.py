"""docs/rules.md and the code cannot drift: the worked example's rule files are shown verbatim in the doc,
every number of its answer sheet is what the twin and the engine compute, and every rule kind and key
of handmodel.rulefile.KEYS is documented in its own `## [[kind]]` section."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import handmodel
from handmodel import twin
from handmodel.rulefile import KEYS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "rules.md"
FIXTURE = ROOT / "tests" / "fixtures" / "rules_doc_example"
TOL_TWIN = 1.5e-6  # the sheet prints 6 decimals
TOL_ENGINE = 1e-5  # the engine computes in float32


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def sections(text: str) -> dict[str, str]:
    """'## heading' -> the text up to the next '## ' heading."""
    out: dict[str, str] = {}
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    for head, body in zip(parts[1::2], parts[2::2]):
        out[head.strip()] = body
    return out


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S)]


def doc_vocab(text: str) -> list[str]:
    para = text[text.index("Vocabulary (id: token):"):]
    para = para[: para.index("\n\n")]
    pairs = [(int(i), json.loads(tok)) for i, tok in re.findall(r"(\d+) `(\"(?:[^\"\\]|\\.)*\")`", para)]
    assert [i for i, _ in pairs] == list(range(len(pairs)))
    return [tok for _, tok in pairs]


def answer_sheet(text: str) -> list[tuple[str, list, list[float]]]:
    """(name, args, values) per line of the fenced block that follows 'Answer sheet'."""
    rest = text[text.index("Answer sheet"):]
    lang, block = fenced_blocks(rest)[0]
    out = []
    for line in block.splitlines():
        m = re.fullmatch(r"(\w+)(?:\((.*)\))?\s*=\s*(.+)", line.strip())
        assert m, f"unparsable answer-sheet line: {line!r}"
        args = [json.loads(a) if a.startswith('"') else a for a in re.findall(r'"(?:[^"\\]|\\.)*"|[^,\s]+', m.group(2) or "")]
        out.append((m.group(1), args, [float(v) for v in m.group(3).split()]))
    return out


@pytest.fixture(scope="module")
def example():
    text = doc_text()
    vocab = doc_vocab(text)
    rules = handmodel.load_rules(FIXTURE, vocab)
    sheet = answer_sheet(text)
    seq = np.array(next(v for n, _, v in sheet if n == "sequence"), dtype=np.int32)
    t = int(next(v for n, _, v in sheet if n == "position")[0])
    return text, vocab, rules, sheet, seq, t


def test_every_kind_and_key_is_documented():
    secs = sections(doc_text())
    for kind, keys in KEYS.items():
        head = next((h for h in secs if h.split()[0] == f"[[{kind}]]"), None)
        assert head is not None, f"docs/rules.md has no '## [[{kind}]]' section"
        for key in keys:
            assert f"`{key}`" in secs[head], f"key '{key}' of [[{kind}]] is not mentioned in its section"


def test_fixture_files_are_shown_verbatim(example):
    text = example[0]
    blocks = {body.strip() for lang, body in fenced_blocks(text) if lang == "toml"}
    files = sorted(FIXTURE.glob("*.toml"))
    assert [f.name for f in files] == ["00_classes.toml", "10_base.toml", "20_attention.toml"]
    for f in files:
        body = "\n".join(line for line in f.read_text(encoding="utf-8").splitlines() if not line.startswith("#")).strip()
        assert body in blocks, f"{f.name} differs from its block in docs/rules.md"
        assert f"`{f.name}`:" in text


def test_load_facts(example):
    _, vocab, rules, sheet, _, _ = example
    assert rules.rule_ids == ["prior.common", "bigram.after_the", "bigram.table", "head.prev", "head.prev.the",
                              "skip.cat_dog", "neuron.chase"]
    assert rules.groups == ["base", "20_attention", "neurons"] and list(rules.rule_group) == [0, 0, 0, 1, 1, 1, 2]
    members = {k: [vocab[i] for i in rules.sets.class_members[rules.sets.class_ids[k]]] for k in ("animal", "noun", "food")}
    assert members == {"animal": [" cat", " dog"], "noun": [" cat", " dog", " ice", " cream"], "food": [" ice", " cream"]}
    numbers = {args[0]: int(v[0]) for name, args, v in sheet if name == "numbers"}
    assert numbers == dict(zip(rules.rule_ids, map(int, rules.rule_numbers)))


def test_answer_sheet_matches_twin_and_engine(example):
    _, vocab, rules, sheet, seq, t = example
    tok = {s: i for i, s in enumerate(vocab)}
    idx = {r: i for i, r in enumerate(rules.rule_ids)}
    heads = [r for r in rules.rules if r.kind == "head"]
    z = twin.logits(rules, seq)[t]
    twin_lp = twin.log_probs(rules, seq)[t]
    eng_lp = handmodel.HandModel(rules).log_probs(seq).astype(np.float64)
    np.testing.assert_allclose(eng_lp, twin.log_probs(rules, seq), atol=TOL_ENGINE)  # every position, not only t
    eng_lp = eng_lp[t]
    deltas = {rules.rule_ids[i]: d for i, d, _ in twin.contributions(rules, seq, t)}
    listed: dict[str, set[int]] = {}
    checked = 0
    for name, args, (value, *_) in sheet:
        if name in ("sequence", "position", "numbers"):
            continue
        if name in ("attention", "mass"):
            head = next(r for r in heads if r.id == args[0])
            a = twin.attention(rules, head, seq, t)
            got = a[int(args[1])] if name == "attention" else a[seq[: t + 1] == tok[args[1]]].sum()
        elif name == "contribution":
            d = deltas.get(args[0], np.zeros(len(vocab)))
            if len(args) == 1:
                assert value == 0
                got = float(np.abs(d).max())
            else:
                listed.setdefault(args[0], set()).add(tok[args[1]])
                got = d[tok[args[1]]]
        elif name == "activation":
            n = rules.rules[idx[args[0]]]
            got = deltas[args[0]][n.next[0][0]] / n.next[0][1]
        elif name == "logit":
            got = z[tok[args[0]]]
            assert abs(eng_lp[tok[args[0]]] + np.log(np.exp(z).sum()) - value) <= TOL_ENGINE
        elif name == "logsumexp":
            got = np.log(np.exp(z).sum())
            assert abs(np.log(np.exp(eng_lp).sum())) <= TOL_ENGINE  # the engine's row is normalised
        elif name == "logp":
            got = twin_lp[tok[args[0]]]
            assert abs(eng_lp[tok[args[0]]] - value) <= TOL_ENGINE, (name, args)
        elif name in ("ablated_logsumexp", "ablated_logp"):
            mask = np.ones(len(rules.rules), dtype=bool)
            mask[idx[args[0]]] = False
            za = twin.logits(rules, seq, mask)[t]
            lse = np.log(np.exp(za).sum())
            if name == "ablated_logsumexp":
                got = lse
            else:
                got = za[tok[args[1]]] - lse
                eng = handmodel.HandModel(rules).log_probs(seq, mask)[t, tok[args[1]]]
                assert abs(eng - value) <= TOL_ENGINE, (name, args)
        else:
            raise AssertionError(f"unknown answer-sheet name {name!r}")
        assert abs(got - value) <= TOL_TWIN, f"{name}{tuple(args)}: doc says {value}, twin computes {got:.6f}"
        checked += 1
    assert checked >= 25
    # The sheet lists every non-zero entry of every contribution it mentions.
    for rid, toks in listed.items():
        assert set(np.flatnonzero(deltas[rid])) == toks, f"docs/rules.md omits a token written by {rid}"
    assert set(listed) | {"bigram.after_the", "head.prev"} == set(rules.rule_ids)


def test_skip_and_present_count_once(example):
    """The doc says a skip adds `next` once and a `present` entry counts once, however often the earlier
    token occurs, and that the current token is not 'earlier'."""
    _, vocab, rules, _, _, _ = example
    tok = {s: i for i, s in enumerate(vocab)}
    ids = rules.rule_ids
    once = np.array([tok[w] for w in ["<|endoftext|>", " cat", " cat", " cat", " dog"]], dtype=np.int32)
    d = {ids[i]: x for i, x, _ in twin.contributions(rules, once, 4)}
    assert d["skip.cat_dog"][tok[" ran"]] == 1.5
    head = next(r for r in rules.rules if r.kind == "head")
    mass = twin.attention(rules, head, once, 4)[once == tok[" the"]].sum()  # 0: no ' the'
    assert mass == 0 and d["neuron.chase"][tok[" ran"]] == pytest.approx(-1.0 + 1.0 + 1.0 + 0.5)
    dog_first = np.array([tok[" dog"]], dtype=np.int32)
    d = {ids[i]: x for i, x, _ in twin.contributions(rules, dog_first, 0)}
    assert "skip.cat_dog" not in d
    # the neuron: -1 + 1 (now ' dog'); the current dog is not present earlier -> act 0
    assert "neuron.chase" not in d
    lp = handmodel.HandModel(rules).log_probs(once)
    np.testing.assert_allclose(lp, twin.log_probs(rules, once), atol=TOL_ENGINE)


# -- the project's pages: no machine paths, links that resolve, commands that name real modules ----------
PAGES = ["README.md", "docs/*.md", "rules/README.md", "research/README.md", "benchmarks/README.md"]
# pages written on other branches of issue 19; once they are merged, delete this set


def _pages() -> list[Path]:
    return sorted({p for pat in PAGES for p in ROOT.glob(pat)})


def test_pages_name_no_machine_paths():
    for page in _pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not re.search(r"(?<![\w.])/(work|root|home|tmp)/", line), \
                f"{page.relative_to(ROOT)}:{n} names a machine path: {line.strip()[:100]}"


def test_page_links_and_commands_resolve():
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        where = page.relative_to(ROOT)
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"\w+://", link):
                continue
            target = (page.parent / link).resolve()
            assert target.exists(), f"{where} links to {link}, which does not exist"
        for mod in re.findall(r"python -m (research\.\w+|benchmarks(?:\.\w+)?|verify\.cli)", text):
            path = ROOT / mod.replace(".", "/")
            assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), \
                f"{where} runs `python -m {mod}`, which is not a module of this project"
        for script in re.findall(r"python ((?:benchmarks|research|rules)/\w+\.py)", text):
            assert (ROOT / script).exists(), f"{where} runs {script}, which does not exist"


def test_readme_is_a_front_page():
    """Issue 19: the README is a front page (history and findings live in research/README.md)."""
    assert len((ROOT / "README.md").read_bytes()) <= 8192
