"""Patterns built inside a function that torch.compile traces.

Dynamo cannot trace a pattern's construction (sympy, and the registry that names structures). So while it traces,
each public constructor and combinator of patterns runs for real instead, once per distinct arguments, and the
graph reads the pattern it built as a constant: `ag.attention(q, k, v, ag.causal() & ag.sliding_window(256))`
inside `forward` traces with fullgraph=True, and a second call with the same arguments compiles nothing new.

Arguments must be plain values (ints, floats, strings, None) or patterns and scorers; a tensor argument (a block
layout's grid, which is data) is refused: such a pattern is built outside the compiled function and passed in.
Eager calls run the constructor directly (the only cost is one flag test)."""

from __future__ import annotations

import functools

import torch

from .errors import InputError


class _Built:
    """The patterns built at trace time, one attribute each: Dynamo reads one by name and guards on that one
    only (a dict would guard on its keys, so each new pattern would recompile every compiled function)."""


_BUILT = _Built()
_NAMES: dict = {}  # (constructor, args, kwargs) -> attribute of _BUILT
_CONSTRUCTORS: dict = {}  # qualified name -> the undecorated constructor


def _build(constructor: str, *args, **kwargs) -> str:
    """Build a pattern for real (at trace time) and name it; the same arguments give the same name."""
    key = (constructor, args, tuple(sorted(kwargs.items())))
    name = _NAMES.get(key)
    if name is None:
        built = _CONSTRUCTORS[constructor](*args, **kwargs)
        name = f"p{len(_NAMES)}"
        setattr(_BUILT, name, built)
        _NAMES[key] = name
    return name


# What torch.compiler.assume_constant_result(_build) sets: Dynamo then calls _build with the real argument values
# and folds its result (a str) into the graph. The decorator itself imports torch._dynamo (~0.7 s), which an eager
# program should not pay for (tests/test_tracing.py checks that the decorator still sets only this).
_build._dynamo_marked_constant = True


def built_when_traced(fn):
    """Decorator for a pattern constructor or combinator: under torch.compile's tracing, run `fn` for real and read
    its result as a constant (see the module's text)."""
    constructor = f"{fn.__module__}.{fn.__qualname__}"  # read here: Dynamo would trace the attribute reads
    _CONSTRUCTORS[constructor] = fn

    @functools.wraps(fn)
    def constructor_or_constant(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                raise InputError(
                    f"{fn.__name__}() with a tensor argument inside a function torch.compile traces: its values "
                    "would be frozen into the graph. Build the pattern outside the compiled function and pass it in"
                )
        return getattr(_BUILT, _build(constructor, *args, **kwargs))

    return constructor_or_constant
