"""The predicate language (attngen/expr.py): folding, canonical order, printing that parses back, sympy input that
means what the same text means, clear refusals, and a process that builds and plans patterns without sympy."""

import random
import subprocess
import sys
import textwrap

import pytest
import sympy as sp
import torch
from fuzzing import _NAMES, _predicate_text, _sides

import attngen as ag
from attngen import expr as X
from attngen.errors import InputError

q, k, Sq, Sk = ag.q, ag.k, ag.Sq, ag.Sk


def test_constant_comparisons_fold():
    assert (k <= k + 1) == X.TRUE and (q < q) == X.FALSE
    assert X.eq(q - k, q - k) == X.TRUE and X.ne(2 * q, q + q) == X.FALSE
    assert (X.TRUE & (k < q)) == (k < q) and ((k < q) & X.FALSE) == X.FALSE
    assert (X.FALSE | (k < q)) == (k < q) and ((k < q) | X.TRUE) == X.TRUE
    assert X.conj() == X.TRUE and X.disj() == X.FALSE


def test_junctions_are_flat_deduplicated_and_ordered():
    a, b, c = k < q, q < Sq, k >= 3
    assert (a & b) == (b & a) and ((a & b) & c) == (a & (b & c)) == X.conj(c, b, a)
    assert isinstance((a & b) & c, X.And) and len(((a & b) & c).args) == 3
    assert (a & a) == a and (a | (b | a)) == (a | b)
    assert hash(a & b) == hash(b & a)


def test_negation():
    assert ~(k < q) == (k >= q) and ~X.eq(q, k) == X.ne(q, k)
    assert ~~((k < q) | (q < 4)) == ((k < q) | (q < 4))
    assert ~X.TRUE == X.FALSE
    m = ag.predicate(~((k < q) | (q < 4))).mask(9, 9)
    assert torch.equal(m, ~ag.predicate((k < q) | (q < 4)).mask(9, 9))


def test_arithmetic_and_terms():
    assert (2 * q - q) == q and (q - q) == X.Expr.of(0) and (3 * (q + 1)) == (3 * q + 3)
    assert (q // 1) == q and (q % 1) == X.Expr.of(0) and (X.Expr.of(-7) // 2) == X.Expr.of(-4)
    assert ((2 * q) // 128) == (q // 64)  # one form for equal floor terms
    assert ((q / 2 + k / 3) // 4) == ((3 * q + 2 * k) // 24)
    assert (q // 64).gens() == {"q"} and (q + Sk - Sq).gens() == {"q", "Sk", "Sq"}


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: q * k, "multiplies two positions"),
        (lambda: q // k, "divisor"),
        (lambda: q % 0, "divisor"),
        (lambda: (q // 4) % 2, "nested"),
        (lambda: (q / 2) % 3, "integer coefficients"),
        (lambda: q / k, "nonzero constant"),
        (lambda: q < 1.5, "fractional"),
        (lambda: (k < q) & "x", "combine comparisons"),
    ],
)
def test_refusals_name_the_problem(build, message):
    with pytest.raises(InputError, match=message):
        build()


def test_comparisons_have_no_python_truth_value():
    with pytest.raises(TypeError, match="combine comparisons with"):
        bool(k < q)
    with pytest.raises(TypeError, match="chained"):
        _ = 0 <= q < 4  # the chain calls bool() on 0 <= q


@pytest.mark.parametrize("seed", range(150))
def test_printing_parses_back(seed):
    """str() of a predicate is text that `predicate` parses to the same value."""
    e = ag.predicate(_predicate_text(random.Random(seed), 2)).expr
    assert ag.predicate(str(e)).expr == e


@pytest.mark.parametrize("seed", range(100))
def test_sympy_input_means_the_same_as_text(seed):
    """A comparison given as text and as the sympy expression of the same text: equal masks (sympy may reorder or
    fold it, so the values need not be equal), including Sq != Sk and negative positions' floor semantics."""
    g = random.Random(5000 + seed)
    lhs, rhs = _sides(g)
    op = g.choice(["<", "<=", ">", ">=", "==", "!="])
    sympy_rel = {"<": sp.Lt, "<=": sp.Le, ">": sp.Gt, ">=": sp.Ge, "==": sp.Eq, "!=": sp.Ne}[op]
    e = sympy_rel(*(sp.sympify(t, locals=_NAMES) for t in (lhs, rhs)))
    text = f"{lhs} {op} {rhs}"
    Sq_, Sk_ = g.randint(1, 90), g.randint(1, 90)
    want = ag.predicate(text).mask(Sq_, Sk_)
    if e in (sp.true, sp.false):  # folded by sympy (say, Mod(x, 2) < 0), not necessarily by attngen
        assert bool((want == (e is sp.true)).all()), (text, e)
        return
    assert torch.equal(ag.predicate(e).mask(Sq_, Sk_), want), (text, e)


def test_sympy_symbols_by_name():
    qq, kk = sp.symbols("q k")  # no integer assumption: accepted by name
    assert ag.predicate(sp.Le(kk, qq)).expr == (k <= q)
    with pytest.raises(InputError, match="only q, k, Sq, Sk"):
        ag.predicate(sp.Le(sp.Symbol("x"), qq))


def test_patterns_are_built_and_planned_without_sympy():
    """sympy costs ~0.4 s of import: building and planning patterns (text predicates too) must not load it. (torch
    loads it for some of its own functions, such as torch.broadcast_shapes, which the reference masks use.)"""
    code = textwrap.dedent(
        """
        import sys
        import attngen as ag
        from attngen.plan import make_plan
        p = (ag.causal() & ag.sliding_window(300) | ag.predicate("q // 64 == k // 64")) & ~ag.global_tokens(4)
        p = p & ag.predicate((ag.k <= ag.q - 4) | (ag.q < ag.Sk)) & ag.in_document(ag.prefix_lm(8))
        make_plan(p.structure(), head_dim=64, dtype="fp16", arch="sm_90")
        print("sympy" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_truth_literals():
    assert torch.equal(ag.predicate("True").mask(5, 7), ag.full().mask(5, 7))
    assert not ag.predicate("(k < q) & False").mask(5, 7).any()
    with pytest.raises(InputError, match="truth value where a number"):
        ag.predicate("True + 1 < q")
