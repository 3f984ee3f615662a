"""Call-time stage for patterns with buckets or keep masks (`Pattern.reorders`): q, k, v + the call's buckets / keep
masks -> a `Route` (the tokens of each (batch, head) stably sorted by bucket, dropped tokens last) and the gathers
that move tensors into that order and back.

The kernels then run on the sorted tokens: a bucket is a contiguous run of query tiles and of key tiles, so the
schedule (`schedule.py`: from each query's run of kept keys, `Route.ranges`, where the pattern has that form; else
from per-tile extremes of bucket ids and original positions) visits only tile pairs that can share a bucket and
that the rest of the pattern, read at the original positions (`Route.q_order`, `k_order`), allows. Outputs, LSE
and gradients are moved back to the original order; every move is a gather (the backward of a gather by a
permutation is the gather by its inverse: `op.to_sorted`, `op.to_original`), so nothing is atomic or
order-dependent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import pattern as P
from .errors import InputError

_INT32_MIN = -(2**31)


@dataclass(frozen=True, eq=False)
class Route:
    """Sorted tokens, as the kernels read them: the original position of each sorted query [B, Hq, Sq] and key
    [B, Hkv, Sk] (int32), then, in sorted order, the bucket ids (int32) and the keep flags (uint8) where the
    pattern has them, and each query's run of kept keys where the pattern keeps one (`keeps_key_ranges`)."""

    q_order: torch.Tensor
    k_order: torch.Tensor
    buckets: tuple[torch.Tensor, torch.Tensor] | None = None
    keep: tuple[torch.Tensor, torch.Tensor] | None = None
    ranges: torch.Tensor | None = None  # int32 [B, Hq, Sq, 2]: each query's first kept key, count (keeps_key_ranges)

    def tensors(self) -> list[torch.Tensor]:
        ranges = [] if self.ranges is None else [self.ranges]
        return [self.q_order, self.k_order, *(self.buckets or ()), *(self.keep or ()), *ranges]

    def kernel_tensors(self) -> list[torch.Tensor]:
        """What the kernels read (the plan's run-time arguments): the key ranges where the pattern has them (the
        mask is then `first <= k < first + count`), else the orders, buckets and keep flags the mask is evaluated on."""
        return [self.ranges] if self.ranges is not None else self.tensors()

    @staticmethod
    def _parts(structure: P.Pattern) -> tuple[bool, bool, bool]:
        """Whether a reordering structure's route holds bucket ids, keep flags and key ranges."""
        leaves = structure.leaves()
        buckets, keep = (any(isinstance(x, kind) for x in leaves) for kind in (P.Buckets, P.Keep))
        return buckets, keep, P.keeps_key_ranges(structure)

    @staticmethod
    def count(structure: P.Pattern) -> int:
        """How many tensors `tensors()` gives for a pattern structure (0 when it does not reorder)."""
        if not structure.reorders:
            return 0
        buckets, keep, ranges = Route._parts(structure)
        return 2 + 2 * buckets + 2 * keep + ranges

    @staticmethod
    def from_tensors(structure: P.Pattern, tensors: list[torch.Tensor]) -> Route:
        has_buckets, has_keep, has_ranges = Route._parts(structure)
        rest = list(tensors)
        orders = rest.pop(0), rest.pop(0)
        buckets = (rest.pop(0), rest.pop(0)) if has_buckets else None
        keep = (rest.pop(0), rest.pop(0)) if has_keep else None
        ranges = rest.pop(0) if has_ranges else None
        return Route(*orders, buckets, keep, ranges)

    def mask_inputs(self) -> dict:
        """`pattern.dense_mask` arguments that give the mask of the sorted tokens (what the kernels evaluate)."""
        qb, kb = self.buckets or (None, None)
        qk, kk = self.keep or (None, None)
        order = (self.q_order, self.k_order)
        return dict(query_buckets=qb, key_buckets=kb, query_keep=qk, key_keep=kk, order=order)


@dataclass(frozen=True, eq=False)
class Permutation:
    """Row indices (int64, flattened over batch and heads) of one call's gathers: sorted <- original (`q_rows`,
    `k_rows`) and original <- sorted (`q_back`, `k_back`), for the query rows [B·Hq·Sq] and the key rows [B·Hkv·Sk]
    (`op.to_sorted`, `op.to_original`)."""

    q_rows: torch.Tensor
    q_back: torch.Tensor
    k_rows: torch.Tensor
    k_back: torch.Tensor


def _leaf(pattern: P.Pattern, kinds: tuple[type, ...]) -> P.Pattern | None:
    found = list(dict.fromkeys(x for x in pattern.leaves() if isinstance(x, kinds)))
    if len(found) > 1:
        names = " and ".join(map(repr, found))
        raise InputError(f"{pattern!r} has {names}; a pattern takes one bucket leaf (buckets() or lsh(n)) at most")
    return found[0] if found else None


def _checked(t, what: str, shape: tuple[int, ...], flags: bool) -> torch.Tensor:
    """`t` if it is a tensor of `shape` holding data, integers (bucket ids) or bools (`flags`, keep masks)."""
    is_int = isinstance(t, torch.Tensor) and not (t.dtype.is_floating_point or t.dtype.is_complex)
    if not isinstance(t, torch.Tensor) or (t.dtype == torch.bool) != flags or not is_int:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        kind = "a torch.bool tensor" if flags else "an integer tensor"
        raise InputError(f"{what} must be {kind} of shape {list(shape)}{' (True = kept)' * flags}, got {got}")
    if tuple(t.shape) != shape:
        raise InputError(f"{what} must have shape {list(shape)} ([batch, heads, seq]), got {list(t.shape)}")
    if t.is_meta:
        raise InputError(f"{what} must hold data (a CPU or CUDA tensor), got a meta tensor")
    return t


def _ids(t, what: str, shape: tuple[int, ...], device) -> torch.Tensor:
    narrow = _checked(t, what, shape, flags=False).to(torch.int32)
    if t.dtype == torch.int64 and not torch.compiler.is_compiling() and not torch.equal(narrow.to(t.dtype), t):
        raise InputError(f"{what} must fit in int32 (from -2**31 to 2**31 - 1); got values beyond that")
    return narrow.to(device)


def _flags(t, what: str, shape: tuple[int, ...], device) -> torch.Tensor:
    return _checked(t, what, shape, flags=True).to(device)


def _sort(ids: torch.Tensor | None, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable order by (dropped, bucket) along the last dim of [B, H, S]: (sorted <- original [B, H, S], and the
    flattened rows of both directions). The sort key is as narrow as the pattern allows (radix passes cost)."""
    if ids is not None and kept is not None:
        key = (ids.to(torch.int64) - _INT32_MIN) | ((~kept).to(torch.int64) << 32)
    else:
        key = ids if ids is not None else (~kept).to(torch.uint8)
    order = torch.sort(key, dim=-1, stable=True).indices
    B, H, S = order.shape
    start = torch.arange(B * H, device=order.device).view(B, H, 1) * S
    rows = (order + start).view(-1)
    back = torch.empty_like(rows)  # a permutation: every element written once
    back[rows] = torch.arange(B * H * S, device=order.device)
    return order, rows, back


def route(
    pattern: P.Pattern, q: torch.Tensor, k: torch.Tensor, inputs: dict, key_lengths: torch.Tensor | None = None
) -> tuple[Route, Permutation]:
    """Sort the tokens of a reordering `pattern` (after `prepare` checked which inputs it takes; `key_lengths` as
    prepare normalised them). Runs on q's device with no host synchronisation (int64 bucket ids are range-checked,
    which syncs; int32 ids are not)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk, device = k.shape[1], k.shape[2], q.device
    bucket = _leaf(pattern, (P.Buckets, P.LSH))
    qb = kb = qk = kk = None
    if isinstance(bucket, P.LSH):
        from .hashing import lsh_buckets  # imported where used: its graph break imports torch._dynamo (~0.7 s)

        qb, kb = lsh_buckets(q.detach(), k.detach(), bucket.n, bucket.seed)
    elif bucket is not None:
        qb = _ids(inputs["query_buckets"], "query_buckets", (B, Hq, Sq), device)
        kb = _ids(inputs["key_buckets"], "key_buckets", (B, Hkv, Sk), device)
    if _leaf(pattern, (P.Keep,)) is not None:
        qk = _flags(inputs["query_keep"], "query_keep", (B, Hq, Sq), device)
        kk = _flags(inputs["key_keep"], "key_keep", (B, Hkv, Sk), device)
    (qf, q_rows, q_back), (kf, k_rows, k_back) = _sort(qb, qk), _sort(kb, kk)

    def sorted_(x: torch.Tensor | None, order: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        return None if x is None else torch.gather(x, -1, order).to(dtype).contiguous()

    buckets = None if qb is None else (sorted_(qb, qf, torch.int32), sorted_(kb, kf, torch.int32))
    keep = None if qk is None else (sorted_(qk, qf, torch.uint8), sorted_(kk, kf, torch.uint8))
    orders = qf.to(torch.int32).contiguous(), kf.to(torch.int32).contiguous()
    ranges = None
    if P.keeps_key_ranges(pattern):
        ranges = _key_ranges(pattern, orders, buckets, keep, key_lengths, Sq, Sk)
    return Route(*orders, buckets, keep, ranges), Permutation(q_rows, q_back, k_rows, k_back)


def _key_ranges(pattern: P.Pattern, orders, buckets, keep, key_lengths, Sq: int, Sk: int) -> torch.Tensor:
    """int32 [B, Hq, Sq, 2]: for each sorted query, the first sorted key it keeps and how many (0: none).

    Its affine leaves and key padding allow one interval [lo, hi] of key positions; its keys are those of the
    query's bucket (kept ones, where there is keep()) with positions in that interval: one run of the keys sorted
    by (dropped, bucket, position), found by binary search on that composite key."""
    q_order, k_order = (t.to(torch.int64) for t in orders)
    if q_order.numel() == 0 or Sk == 0:  # no query, or no key to keep
        return torch.zeros(*q_order.shape, 2, dtype=torch.int32, device=q_order.device)
    lo = torch.zeros_like(q_order)
    hi = torch.full_like(q_order, Sk - 1)
    parts = pattern.parts if isinstance(pattern, P.And) else (pattern,)
    for atom in pattern.range_atoms:
        cq, ck, csq, csk = atom.coef
        rest = cq * q_order + (csq * Sq + csk * Sk + atom.const)  # the atom is ck·k + rest >= 0 (or == 0)
        if ck == 0:
            lo = torch.where(rest >= 0 if atom.op == "ge" else rest == 0, lo, Sk)
            continue
        if atom.op == "eq":  # k = -rest / ck, where that is an integer
            exact = torch.remainder(rest, abs(ck)) == 0
            k_at = torch.div(-rest, ck, rounding_mode="floor")
            lo = torch.where(exact, torch.maximum(lo, k_at), Sk)
            hi = torch.minimum(hi, k_at)
        elif ck > 0:  # k >= ceil(-rest / ck)
            lo = torch.maximum(lo, _ceil_div(-rest, ck))
        else:  # k <= floor(rest / -ck)
            hi = torch.minimum(hi, torch.div(rest, -ck, rounding_mode="floor"))
    if any(isinstance(p, P.KeyPadding) for p in parts):
        hi = torch.minimum(hi, key_lengths.to(torch.int64).view(-1, 1, 1) - 1)
    B, Hq = q_order.shape[:2]
    Hkv = k_order.shape[1]
    q_bucket, k_bucket = (t.to(torch.int64) - _INT32_MIN for t in buckets) if buckets else (0, 0)
    k_dropped = (1 - keep[1].to(torch.int64)) if keep else 0
    keys = (k_dropped << 62) | (k_bucket << 30) | k_order  # ascending along each row: the sort order
    base = (q_bucket << 30) + torch.zeros_like(q_order)  # a kept key of the query's bucket, at position 0
    first, last = (base + lo.clamp(0, Sk - 1)).view(B, Hkv, -1), (base + hi.clamp(0, Sk - 1)).view(B, Hkv, -1)
    first = torch.searchsorted(keys.contiguous(), first.contiguous()).view(B, Hq, -1)
    last = torch.searchsorted(keys.contiguous(), last.contiguous(), right=True).view(B, Hq, -1) - 1
    empty = (lo > hi) | (lo > Sk - 1) | (hi < 0)
    if keep:
        empty |= keep[0] == 0
    count = torch.where(empty, 0, last - first + 1)  # also 0 where the bucket has no key in [lo, hi]
    first = torch.where(count > 0, first, 0)
    return torch.stack([first, count], dim=-1).to(torch.int32).contiguous()


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return -torch.div(-x, d, rounding_mode="floor")
