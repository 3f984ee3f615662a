"""The DSL: construction, printing, hashing, algebra, reference masks, safe predicate parsing, bad input."""

import pytest
import torch

import attngen as ag
from attngen import InputError


def _grid(Sq, Sk):
    return torch.arange(Sq).view(-1, 1), torch.arange(Sk).view(1, -1)


@pytest.mark.parametrize(
    "pat,rule",
    [
        (ag.full(), lambda i, j, Sq, Sk: torch.ones_like(i - j, dtype=torch.bool)),
        (ag.causal(), lambda i, j, Sq, Sk: j <= i),
        (ag.causal(align="bottom_right"), lambda i, j, Sq, Sk: j <= i + Sk - Sq),
        (ag.sliding_window(5), lambda i, j, Sq, Sk: (j <= i) & (j > i - 5)),
        (ag.local(3, 2), lambda i, j, Sq, Sk: (j >= i - 3) & (j <= i + 2)),
        (ag.prefix_lm(7), lambda i, j, Sq, Sk: (j < 7) | (j <= i)),
        (ag.global_tokens(4), lambda i, j, Sq, Sk: (j < 4) | (i < 4)),
        (ag.predicate("2*k <= q + 5 or k >= Sk - 3"), lambda i, j, Sq, Sk: (2 * j <= i + 5) | (j >= Sk - 3)),
    ],
)
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (13, 13), (9, 30), (30, 9)])
def test_affine_masks(pat, rule, Sq, Sk):
    i, j = _grid(Sq, Sk)
    expect = rule(i, j, Sq, Sk).expand(Sq, Sk)
    assert torch.equal(pat.mask(Sq, Sk)[0, 0], expect)


def test_combinators_follow_boolean_algebra():
    a, b, c = ag.causal(), ag.sliding_window(4), ag.global_tokens(2)
    m = lambda p: p.mask(20, 20)
    assert torch.equal(m(a & b | c), (m(a) & m(b)) | m(c))
    assert torch.equal(m(~(a | c)), ~m(a) & ~m(c))
    assert torch.equal(m(~~a), m(a))
    assert (a & b & c).parts == (a, b, c)  # flattened


def test_printing_is_the_expression():
    pat = ag.causal() & ag.sliding_window(1024) | ag.global_tokens(16)
    assert repr(pat) == "causal() & sliding_window(1024) | global_tokens(16)"
    assert repr(ag.causal() & (ag.local(1, 2) | ~ag.prefix_lm(3))) == "causal() & (local(1, 2) | ~prefix_lm(3))"
    assert repr(ag.causal(align="bottom_right")) == "causal(align='bottom_right')"


def test_hashable_and_equal_by_value():
    assert ag.causal() & ag.sliding_window(8) == ag.causal() & ag.sliding_window(8)
    assert len({ag.causal(), ag.causal(), ag.sliding_window(3)}) == 2
    lay = torch.rand(4, 4) < 0.5
    assert ag.block_layout(lay, 16) == ag.block_layout(lay.clone(), 16)
    assert ag.block_layout(lay, 16) != ag.block_layout(~lay, 16)


def test_block_layout_mask():
    lay = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    m = ag.block_layout(lay, 4).mask(7, 10)[0, 0]
    i, j = _grid(7, 10)
    assert torch.equal(m, lay[i // 4, j // 4])
    per_head = torch.stack([lay, ~lay])
    assert torch.equal(ag.block_layout(per_head, 4).mask(7, 10)[0, 1], ~lay[i // 4, j // 4])
    with pytest.raises(InputError, match="does not cover"):
        ag.block_layout(lay, 4).mask(7, 13)


def test_runtime_masks():
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    m = ag.documents().mask(5, 5, document_ids=ids)
    assert torch.equal(m[:, 0], ids[:, :, None] == ids[:, None, :])
    lens = torch.tensor([0, 3])
    m = ag.key_padding().mask(4, 5, key_lengths=lens)
    assert not m[0].any() and m[1, 0, :, :3].all() and not m[1, 0, :, 3:].any()
    assert ag.documents().runtime_inputs == {"document_ids"}
    with pytest.raises(InputError, match="document_ids"):
        ag.documents().mask(5, 5)
    with pytest.raises(InputError, match="query_ids, key_ids"):
        ag.documents().mask(5, 6, document_ids=ids)


@pytest.mark.parametrize(
    "text",
    ["__import__('os')", "q.real > 0", "k[0] < 1", "(lambda: 1)()", "x < 3", "q ** 2 > k", "q / 2 > k", "'a' < 'b'"],
)
def test_predicate_parser_rejects_anything_else(text):
    with pytest.raises(InputError):
        ag.predicate(text)


def test_predicate_must_be_affine():
    with pytest.raises(InputError, match="affine"):
        ag.predicate(ag.q * ag.k > 3)
    assert torch.equal(ag.predicate(ag.k <= ag.q).mask(6, 6), ag.causal().mask(6, 6))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ag.sliding_window(0), "window"),
        (lambda: ag.sliding_window(2.5), "window"),
        (lambda: ag.causal(align="center"), "align"),
        (lambda: ag.block_layout(torch.ones(3), 4), "2-d"),
        (lambda: ag.causal() & 3, "combine"),
    ],
)
def test_bad_constructor_input(make, match):
    with pytest.raises((InputError, TypeError), match=match):
        make()


def test_an_unpickled_pattern_is_named_in_its_new_process():
    """A pattern pickled in one process (spawned workers receive their arguments so) names its structure in the
    registry of the process that loads it: there the pickling process's name may stand for another structure,
    whose kernels would run in its place."""
    import pickle
    import subprocess
    import sys

    layout = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    pats = [ag.causal() & ag.sliding_window(64), ag.block_layout(layout, 64) | ag.prefix_lm(3), ag.documents()]
    script = (
        "import pickle, sys, attngen as ag\n"
        "from attngen import pattern as P\n"
        "[ag.full(), ag.sliding_window(5), ag.causal() & ag.prefix_lm(9)]  # other structures take the first names\n"
        "for p in pickle.loads(sys.stdin.buffer.read()):\n"
        "    assert P.by_key(p.key) == p.structure() and p.leaves() and p.key == p.structure().key, repr(p)\n"
        "    print(p.key, repr(p))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(pats), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    lines = run.stdout.decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [repr(p) for p in pats]
    assert [line.split(" ", 1)[0] for line in lines] != [p.key for p in pats]  # other names there, rightly
