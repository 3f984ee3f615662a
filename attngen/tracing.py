"""Patterns built inside a function that torch.compile traces.

Dynamo cannot trace a pattern's construction (the registry that names structures, the checks of its arguments).
So while it traces, each public constructor and combinator of patterns runs for real instead, once per distinct
arguments, and the graph reads the pattern it built as a constant:
`ag.attention(q, k, v, ag.causal() & ag.sliding_window(256))` inside `forward` traces with fullgraph=True, and a
second call with the same arguments compiles nothing new.

Arguments must be plain values (ints, floats, strings, None) or patterns and scorers; a tensor argument (a block
layout's grid, which is data) is refused: such a pattern is built outside the compiled function and passed in. A
pattern passed in and combined inside is one object of the graph: another object (a new layout each step) builds
and compiles again, so a pattern that changes per call is best combined outside too.
Eager calls run the constructor directly (the only cost is one flag test)."""

from __future__ import annotations

import functools
import itertools
import weakref

import torch

from .errors import InputError


class _Built:
    """The patterns built at trace time, one attribute each: Dynamo reads one by name and guards on that one
    only (a dict would guard on its keys, so each new pattern would recompile every compiled function)."""


_BUILT = _Built()
_NAMES: dict = {}  # (constructor, args, kwargs) -> attribute of _BUILT
_CONSTRUCTORS: dict = {}  # qualified name -> the undecorated constructor

# Every pattern and scorer carries a name (`register`) by which traced code hands it to `_build`: Dynamo hands an
# assume-constant function only constants, some of its versions cannot hand over a frozen dataclass, and an int
# attribute of a graph input may be traced as a symbolic int. A string is always a constant.
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # name -> pattern or scorer
_NUMBERS = itertools.count()
_REF = "attngen.tracing.ref:"  # the names' prefix


def register(obj) -> None:
    """Name a new pattern or scorer (its `__post_init__` calls this; unpickled ones too, see `Numbered`)."""
    name = f"{_REF}{next(_NUMBERS)}"
    _LIVE[name] = obj
    object.__setattr__(obj, "_trace_ref", name)


class Numbered:
    """Base of patterns and scorers: a copy or an unpickled object gets a name of its own (names are per process
    and per object)."""

    def __getstate__(self) -> dict:
        return {name: value for name, value in vars(self).items() if name != "_trace_ref"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        register(self)


def _ref(value):
    return getattr(value, "_trace_ref", value)


def _deref(value):
    return _LIVE[value] if isinstance(value, str) and value.startswith(_REF) else value


def _build(constructor: str, *args, **kwargs) -> str:
    """Build a pattern for real (at trace time) and name it; the same arguments give the same name."""
    key = (constructor, args, tuple(sorted(kwargs.items())))
    name = _NAMES.get(key)
    if name is None:
        built = _CONSTRUCTORS[constructor](*map(_deref, args), **{k: _deref(v) for k, v in kwargs.items()})
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
        args, kwargs = tuple(map(_ref, args)), {k: _ref(v) for k, v in kwargs.items()}
        return getattr(_BUILT, _build(constructor, *args, **kwargs))

    return constructor_or_constant
