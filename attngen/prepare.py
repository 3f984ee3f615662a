"""Call-time stage, before scheduling: check and normalise the run-time tensors a call needs, and run a selection
rule's pre-passes. -> Prepared, the tensors the kernels read beyond q, k, v, in the plan's argument order.

A `Prepared` travels through the custom op as one list of tensors (`tensors()` / `from_tensors`), so the op's
signature does not grow with each rule: block-layout grids (uint8 [LH, nbq, nbk], one per layout slot), a block
top-k selection (uint8 [B, Hq, nbq, nbk], `blockselect`), document ids (int32 [B', Sq], [B', Sk]), key lengths
(int32 [B]), key-index lists as bits (int32 [B, H', Sq, ceil(Sk / 32)], `keyindex`), sorted and with their
lengths, a reordering pattern's sorted tokens (`reorder.Route`), then whatever the rule's `prepare` returns."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch

from . import keyindex, schedule, scoremod, tokentopk
from . import pattern as P
from .errors import InputError
from .plan import KernelPlan
from .reorder import Permutation, Route, route
from .select import split_selection


@dataclass(frozen=True, eq=False)
class Prepared:
    layouts: tuple[torch.Tensor, ...] = ()
    blocks: torch.Tensor | None = None  # a topk_blocks leaf's selection, uint8 [B, Hq, nbq, nbk] (blockselect)
    document_ids: tuple[torch.Tensor, ...] | None = None  # query, key ids; in_document(): their offsets
    key_lengths: torch.Tensor | None = None
    key_bits: torch.Tensor | None = None  # a key_indices() leaf's lists as bits, int32 [B, H', Sq, ceil(Sk / 32)]
    key_lists: torch.Tensor | None = None  # the lists sorted, distinct, then -1: int32 [B, H', Sq, n]
    key_counts: torch.Tensor | None = None  # their lengths, int32 [B, H', Sq] (keyindex.sorted_lists)
    route: Route | None = None  # a reordering pattern's sorted tokens
    rule: tuple[torch.Tensor, ...] = ()  # the selection rule's tensors, in its run-time argument order
    permutation: Permutation | None = None  # how q, k, v move into the route's order and back (not a kernel input)
    score_mod: tuple[torch.Tensor, ...] = ()  # the score modifications' tensors (scoremod.kernel_tensors)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the kernels read, in ABI order."""
        docs = list(self.document_ids or ())
        lengths = [] if self.key_lengths is None else [self.key_lengths]
        listed = [] if self.key_bits is None else [self.key_bits, self.key_lists, self.key_counts]
        routed = [] if self.route is None else self.route.tensors()
        blocks = [] if self.blocks is None else [self.blocks]
        return [*self.layouts, *blocks, *docs, *lengths, *listed, *routed, *self.rule, *self.score_mod]

    @staticmethod
    def from_tensors(plan: KernelPlan, tensors: list[torch.Tensor]) -> Prepared:
        """The inverse of `tensors()` for a call of `plan`."""
        rest = list(tensors)
        layouts = tuple(rest[: len(plan.layouts)])
        del rest[: len(plan.layouts)]
        blocks = rest.pop(0) if P.topk_leaf(plan.positions) is not None else None
        inputs = plan.positions.runtime_inputs
        docs = None
        if "document_ids" in inputs:
            docs = tuple(rest.pop(0) for _ in range(4 if P.reads_document_offsets(plan.positions) else 2))
        lengths = rest.pop(0) if "key_lengths" in inputs else None
        bits, lists, counts = (rest.pop(0), rest.pop(0), rest.pop(0)) if "key_indices" in inputs else (None,) * 3
        n = Route.count(plan.positions)
        routed = Route.from_tensors(plan.positions, rest[:n]) if n else None
        with_tensors = scoremod.with_tensors(plan.score_mods)
        split = len(rest) - len(with_tensors)  # the modifications' tensors come last
        rest, mods = rest[:split], tuple(rest[split:])
        # A traced call's bias passed on its strides alone (scoremod.pairable); its address is only known now. The
        # copy lives in the Prepared, past the launches that read it.
        mods = tuple(
            scoremod.paired(t) if isinstance(m, scoremod.Bias) and not scoremod.pairable(t) else t
            for m, t in zip(with_tensors, mods)
        )
        return Prepared(
            layouts,
            blocks,
            docs,
            lengths,
            key_bits=bits,
            key_lists=lists,
            key_counts=counts,
            route=routed,
            rule=tuple(rest[n:]),
            score_mod=mods,
        )


def prepare(
    pattern: P.Pattern, q: torch.Tensor, k: torch.Tensor, inputs: dict, scale: float | None = None, mods: tuple = ()
) -> Prepared:
    """Check the call-time `inputs` against what `pattern` needs and bring them to the kernels' device and types.
    `scale` (default 1/sqrt(D)) is the attention's and `mods` its score modifications (bound, `scoremod.bind`):
    top-k by token ranks the exact scores as the softmax sees them. Traceable by torch.compile: tensor work and
    checks on constants only."""
    B, Hq, Sq, _ = q.shape
    Sk, device = k.shape[2], q.device
    positions, rule = split_selection(pattern)
    need = set(positions.runtime_inputs) | set(rule.runtime_inputs if rule is not None else ())
    optional = {"document_positions"} if P.reads_document_offsets(positions) else set()
    for name, value in inputs.items():
        if value is None and name in need:
            raise InputError(f"pattern {pattern!r} needs {name}=")
        if value is not None and name not in need | optional:
            accepted = ", ".join(sorted(need | optional)) or "none"
            raise InputError(f"{name}= was given but pattern {pattern!r} does not use it (it takes: {accepted})")
    missing = need - {n for n, v in inputs.items() if v is not None}
    if missing:
        raise InputError(f"pattern {pattern!r} needs {', '.join(f'{n}=' for n in sorted(missing))}")

    layouts = tuple(_layout(leaf, device, B, Hq, Sq, Sk) for leaf in pattern.layouts())
    docs = None
    if "document_ids" in need:
        within = P.reads_document_offsets(positions)
        docs = _documents(inputs["document_ids"], B, Sq, Sk, device, within, inputs.get("document_positions"))
    lengths = _key_lengths(inputs["key_lengths"], B, device) if "key_lengths" in need else None
    extra = rule.prepare(q, k, {n: inputs[n] for n in rule.runtime_inputs}) if rule is not None else ()
    routed, permutation = route(positions, q, k, inputs, lengths) if positions.reorders else (None, None)
    bits = lists = counts = None
    if "key_indices" in need:
        given = keyindex.check(inputs["key_indices"], B, Hq, k.shape[1], Sq)
        bits, lists, counts = keyindex.sorted_lists(given, Sk, device)
    prep = Prepared(
        layouts,
        None,
        docs,
        lengths,
        key_bits=bits,
        key_lists=lists,
        key_counts=counts,
        route=routed,
        rule=tuple(extra),
        permutation=permutation,
    )
    # The selections are imported where a pattern needs them: their graph breaks (torch.compiler.disable) import
    # torch._dynamo, ~0.7 s that a call without them does not pay.
    if P.topk_leaf(pattern) is not None:  # selected among what the rest allows, so after the rest is prepared
        from . import blockselect

        prep = replace(prep, blocks=blockselect.select(pattern, q, k, prep))
    token = P.token_leaf(pattern)
    if token is not None:  # likewise; the choice then runs as key-index lists
        scorer_inputs = {n: inputs[n] for n in token._inputs}
        tokentopk.check(token.scorer, scorer_inputs, B, Hq, Sq, Sk, q.shape[3])
        scale = 1 / math.sqrt(q.shape[3]) if scale is None else scale
        from . import tokenselect

        chosen = tokenselect.select(pattern, q, k, prep, scorer_inputs, scale, mods)
        bits, lists, counts = keyindex.sorted_lists(chosen, Sk, device)
        prep = replace(prep, key_bits=bits, key_lists=lists, key_counts=counts)
    return prep


# Block layout leaf -> {device: its grid there}: each grid is uploaded once and lives as long as its pattern.
_UPLOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout(leaf: P.BlockLayout, device: torch.device, B: int, Hq: int, Sq: int, Sk: int) -> torch.Tensor:
    if torch.compiler.is_compiling():
        lay = leaf.tensor().to(device)  # the compiled graph copies it (the grid is a constant of the graph)
    else:
        grids = _UPLOADED.setdefault(leaf, {})
        if device not in grids:
            grids[device] = leaf.tensor().to(device)
        lay = grids[device]
    bs = leaf.block_size
    nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    if lay.shape[-2] < nq or lay.shape[-1] < nk:
        raise InputError(
            f"block layout {tuple(lay.shape[-2:])} does not cover {nq}x{nk} blocks of {bs} for Sq={Sq}, Sk={Sk}"
        )
    if lay.shape[-3] not in (1, Hq):
        raise InputError(f"a per-head block layout has {lay.shape[-3]} heads; the query has {Hq}")
    if leaf.per_batch and lay.shape[0] not in (1, B):
        raise InputError(f"a per-batch block layout has {lay.shape[0]} batch elements; the query has {B}")
    return lay


def _int32(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` as int32 on its device; refuses meta tensors and values int32 cannot hold (which would silently wrap:
    two documents becoming one). Checking int64 values costs a device-to-host sync; int32 input needs none."""
    if t.is_meta:
        raise InputError(f"{what} must hold data (a CPU or CUDA tensor), got a meta tensor")
    if t.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8) or torch.compiler.is_compiling():
        return t.to(torch.int32)
    narrow = t.to(torch.int32)
    if t.numel() and not torch.equal(narrow.to(t.dtype), t):
        raise InputError(f"{what} must fit in int32 (from -2**31 to 2**31 - 1); got values beyond that")
    return narrow


# The caller's document-id (and position) tensors -> (what the conversion depended on, the converted tensors). A model
# passes one batch's ids to every layer: its calls then share the converted tensors, without converting, checking
# (an int64 check is a host sync) or counting positions again, and the schedules built on them (schedule.build). An
# entry goes with its tensors, and is made again when one of them is changed in place (its version counter).
_CONVERTED: dict[tuple[int, ...], tuple[tuple, tuple[torch.Tensor, ...]]] = {}


def _documents(document_ids, B: int, Sq: int, Sk: int, device, offsets: bool, positions) -> tuple[torch.Tensor, ...]:
    """(query ids, key ids), int32 [B', S]; with `offsets` (in_document()), then the query's and the key's positions
    within their documents: `positions` (the call's `document_positions=`), or counted from one id tensor. Made once
    per caller tensors and version (`_CONVERTED`)."""
    if torch.compiler.is_compiling():  # a traced call: tensors without addresses or versions
        return _converted_documents(document_ids, B, Sq, Sk, device, offsets, positions)
    given = [t for t in _flat(document_ids) + _flat(positions) if isinstance(t, torch.Tensor)]
    versions = schedule.versions(given)
    if versions is None:
        return _converted_documents(document_ids, B, Sq, Sk, device, offsets, positions)
    key, stamp = tuple(id(t) for t in given), (versions, B, Sq, Sk, str(device), offsets)
    entry = _CONVERTED.get(key)
    if entry is not None and entry[0] == stamp:
        return entry[1]
    if entry is None:  # the entry goes when any of its tensors does (whose id another tensor may then take)
        for t in given:
            weakref.finalize(t, _CONVERTED.pop, key, None)
    converted = _converted_documents(document_ids, B, Sq, Sk, device, offsets, positions)
    # Copies of the caller's tensors (where they were already as the kernels take them): the entry must not keep
    # them alive, and schedules kept on copies cannot meet another tensor that took the id of a dead one.
    converted = tuple(t.clone() if any(t is g for g in given) else t for t in converted)
    _CONVERTED[key] = (stamp, converted)
    return converted


def _flat(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _converted_documents(document_ids, B: int, Sq: int, Sk: int, device, offsets: bool, positions):
    qd, kd = P.document_ids_pair(document_ids, Sq, Sk)
    for t in (qd, kd):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.shape[0] not in (1, B):
            raise InputError(f"document ids must be integer tensors [{B}, S] or [S], got {t.dtype} {tuple(t.shape)}")
    qd, kd = (_int32(t, "document ids").to(device).contiguous() for t in (qd, kd))
    if not offsets:
        return qd, kd
    if positions is None:  # counted on the device, from the one id tensor (a pair is refused there)
        within = P.document_offsets(document_ids if isinstance(document_ids, (tuple, list)) else qd, Sq, Sk)
        within = within.to(torch.int32)
        return qd, kd, within, within
    pair = P.document_positions_pair(document_ids, positions, Sq, Sk)
    for t in pair:
        if t.shape[0] not in (1, B):
            raise InputError(f"document_positions must be [{B}, S] or [S] tensors, got {tuple(t.shape)}")
    qp, kp = (_int32(t, "document positions").to(device).contiguous() for t in pair)
    return qd, kd, qp, kp


def _key_lengths(key_lengths, B: int, device) -> torch.Tensor:
    if (
        not isinstance(key_lengths, torch.Tensor)
        or key_lengths.dtype.is_floating_point
        or key_lengths.dtype.is_complex
        or key_lengths.dtype == torch.bool
        or tuple(key_lengths.shape) != (B,)
    ):
        is_tensor = isinstance(key_lengths, torch.Tensor)
        got = f"{key_lengths.dtype} {tuple(key_lengths.shape)}" if is_tensor else key_lengths
        raise InputError(f"key_lengths must be an integer tensor of shape [{B}], got {got!r:.80}")
    return _int32(key_lengths, "key_lengths").to(device).contiguous()
