"""Call-time stage, last: torch tensors + a Prepared + schedules -> kernel arguments in the plan's ABI order, and
launches on torch's current stream (docs/design.md, "Kernel ABI" and "Backward ABI"). One function per direction
serves both kernel families: they differ only in their fixed argument prefix (tensor maps or pointers)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from . import schedule, scoremod, tensormap
from .device import launch, sm_count, tile_rows
from .kernel import Compiled
from .plan import KernelPlan
from .prepare import Prepared
from .render import PREPROCESS_ROWS, PREPROCESS_THREADS

_u64, _i64, _i32, _f32 = np.uint64, np.int64, np.int32, np.float32
LOG2E = 1.4426950408889634
BACKWARD_ROW_PAD = 128  # sm_90a backward: row statistics padded to a multiple of every query tile
# dK/dV over long query ranges (docs/design.md, "Split dK/dV"): one block sums at most SPLIT_ROWS query rows (over
# the group's heads) in its fp32 registers, where the memory for partials allows; and while key tiles leave SMs
# idle, their lists are shared out in steps of at least SPLIT_MIN_STEPS query tiles.
SPLIT_ROWS = 1 << 16
SPLIT_MIN_STEPS = 16
SPLIT_MIN_BUDGET = 1 << 28  # bytes of partials always allowed; more up to the size of Q
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    """With ATTNGEN_POISON_OUTPUTS=1 (tests), outputs start as NaN, so an element a kernel fails to write shows."""
    if os.environ.get("ATTNGEN_POISON_OUTPUTS") == "1" and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def aligned(t: torch.Tensor) -> torch.Tensor:
    """16-byte aligned rows are what cp.async and TMA need; any such strides are used as they are, others copied
    (as are broadcast dimensions, stride 0, which a tensor map cannot describe)."""
    ok = t.data_ptr() % 16 == 0 and all(s % 8 == 0 and (s or n == 1) for s, n in zip(t.stride()[:-1], t.shape))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _strides(t: torch.Tensor) -> list:
    return [_i64(s) for s in t.stride()[:3]]


def runtime_values(plan: KernelPlan, prep: Prepared, Hq: int, score_grad: torch.Tensor | None = None) -> list:
    """Values of the plan's run-time arguments, in order (position leaves, the rule's, the score modifications'),
    for Hq query heads; `score_grad` is where the dK/dV kernel writes dL/ds for a bias or a T5 table, if wanted."""
    values = []
    for lay in prep.layouts:  # [H or 1, nbq, nbk], or [B or 1, H or 1, nbq, nbk] per batch element (contiguous)
        values.append(_u64(lay.data_ptr()))
        if lay.dim() == 4:
            values.append(_i64(lay.stride(0) if lay.shape[0] > 1 else 0))  # 0: one grid for every batch element
        heads = lay.shape[-3]
        values += [_i64(lay.shape[-2] * lay.shape[-1] if heads > 1 else 0), _i32(lay.shape[-1])]  # 0: every head
    if prep.blocks is not None:
        _B, Hq, nbq, nbk = prep.blocks.shape
        values += [_u64(prep.blocks.data_ptr()), _i64(Hq * nbq * nbk), _i64(nbq * nbk), _i32(nbk)]
    if prep.document_ids is not None:
        for ids in prep.document_ids:
            values += [_u64(ids.data_ptr()), _i64(ids.shape[1] if ids.shape[0] > 1 else 0)]
    if prep.key_lengths is not None:
        values.append(_u64(prep.key_lengths.data_ptr()))
    if prep.key_bits is not None:
        _B, H, Sq, W = prep.key_bits.shape
        values += [_u64(prep.key_bits.data_ptr()), _i64(H * Sq * W), _i64(Sq * W), _i64(W), _i32(Hq // H)]
    if prep.route is not None:
        values += [_u64(t.data_ptr()) for t in prep.route.kernel_tensors()]
    if plan.rule is not None:
        values += plan.rule.bind(prep.rule)
    values += _score_mod_values(plan, prep, score_grad)
    if len(values) != len(plan.runtime_args):  # the plan's declaration and this binding must agree
        raise AssertionError(f"bound {len(values)} run-time values for {len(plan.runtime_args)} arguments")
    return values


def _score_mod_values(plan: KernelPlan, prep: Prepared, score_grad: torch.Tensor | None) -> list:
    """alibi's slopes and a T5 table as pointers, a bias as a pointer and its [B, Hq, Sq, Sk] element strides (0
    where broadcast); then dL/ds's pointer (0: not wanted) where a bias or a table is there."""
    values = []
    for m, t in zip(scoremod.with_tensors(plan.score_mods), prep.score_mod):
        values.append(_u64(t.data_ptr()))
        if isinstance(m, scoremod.Bias):
            values += [_i64(s) for s in t.stride()]
    if plan.score_grad:
        values.append(_u64(0 if score_grad is None else score_grad.data_ptr()))
    return values


def _maps(boxes) -> list:
    """TMA tensor-map arguments for (tensor, box rows) pairs."""
    return [tensormap.tensor_map(tensormap.spec(t, rows)).arg for t, rows in boxes]


def _key_groups_map(k: torch.Tensor, block_n: int):
    """K's map for the sparse P·V forward (tensormap.key_groups_spec): contiguous, keys padded with zeros to a
    multiple of 16 (a copy only where K is not already so; the padded keys are masked like any key past Sk)."""
    pad = -k.shape[2] % 16
    if pad or not k.is_contiguous():
        k = torch.nn.functional.pad(k, (0, 0, 0, pad)).contiguous()
    return tensormap.tensor_map(tensormap.key_groups_spec(k, block_n)).arg, k


def _sched_args(s: schedule.Schedule) -> list:
    sb, sh = s.strides
    return [_u64(s.tiles.data_ptr()), _u64(s.counts.data_ptr()), _i64(sb), _i64(sh), _i32(s.cap)]


def forward(kern: Compiled, q, k, v, scale: float, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    plan, t = kern.plan, kern.plan.fwd
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = _poisoned(q.new_empty(B, Hq, Sq, D))
    lse = _poisoned(q.new_empty(B, Hq, Sq, dtype=torch.float32))
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if Sk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = map(aligned, (q, k, v))
    if plan.gather is not None:
        args = [_u64(x.data_ptr()) for x in (q, k, v, out, lse)]
        args += _strides(q) + _strides(k) + _strides(v) + _strides(out)
        args += [_i32(Hq), _i32(Hq // Hkv), _i32(Sq), _i32(Sk), _f32(scale * LOG2E)]
        args += _list_args(prep, Hq) + runtime_values(plan, prep, Hq)
        _launch_items(kern.forward_binary, "attngen_fwd", plan, "fwd", _list_items(prep, Hq), args, q.device)
        return out, lse
    sched = schedule.build(plan.positions, t.block_m, t.block_n, Sq, Sk, q.device, prep, rule=plan.rule, heads=Hq)
    if t.wgmma:  # tensor maps: Q tiles of BLOCK_M rows, K/V of BLOCK_N, O stored 64 rows per warpgroup
        # Persistent blocks, min_blocks per SM, claim (query tile, head, batch) items from a counter past the first.
        grid = (min(math.ceil(Sq / t.block_m) * Hq * B, t.min_blocks * sm_count(q.device.index)), 1, 1)
        next_item = torch.zeros(1, dtype=torch.int32, device=q.device)
        if plan.select.sparse_pv:  # K through its 5-d map, in the key order of the sparse P·V fragments
            k_map, k = _key_groups_map(k, t.block_n)  # k: what the map points at, kept alive past the launch
            maps = [*_maps(((q, t.block_m),)), k_map, *_maps(((v, t.block_n), (out, 64)))]
        else:
            maps = _maps(((q, t.block_m), (k, t.block_n), (v, t.block_n), (out, 64)))
        args = [*maps, _u64(lse.data_ptr())]
        args += [_u64(next_item.data_ptr()), _i32(B)]
    else:
        args = [_u64(x.data_ptr()) for x in (q, k, v, out, lse)]
        args += _strides(q) + _strides(k) + _strides(v) + _strides(out)
        grid = (math.ceil(Sq / t.block_m), Hq, B)
    args += [_i32(Hq), _i32(Hq // Hkv), _i32(Sq), _i32(Sk), _f32(scale * LOG2E)]
    args += _sched_args(sched) + runtime_values(plan, prep, Hq)
    launch(kern.forward_binary, "attngen_fwd", grid, 32 * t.warps, t.smem_bytes, args, q.device)
    return out, lse


def backward(kern: Compiled, dout, q, k, v, out, lse, dlse, scale: float, prep: Prepared, score_grad=None):
    """(dq, dk, dv); with a bias or a T5 table, `score_grad` (zeros [B, Hq, Sq, Sk] in scoremod.score_grad_dtype)
    receives dL/ds at their step from the dK/dV kernel, one write per visited pair (others keep their 0)."""
    binary = kern.backward_binary  # compiles on first use, and settles the backward tilings
    plan = kern.plan
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dq, dk, dv = (_poisoned(x.new_empty(x.shape)) for x in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, q, k, v, out = map(aligned, (dout, q, k, v, out))
    dev, wgmma = q.device, plan.dkdv.wgmma
    # Row statistics: Δ, and for the sm_90a kernels the LSE in the log2 domain, rows padded to whole tiles.
    Sq_pad = -(-Sq // BACKWARD_ROW_PAD) * BACKWARD_ROW_PAD if wgmma else Sq
    delta = q.new_empty(B, Hq, Sq_pad, dtype=torch.float32)
    lse2 = torch.empty_like(delta) if wgmma else None
    pre = [_u64(x.data_ptr() if x is not None else 0) for x in (out, dout, lse, delta, lse2)]
    pre += _strides(out) + _strides(dout) + [_i32(Hq), _i32(Sq), _i32(Sq_pad)]
    grid = (math.ceil(Sq_pad / PREPROCESS_ROWS), Hq, B)
    launch(binary, "attngen_bwd_preprocess", grid, PREPROCESS_THREADS, 0, pre, dev)
    if dlse is not None:  # d lse / d s = P, which folds into dS = P * (dP - (delta - dlse))
        delta[..., :Sq] -= dlse
    scalars = [_i32(Hq), _i32(Hq // Hkv), _i32(Sq), _i32(Sk)]
    scalars += [_i32(Sq_pad)] if wgmma else []
    scalars += [_f32(scale), _f32(scale * LOG2E)]
    extra = runtime_values(plan, prep, Hq)
    if plan.gather is not None:
        _gather_grads(binary, plan, (q, k, v, dout, lse, delta), (dq, dk, dv), scalars, extra, prep)
        return dq, dk, dv

    t = plan.dkdv
    sched_t = schedule.build(
        plan.positions, t.block_m, t.block_n, Sq, Sk, dev, prep, transpose=True, rule=plan.rule, heads=Hq
    )
    key_tiles = math.ceil(Sk / t.block_n)
    part_bytes = B * Hkv * key_tiles * 2 * t.block_n * D * 4  # one split's partials
    budget = max(q.numel() * q.element_size(), SPLIT_MIN_BUDGET)
    splits = dkdv_splits(key_tiles * Hkv * B, (Hq // Hkv) * Sq, t.block_m, sm_count(dev.index), part_bytes, budget)
    splits = min(splits, MAX_GRID_Y // Hkv)  # the shares of a KV head go along the grid's y
    part = None
    if splits > 1:  # a [2, block_n, D] slab per block, in grid order
        part = torch.empty(B, splits, Hkv, key_tiles, 2, t.block_n, D, device=dev, dtype=torch.float32)
    if wgmma:
        boxes = ((q, t.block_m), (k, t.block_n), (v, t.block_n), (dout, t.block_m), (dk, 64), (dv, 64))
        args = [*_maps(boxes), _u64(lse2.data_ptr()), _u64(delta.data_ptr())]
    else:
        args = [_u64(x.data_ptr()) for x in (q, k, v, dout, lse, delta, dk, dv)]
        args += [s for x in (q, k, v, dout, dk, dv) for s in _strides(x)]
    args += [_u64(part.data_ptr() if part is not None else 0), _i32(splits)]
    args += scalars + _sched_args(sched_t) + runtime_values(plan, prep, Hq, score_grad)
    launch(binary, "attngen_bwd_dkdv", (key_tiles, Hkv * splits, B), 32 * t.warps, t.smem_bytes, args, dev)
    if part is not None:
        total = summed_partials(part, Sk)
        dk.copy_(total[0])
        dv.copy_(total[1])

    t = plan.dq
    sched_q = schedule.build(plan.positions, t.block_m, t.block_n, Sq, Sk, dev, prep, rule=plan.rule, heads=Hq)
    if wgmma:
        boxes = ((q, t.block_m), (k, t.block_n), (v, t.block_n), (dout, t.block_m), (dq, 64))
        args = [*_maps(boxes), _u64(lse2.data_ptr()), _u64(delta.data_ptr())]
    else:
        args = [_u64(x.data_ptr()) for x in (q, k, v, dout, lse, delta, dq)]
        args += [s for x in (q, k, v, dout, dq) for s in _strides(x)]
    args += scalars + _sched_args(sched_q) + extra
    launch(binary, "attngen_bwd_dq", (math.ceil(Sq / t.block_m), Hq, B), 32 * t.warps, t.smem_bytes, args, dev)
    return dq, dk, dv


def dkdv_splits(blocks: int, rows: int, block_m: int, sms: int, part_bytes: int, budget: int) -> int:
    """How many blocks share each key tile's dK/dV work list, for `blocks` key tiles x KV heads x batch whose
    lists run over at most `rows` query rows (Sq times the group's heads) in steps of `block_m`: enough that none sums
    more than SPLIT_ROWS rows, and while the blocks leave some of the `sms` SMs idle, enough to fill them with shares
    of at least SPLIT_MIN_STEPS steps; never more than the steps, nor partials (`part_bytes` a split) past `budget`."""
    steps = -(-rows // block_m)
    want = -(-rows // SPLIT_ROWS)
    if blocks < sms:
        want = max(want, min(-(-sms // blocks), steps // SPLIT_MIN_STEPS))
    return max(1, min(want, steps, budget // max(part_bytes, 1)))


def summed_partials(part: torch.Tensor, Sk: int) -> torch.Tensor:
    """[2, B, Hkv, Sk, D]: dK and dV from a split dK/dV kernel's partials, part [B, splits, Hkv, key tiles, 2,
    block_n, D] (block (kt, split · Hkv + hk, b) writes its [2, block_n, D] slab), summed over the splits in order
    (deterministic), rows past Sk dropped."""
    B, _splits, Hkv, key_tiles, _, block_n, D = part.shape
    total = part.sum(1).permute(3, 0, 1, 2, 4, 5).reshape(2, B, Hkv, key_tiles * block_n, D)
    return total[:, :, :, :Sk]


# ------------------------------------------------------------------------------------------ key-index gathers


def _list_items(prep: Prepared, Hq: int) -> int:
    """Forward and dQ work items: (batch, list head, 16 heads of the list's, query token)."""
    B, H, Sq = prep.key_counts.shape
    return B * H * math.ceil(Hq // H / 16) * Sq


def _list_args(prep: Prepared, Hq: int) -> list:
    """The sorted lists as the forward and dQ gather kernels take them (keyindex.sorted_lists, contiguous)."""
    lists, counts = prep.key_lists, prep.key_counts
    H, n = lists.shape[1], lists.shape[3]
    items = _list_items(prep, Hq)
    return [_u64(lists.data_ptr()), _u64(counts.data_ptr()), _i32(n), _i32(H), _i32(Hq // H), _i64(items)]


def _launch_items(binary, entry: str, plan: KernelPlan, kernel: str, items: int, args: list, dev) -> None:
    """A gather kernel over `items` independent warps, `warps` to a block."""
    t = plan.gather.tiles
    if items:
        grid = (math.ceil(items / t.warps), 1, 1)
        launch(binary, entry, grid, 32 * t.warps, t.smem_bytes(plan.head_dim, kernel), args, dev)


def _gather_grads(binary, plan: KernelPlan, inputs, grads, scalars: list, extra: list, prep: Prepared) -> None:
    """dQ over each token's list, dK/dV over each key tile's inverse list (device.tile_rows): both in one order
    fixed by the lists, no atomics."""
    q, k, _v, _dout, _lse, _delta = inputs
    dq, dk, dv = grads
    B, Hq, _Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    ptrs = [_u64(x.data_ptr()) for x in inputs]
    strides = [s for x in inputs[:4] for s in _strides(x)]  # q, k, v, dO
    args = [*ptrs, _u64(dq.data_ptr()), *strides, *_strides(dq), *scalars, *_list_args(prep, Hq), *extra]
    _launch_items(binary, "attngen_bwd_dq", plan, "dq", _list_items(prep, Hq), args, q.device)

    rows, start, count = tile_rows(prep.key_bits, Sk)
    tiles = start.shape[-1]
    lists_heads = prep.key_bits.shape[1]
    args = [*ptrs, _u64(dk.data_ptr()), _u64(dv.data_ptr()), *strides, *_strides(dk), *_strides(dv), *scalars]
    args += [_u64(rows.data_ptr()), _u64(start.data_ptr()), _u64(count.data_ptr())]
    args += [_i32(lists_heads), _i32(Hq // lists_heads), _i32(tiles), _i64(B * Hkv * tiles), *extra]
    _launch_items(binary, "attngen_bwd_dkdv", plan, "dkdv", B * Hkv * tiles, args, q.device)
