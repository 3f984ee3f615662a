"""The integer symbols every predicate is written in: q (query index), k (key index), Sq, Sk (sequence lengths)."""

import sympy as sp

q, k, Sq, Sk = sp.symbols("q k Sq Sk", integer=True)
SYMBOLS = {"q": q, "k": k, "Sq": Sq, "Sk": Sk}
