"""Patterns built inside a function that torch.compile traces (attngen.tracing): one graph with fullgraph=True, the
same result as eager, no recompiling for a second call, and a clear error for what cannot be built there."""

from __future__ import annotations

import pytest
import torch

import attngen as ag
from attngen import reference, tracing
from attngen.errors import InputError

# Each builds a pattern from plain values, as code inside a model's forward does.
BUILDERS = {
    "causal": lambda: ag.causal(),
    "window | global": lambda: ag.causal() & ag.sliding_window(5) | ag.global_tokens(2),
    "bottom right": lambda: ag.causal(align="bottom_right") & ag.local(3, 0),
    "prefix, predicate": lambda: ag.prefix_lm(3) | ag.predicate("(q - k) % 4 == 0"),
    "documents & padding": lambda: ag.documents() & ag.key_padding() & ag.causal(),
    "nm": lambda: ag.causal() & ag.nm(2, 4),
}
# Top-k by blocks or tokens and lsh choose on the GPU in passes that break the graph (torch.compiler.disable), built
# inside or not: these trace with fullgraph=False.
WITH_BREAKS = {
    "topk_blocks": lambda: ag.causal() & ag.topk_blocks(1),
    "topk lowrank": lambda: ag.causal() & ag.topk(4, scorer=ag.lowrank()),
    "threshold": lambda: ag.full() & ag.threshold(0.05),
}
RUNTIME = {
    "documents & padding": lambda: {
        "document_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]] * 2),
        "key_lengths": torch.tensor([11, 7]),
    },
    "topk lowrank": lambda: {"proj": ag.random_projection(32, 8)},
}


@pytest.mark.parametrize("name", [*BUILDERS, *WITH_BREAKS])
def test_a_pattern_built_inside_traces(name, reference_kernels):
    """With fullgraph=True (False for rules that break the graph anyway): the result of eager, and the pattern that
    eager builds; a second call compiles nothing new."""
    from torch._dynamo.testing import CompileCounter

    build = BUILDERS.get(name) or WITH_BREAKS[name]
    runtime = RUNTIME.get(name, dict)()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 11, 32, generator=gen).to(torch.bfloat16) for _ in range(3))

    def forward(q, k, v, runtime):
        return ag.attention(q, k, v, build(), **runtime)

    counter = CompileCounter()
    compiled = torch.compile(forward, fullgraph=name in BUILDERS, backend=counter)
    out = compiled(q, k, v, runtime)
    frames = counter.frame_count
    again = compiled(q, k, v, runtime)
    assert counter.frame_count == frames, "a second call with the same arguments recompiled"
    assert [c.pattern for c in reference_kernels.calls[:2]] == [build().structure()] * 2  # what the graph ran
    assert torch.equal(out, again)
    assert torch.allclose(out, forward(q, k, v, runtime), atol=1e-2)
    if name in BUILDERS and name != "nm":  # a selection rule's choice is checked where the rule is tested
        want, _ = reference.attention(q, k, v, build(), dtype=torch.float64, **runtime)
        assert (out.double() - want).abs().max() < 2e-2


def test_arguments_from_the_graph_make_one_pattern_each(reference_kernels):
    """A constructor's arguments are constants of the graph: other values are other patterns, each built once."""
    from torch._dynamo.testing import CompileCounter

    q, k, v = (torch.randn(1, 2, 16, 32).to(torch.float16) for _ in range(3))

    def forward(q, k, v, window: int):
        return ag.attention(q, k, v, ag.causal() & ag.sliding_window(window))

    counter = CompileCounter()
    compiled = torch.compile(forward, fullgraph=True, backend=counter, dynamic=False)
    for window in (3, 5, 3):
        want, _ = reference.attention(q, k, v, ag.causal() & ag.sliding_window(window), dtype=torch.float64)
        assert (compiled(q, k, v, window).double() - want).abs().max() < 1e-2
    assert counter.frame_count == 2
    assert [repr(c.pattern) for c in reference_kernels.calls] == [f"causal() & sliding_window({w})" for w in (3, 5, 3)]


def test_a_pattern_from_outside_combines_inside(reference_kernels):
    """A layout pattern passed in and combined inside: each new layout object is built and compiled again (its
    grid is never taken from an earlier call); the same object again compiles nothing."""
    from torch._dynamo.testing import CompileCounter

    def forward(q, k, v, layout):
        return ag.attention(q, k, v, layout & ag.causal())

    q, k, v = (torch.randn(1, 2, 16, 32).to(torch.float16) for _ in range(3))
    counter = CompileCounter()
    compiled = torch.compile(forward, fullgraph=True, backend=counter)
    first = ag.block_layout(torch.tensor([[True, False], [True, True]]), 8)
    second = ag.block_layout(torch.tensor([[True, False], [False, True]]), 8)
    for layout, frames in ((first, 1), (second, 2), (first, 2)):
        want, _ = reference.attention(q, k, v, layout & ag.causal(), dtype=torch.float64)
        assert (compiled(q, k, v, layout).double() - want).abs().max() < 1e-2
        assert counter.frame_count == frames


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin:UserWarning")  # the eager fallback
def test_a_layout_built_inside_is_refused_or_built_eagerly(reference_kernels):
    """A block layout's grid is data: built inside, its values would be frozen into the graph. With fullgraph=True
    that is an error naming the way out; without, the graph breaks there and the layout is built eagerly. A
    constructor's own checks run at trace time and say what is wrong."""

    def forward(q, k, v, grid):
        return ag.attention(q, k, v, ag.block_layout(grid, 8) & ag.causal())

    q, k, v = (torch.randn(1, 2, 16, 32).to(torch.float16) for _ in range(3))
    with pytest.raises(Exception, match=r"block_layout\(\) with a tensor argument.*outside the compiled function"):
        torch.compile(forward, fullgraph=True, backend="eager")(q, k, v, torch.tensor([[True, False], [True, True]]))
    compiled = torch.compile(forward, backend="eager")
    for grid in ([[True, False], [True, True]], [[False, False], [True, False]]):
        grid = torch.tensor(grid)
        want, _ = reference.attention(q, k, v, ag.block_layout(grid, 8) & ag.causal(), dtype=torch.float64)
        assert (compiled(q, k, v, grid).double() - want).abs().max() < 1e-2
    with pytest.raises(Exception, match="InputError: window must be an integer from 1"):
        torch.compile(lambda q: ag.attention(q, q, q, ag.sliding_window(0)), fullgraph=True, backend="eager")(q)


def test_the_marker_is_what_assume_constant_result_sets():
    """tracing._build is marked by hand (the decorator would import torch._dynamo): the decorator must still set
    exactly that."""

    def fn():
        return 0

    before = set(vars(fn))
    torch.compiler.assume_constant_result(fn)
    assert set(vars(fn)) - before == {"_dynamo_marked_constant"} and fn._dynamo_marked_constant is True
    assert tracing._build._dynamo_marked_constant is True


def test_eager_construction_is_unchanged():
    """Outside tracing a constructor runs directly: no pattern is kept by attngen.tracing."""
    names = dict(tracing._NAMES)
    assert repr(ag.causal() & ag.sliding_window(7)) == "causal() & sliding_window(7)"
    with pytest.raises(InputError, match="window must be an integer"):
        ag.sliding_window(-1)
    assert tracing._NAMES == names


def test_score_modifications_built_inside(reference_kernels):
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])

    def forward(q, k, v, bias, table):
        mods = (ag.softcap(20.0), ag.alibi(slopes), ag.rel_bias(8, 16), ag.bias())
        return ag.attention(q, k, v, ag.causal(), score_mod=mods, bias=bias, rel_table=table)

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 12, 32, generator=gen).to(torch.float16) for _ in range(3))
    bias, table = torch.randn(1, 1, 12, 12, generator=gen), torch.randn(4, 8, generator=gen)
    out = torch.compile(forward, fullgraph=True, backend="eager")(q, k, v, bias, table)
    assert torch.allclose(out, forward(q, k, v, bias, table), atol=1e-3)
