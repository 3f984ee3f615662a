"""Selection rules: which of the keys a pattern allows are kept, by score or by data computed at call time.

A plan carries its rule as a frozen `Selection` (the rule's name and parameters, the template that implements its
kernel hook, the knobs it sets, its run-time arguments); `NONE` for a purely positional pattern. A rule is a
`pattern.Selector` leaf plus one module here (reference semantics, plan knobs, call-time preparation) and one
template under `templates/select/`. Every kernel calls the rule's hook on every visited tile, after the position
mask; `templates/select/none.cuh.j2` is the hook of `NONE` and documents the interface."""

from __future__ import annotations

from dataclasses import dataclass

from ..abi import RuntimeArg
from ..errors import InputError
from ..pattern import (
    And,
    KeyIndices,
    Pattern,
    SelectedBlocks,
    SelectedKeys,
    Selector,
    TopkBlocks,
    TopkTokens,
    full,
)


@dataclass(frozen=True)
class Selection:
    """A plan's selection rule, as the kernels see it."""

    rule: str = "none"
    params: tuple[tuple[str, object], ...] = ()  # (name, value) pairs, printed and rendered
    template: str = "select/none.cuh.j2"  # defines the `Select` hook the kernels call
    sparse_pv: bool = False  # P·V runs on sparse tensor cores (the rule keeps a fixed share of every key group)
    runtime_args: tuple[RuntimeArg, ...] = ()  # appended to the pattern's run-time arguments

    def param(self, name: str) -> object:
        """The value of parameter `name` (templates read their rule's parameters this way)."""
        return dict(self.params)[name]

    def __str__(self) -> str:
        if self.rule == "none":
            return "none (every allowed key is kept)"
        params = ", ".join(f"{k}={v!r}" for k, v in self.params)
        pv = "sparse" if self.sparse_pv else "dense"
        return f"{self.rule}({params}), hook {self.template}, {pv} P·V"


NONE = Selection()

SUPPORTED = "a selection rule on its own, or `A & rule` where A is a pattern without selection rules"


def split_selection(pat: Pattern) -> tuple[Pattern, Selector | None]:
    """(the positional part, the selection rule or None) of `pat`, refusing compositions no kernel supports. A
    `topk_blocks` leaf is positional for the kernels (a call-time grid of key blocks) and stays in the first."""
    _check_topk(pat)
    if isinstance(pat, Selector):
        return full(), pat
    rules = [p for p in pat.parts if isinstance(p, Selector)] if isinstance(pat, And) else []
    rest = [p for p in pat.parts if not isinstance(p, Selector)] if isinstance(pat, And) else [pat]
    if len(rules) > 1:
        raise InputError(f"{pat!r} has {len(rules)} selection rules; supported: {SUPPORTED}")
    if any(isinstance(leaf, Selector) for p in rest for leaf in p.leaves()):
        raise InputError(f"{pat!r} nests a selection rule inside | or ~; supported: {SUPPORTED}")
    if pat.reorders and "key_indices" in pat.runtime_inputs:
        raise InputError(
            f"{pat!r} combines key_indices() with buckets, lsh or keep masks, which run on tokens sorted by bucket; "
            "key_indices() composes with the positional leaves (causal, windows, documents, ...)"
        )
    if not rules:
        return pat, None
    if pat.reorders:
        raise InputError(
            f"{pat!r} combines a selection rule with buckets, lsh or keep masks, which run on tokens sorted by "
            f"bucket; supported: {SUPPORTED}"
        )
    positions = rest[0] if len(rest) == 1 else And(tuple(rest))
    return positions, rules[0]


def selection_of(pat: Pattern) -> Selection:
    """The `Selection` a plan of `pat` carries."""
    _, rule = split_selection(pat)
    return NONE if rule is None else rule.selection()


def _check_topk(pat: Pattern) -> None:
    """Refuse what top-k leaves do not combine with: a second top-k leaf (by blocks or tokens), key_indices()
    beside a top-k by token (both are key-index lists), a selection rule, reordering."""
    tokens = [leaf for leaf in pat.leaves() if isinstance(leaf, (TopkTokens, SelectedKeys))]
    if tokens:
        supported = "one topk(k) leaf, under & and | with positional leaves (causal, windows, documents, ...)"
        others = [
            leaf
            for leaf in pat.leaves()
            if isinstance(leaf, (TopkBlocks, SelectedBlocks, KeyIndices)) and not isinstance(leaf, SelectedKeys)
        ]
        if len(tokens) > 1 or others:
            raise InputError(
                f"{pat!r} combines topk(k) with another top-k or key_indices() leaf; supported: {supported}"
            )
        if any(isinstance(leaf, Selector) for leaf in pat.leaves()):
            raise InputError(f"{pat!r} combines topk(k) with a selection rule; supported: {supported}")
        if pat.reorders:
            raise InputError(f"{pat!r} combines topk(k) with buckets, lsh or keep masks; supported: {supported}")
    found = [leaf for leaf in pat.leaves() if isinstance(leaf, (TopkBlocks, SelectedBlocks))]
    if not found:
        return
    supported = "one topk_blocks leaf, under & and | with positional leaves (causal, windows, documents, ...)"
    if len(found) > 1:
        raise InputError(f"{pat!r} has {len(found)} topk_blocks leaves; supported: {supported}")
    if any(isinstance(leaf, Selector) for leaf in pat.leaves()):
        raise InputError(f"{pat!r} combines topk_blocks with another selection rule; supported: {supported}")
    if pat.reorders:
        raise InputError(f"{pat!r} combines topk_blocks with buckets, lsh or keep masks; supported: {supported}")
