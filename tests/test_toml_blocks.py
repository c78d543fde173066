"""A big rule file is parsed block by block after an edit (handmodel/tomlblocks.py, rulefile._parse_cached): the
result is tomllib's parse of the whole text, edit after edit, or the whole file's own error; only changed
`[[kind]]` tables are handed to tomllib."""
from __future__ import annotations

import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handmodel import rulefile, tomlblocks
from handmodel.errors import UserError

PAD = "# " + "x" * 20_100 + "\n"  # over the parse cache's size threshold (smaller files are always parsed whole)

# Blocks: ordinary tables and every construct that makes the block view differ from the whole file's
BLOCKS = [
    '[[bigram]]\nid = "b{i}"\nnow = " the"\nnext = {{ " cat" = {x}, " dog" = -0.5 }}\n',
    '[[ bigram ]]  # spaced header, with a comment\nid = "s{i}"\nnext = {{ "a" = {x} }}\n',
    '[[neuron]]\nid = "n{i}"\nthreshold = {x}\n[neuron.attend]\nh = {{ "a" = 1.0 }}\n',
    '[[neuron]]\nid = "m{i}"\n[[neuron.parts]]\nw = {x}\n[[neuron.parts]]\nw = 2.0\n',
    '[[head_out]]\nid = "h{i}"\nnext = [\n  {x},\n  2.0,\n]\n\n# a trailing comment\n',
    '[[head_out]]\r\nid = "c{i}"\r\ncopy = {x}\r\n',
    '[[neuron.late]]\nw = {x}\n',  # appends to the last neuron, wherever it is: not a block of its own
    '[meta]\nnote = "{i}"\n',  # a top-level table inside the previous block
    '[[weights]]\nid = "w{i}"\ndoc = """multi\n[[bigram]]\nline"""\n',  # a header-like line inside a string
    '[[bigram]]\nid = "e{i}"\nnext = {{ "a" = }}\n',  # a syntax error
    '[[bigram]]\nid = "d{i}"\nid = "again"\n',  # a duplicate key
]
PREAMBLES = ['vocab = "9:abc"\ngroup = "g"\n', "", 'bigram = 1\n', '[[bigram]]\n']


def _parse(path, text):
    """(data, None) or (None, the error's line)."""
    try:
        return rulefile._parse_cached(path, text)[0], None
    except UserError as e:
        return None, str(e).split(":")[1]


def _whole(path, text):
    try:
        return rulefile._parse(path, text)[0], None
    except UserError as e:
        return None, str(e).split(":")[1]


@st.composite
def versions(draw):
    """A rule file and two edits of it: a number changed, a block dropped, doubled or added."""
    pre = draw(st.sampled_from(PREAMBLES))
    picks = draw(st.lists(st.tuples(st.integers(0, len(BLOCKS) - 1), st.integers(0, 9)), min_size=0, max_size=8))
    weights = [0.9 if k < 6 else 0.1 for k in range(len(BLOCKS))]
    picks = [(k, x) for k, x in picks if draw(st.floats(0, 1)) < weights[k]]
    out = []
    for _ in range(3):
        out.append(PAD + pre + "".join(BLOCKS[k].format(i=i, x=f"{x}.5") for i, (k, x) in enumerate(picks)))
        op = draw(st.sampled_from(["number", "drop", "double", "add"]))
        if op == "number" and picks:
            j = draw(st.integers(0, len(picks) - 1))
            picks[j] = (picks[j][0], picks[j][1] + 1)
        elif op == "drop" and picks:
            picks.pop(draw(st.integers(0, len(picks) - 1)))
        elif op == "double" and picks:
            j = draw(st.integers(0, len(picks) - 1))
            picks.insert(j, picks[j])
        else:
            picks.insert(draw(st.integers(0, len(picks))), (draw(st.integers(0, len(BLOCKS) - 1)), 0))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(vs=versions())
def test_block_parse_equals_the_whole_parse_edit_after_edit(tmp_path_factory, monkeypatch, vs):
    monkeypatch.setenv("HANDMODEL_CACHE", str(tmp_path_factory.mktemp("cache")))
    path = tmp_path_factory.mktemp("r") / "30_big.toml"
    for text in vs:
        rulefile._PARSED.clear()  # the disk path, as in a new process
        path.write_text(text)
        assert _parse(path, text) == _whole(path, text)


def test_an_edit_hands_only_the_changed_block_to_tomllib(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDMODEL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "30_big.toml"
    blocks = [BLOCKS[k % 3].format(i=i, x=f"{i}.25") for i, k in enumerate(range(40))]
    text = PAD + PREAMBLES[0] + "".join(blocks)
    rulefile._parse_cached(path, text)
    read = []
    real = tomllib.loads
    monkeypatch.setattr(rulefile.tomllib, "loads", lambda s: (read.append(s), real(s))[1])
    rulefile._PARSED.clear()
    blocks[17] = blocks[17].replace("17.25", "17.75")
    text = PAD + PREAMBLES[0] + "".join(blocks)
    got, ids = rulefile._parse_cached(path, text)
    monkeypatch.setattr(rulefile.tomllib, "loads", real)
    assert read == [blocks[17]]
    assert got == tomllib.loads(text) and ids == rulefile._id_lines(text)


def test_a_block_error_is_reported_at_its_line_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDMODEL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "30_big.toml"
    good = PAD + PREAMBLES[0] + "".join(BLOCKS[0].format(i=i, x="1.5") for i in range(30))
    rulefile._parse_cached(path, good)
    rulefile._PARSED.clear()
    bad = good.replace('id = "b20"', 'id = "b20"\nnext = { "a" = }')
    with pytest.raises(UserError) as e:
        rulefile._parse_cached(path, bad)
    line = bad[:bad.index('next = { "a" = }')].count("\n") + 1
    assert str(e.value).startswith(f"{path}:{line}:"), str(e.value)


@pytest.mark.parametrize("text, why", [
    ('x = 1\n[[a]]\ny = """\n[[b]]\n"""\n', "multi-line string"),
])
def test_split_refuses_what_it_cannot_cut_safely(text, why):
    assert tomlblocks.split(text) is None, why


def test_split_cuts_before_each_kind_header_only():
    text = 'vocab = "v"\n[[bigram]]\nid = "a"\n[bigram.x]\ny = 1\n[[neuron.parts]]\nw = 1\n[[ neuron ]] # c\nid = "b"\n'
    bl = tomlblocks.split(text)
    assert [b.kind for b in bl] == [None, "bigram", "neuron"]
    assert "".join(b.text for b in bl) == text and [b.line for b in bl] == [1, 2, 8]
