"""// and % by positive integer constants in predicates: Python semantics in the reference (negative operands too),
C lowering (truncating / and %) against the reference, sound tile classification, and refusals."""

import random

import numpy as np
import pytest
import sympy as sp
import torch
from test_lower import Case, check, eval_c, plan_of
from test_schedule import _check, _truth

import attngen as ag
from attngen import affine
from attngen import expr as X
from attngen.errors import InputError

q, k, Sq, Sk = sp.symbols("q k Sq Sk", integer=True)  # the random predicates here are given as sympy


# ------------------------------------------------------------------------------------ reference semantics


@pytest.mark.parametrize("c", [1, 2, 3, 7, 64])
def test_reference_is_python_floor_and_mod_for_negative_operands(c):
    """Each term's value is put in k, and `term == k` must hold everywhere."""
    xs = torch.arange(-200, 201)
    want_div = torch.tensor([x // c for x in range(-200, 201)])
    want_mod = torch.tensor([x % c for x in range(-200, 201)])
    want_ceil = torch.tensor([-(-x // c) for x in range(-200, 201)])

    def holds(e, **env) -> bool:
        return bool(torch.as_tensor(affine.evaluate(e, env)).all())

    assert holds(X.eq((X.q - 100) // c, X.k), q=xs + 100, k=want_div)
    assert holds(X.eq(X.q % c, X.k), q=xs, k=want_mod)
    assert holds(X.eq(X.from_sympy(sp.ceiling(q / c)), X.k), q=xs, k=want_ceil)  # ceiling(a) = -floor(-a)
    assert not holds(X.eq(X.q % c, X.k), q=xs, k=want_mod + 1)
    assert affine.evaluate(X.eq(X.Sq // c, -37 // c), {"Sq": -37}) is True  # plain ints too
    assert affine.evaluate(X.eq(X.Sq % c, -37 % c), {"Sq": -37}) is True


def test_reference_masks():
    m = ag.predicate("(q - k) % 4 == 0").mask(12, 12)[0, 0]
    qi, ki = torch.arange(12).view(-1, 1), torch.arange(12).view(1, -1)
    assert torch.equal(m, (qi - ki) % 4 == 0)
    m = ag.predicate("(k - q - 5) // 8 >= -1").mask(40, 40)[0, 0]
    qi, ki = torch.arange(40).view(-1, 1), torch.arange(40).view(1, -1)
    assert torch.equal(m, torch.div(ki - qi - 5, 8, rounding_mode="floor") >= -1)
    qi, ki = torch.arange(200).view(-1, 1), torch.arange(200).view(1, -1)
    assert torch.equal(ag.predicate("(q // 64) == (k // 64)").mask(200, 200)[0, 0], qi // 64 == ki // 64)


# --------------------------------------------------------------------------------------- C translator


@pytest.mark.parametrize(
    "text,value",
    [("-7 % 2 == -1", True), ("7 % -2 == 1", True), ("7 % 3 == 1", True), ("-7 / 2 * 2 + -7 % 2 == -7", True)],
)
def test_translator_remainder_truncates(text, value):
    assert bool(eval_c(text, {})) is value


@pytest.mark.parametrize("c", [1, 2, 3, 5, 64])
def test_lowered_terms_match_python_on_negative_operands(c):
    x = torch.arange(-300, 301)
    for kind, want in (("floor", [v // c for v in x.tolist()]), ("mod", [v % c for v in x.tolist()])):
        text = affine._term_c(affine.Term(kind, (1, 0, 0, 0), -300, c))
        got = [int(v) for v in range(601) if bool(eval_c(f"{text} == {want[v]}", {"q": v}))]
        assert got == list(range(601)), (kind, c, text)


# ------------------------------------------------------------------------------------ random predicates


def _affine(rng: random.Random) -> sp.Expr:
    a, b, c, d = (rng.choice([-2, -1, 0, 0, 1, 1, 2]) for _ in range(4))
    return a * q + b * k + c * Sq + d * Sk + rng.randint(-70, 70)


def _term(rng: random.Random) -> sp.Expr:
    x, c = _affine(rng), rng.choice([1, 2, 3, 4, 7, 8, 16, 64, 100])
    return sp.floor(x / c) if rng.random() < 0.5 else sp.Mod(x, c)


def _atom(rng: random.Random) -> sp.Basic:
    lhs = sum((rng.choice([-2, -1, 1, 1, 3]) * _term(rng) for _ in range(rng.randint(1, 2))), sp.Integer(0))
    rhs = _term(rng) if rng.random() < 0.4 else _affine(rng) if rng.random() < 0.5 else sp.Integer(rng.randint(-3, 5))
    return rng.choice([sp.Lt, sp.Le, sp.Gt, sp.Ge, sp.Eq, sp.Ne])(lhs, rhs)


def _predicate(rng: random.Random, depth: int = 2) -> sp.Basic:
    if depth == 0 or rng.random() < 0.4:
        return _atom(rng)
    a, b = _predicate(rng, depth - 1), _predicate(rng, depth - 1)
    return rng.choice([lambda: a & b, lambda: a | b, lambda: ~a])()


def _random_pattern(seed: int) -> tuple[ag.Pattern, random.Random]:
    rng = random.Random(77_000 + seed)
    while True:
        e = _predicate(rng)
        if e not in (sp.true, sp.false):
            return ag.predicate(e), rng


_TEXTS = [
    "(q // 64) == (k // 64)",
    "(q - k) % 4 == 0",
    "k % 2 == 0",
    "q // 8 >= k // 8",
    "(k - q) // 16 >= -2",
    "((q - k + 3) % 7 != 2) & (k <= q)",
    "(q // 32 - k // 32 <= 1) and (k // 32 <= q // 32) or (k % 64 == 0)",
    "2 * ((Sk - Sq + q - k) % 5) >= (Sq - q) // 3",
    "(-q) // 4 < (k - 1000) % 9 - 3",
]


@pytest.mark.parametrize("text", _TEXTS)
def test_examples_lower_exactly(text):
    pat = ag.predicate(text)
    plan = plan_of(pat)
    assert plan.branch_free and "?" not in plan.keep_c
    for Sq_, Sk_ in ((1, 1), (63, 65), (200, 129), (300, 300)):
        check(Case(text, pat, Sq_, Sk_))


@pytest.mark.parametrize("seed", range(120))
def test_random_modular_predicates_lower_exactly(seed):
    pat, rng = _random_pattern(seed)
    check(Case(seed, pat, rng.randint(1, 300), rng.randint(1, 300)))


TILE_SIZES = [1, 2, 3, 7, 16, 64]


@pytest.mark.parametrize("seed", range(200))
def test_random_modular_tile_classes_are_sound(seed):
    pat, rng = _random_pattern(seed)
    _check(pat, rng.choice(TILE_SIZES), rng.choice(TILE_SIZES), rng.randint(1, 150), rng.randint(1, 150))


@pytest.mark.parametrize("text", _TEXTS)
@pytest.mark.parametrize("bm,bn,S", [(16, 16, 130), (64, 32, 200), (7, 3, 97), (128, 64, 500)])
def test_example_tile_classes_are_sound(text, bm, bn, S):
    _check(ag.predicate(text), bm, bn, S, S + 11)


@pytest.mark.parametrize("B", [8, 32, 64, 100])
@pytest.mark.parametrize("bm,bn", [(16, 16), (64, 64), (32, 128), (7, 5)])
def test_block_diagonal_skips_empty_tiles(B, bm, bn):
    """(q // B) == (k // B): tiles whose q and k ranges lie in different B-blocks are EMPTY, those within one block
    FULL; classification is exact here."""
    S = 333
    pat = ag.predicate(f"(q // {B}) == (k // {B})")
    cls = torch.from_numpy(affine.classes(pat.expr, bm, bn, S, S))
    every, some = _truth(pat.mask(S, S), bm, bn)
    every, some = every[0, 0], some[0, 0]
    assert bool((cls == affine.EMPTY).any())
    assert torch.equal(cls == affine.EMPTY, ~some)
    assert torch.equal(cls == affine.FULL, every)
    _check(pat, bm, bn, S, S, exact=True)


def test_floor_bounds_use_monotonicity():
    """q // 8 >= k // 8 (block-causal): tiles inside 8-blocks are classified exactly."""
    pat = ag.predicate("q // 8 >= k // 8")
    _check(pat, 8, 8, 80, 80, exact=True)
    _check(pat, 4, 8, 80, 80, exact=True)
    cls = affine.classes(pat.expr, 8, 8, 80, 80)
    assert (np.tril(np.ones((10, 10))) == (cls == affine.FULL)).all()


def test_partial_share_and_planner():
    plan = plan_of(ag.predicate("(q // 64) == (k // 64)") & ag.causal())
    assert plan.branch_free
    assert "%" in plan.keep_c and "LL" in plan.keep_c


def test_sympy_input():
    e = sp.Eq(sp.floor(q / 64), sp.floor(k / 64)) & sp.Eq(sp.Mod(q - k, 2), 0)
    check(Case("sympy", ag.predicate(e), 150, 170))
    check(Case("ceiling", ag.predicate(sp.Ge(sp.ceiling((q - k) / 5), -3)), 90, 90))
    check(Case("rational floor", ag.predicate(sp.Le(sp.floor(q / 6 + k / 4), 20)), 90, 90))


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "text",
    [
        "q // k == 0",
        "q % k == 0",
        "q // 0 == 0",
        "q % 0 == 0",
        "q // -4 == 0",
        "q % (-3) == 0",
        "q // Sq == 1",
        "q // 2.5 == 0",
        "q % 1.0 == 0",
        "q / 4 == 0",
        "q / k == 0",
        "(q // 64) % 2 == 0",
        "(q % 64) // 2 == 0",
        "(q // 4) * (k // 4) == 0",
        "q * (k % 4) == 0",
        "q // (2**31) == 0",
        f"q % {2**30 + 1} == 0",
        "(q < k) // 2 == 0",
    ],
)
def test_refused_strings(text):
    with pytest.raises(InputError):
        ag.predicate(text)


@pytest.mark.parametrize(
    "e",
    [
        sp.Eq(sp.Mod(q, k), 0),
        sp.Eq(sp.Mod(q, sp.Rational(3, 2)), 0),
        sp.Ge(sp.Mod(q, -4), -2),
        sp.Eq(sp.floor(q / k), 0),
        sp.Eq(sp.floor(q * k / 4), 0),
        sp.Eq(sp.Mod(sp.floor(q / 4), 2), 0),
        sp.Eq(sp.Mod(q / 2, 3), 0),
        sp.Eq(sp.floor(q / (2**31)), 0),
        sp.Eq(sp.floor(q / 4) * sp.floor(k / 4), 0),
        sp.Eq(sp.floor(q / 4) ** 2, 0),
        sp.Eq(sp.floor(sp.Float(2.5) * q), 0),
    ],
    ids=str,
)
def test_refused_sympy(e):
    with pytest.raises(InputError):
        ag.predicate(e)


def test_accepted_strings_allow_constant_expressions_as_divisors():
    assert ag.predicate("q // (2 * 32) == k // 64").expr == X.from_sympy(sp.Eq(sp.floor(q / 64), sp.floor(k / 64)))
    assert ag.predicate("(2 * q) // 128 == k // 64").expr == ag.predicate("q // 64 == k // 64").expr
    ag.predicate(f"q % {2**30} == k")
