"""Launching NVRTC kernels on torch's current stream (`launch`), and the small kernels of the call-time stages:
row gathers that move a reordered call's tensors into and out of its sorted order (`gather_rows`), the tile
classes of its schedule from per-query key ranges (`range_classes`), and a key_indices() call's sorted lists, bits
and inverse lists (`key_lists`, `tile_rows`), a top-k by token's choice per row (`topk_rows`). Each compiles once
per arch, through the cache."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import driver
from .nvrtc import Binary, compile_cached, device_arch, ensure_dynamic_shared, load_function
from .render import (
    KEY_TILE_CHUNK,
    TOPK_CACHED,
    indexer_smem,
    render_gather_rows,
    render_indexer_scores,
    render_key_lists,
    render_range_classes,
    render_topk_rows,
)
from .tiling import GATHER_KEYS

_u64, _i64, _i32 = np.uint64, np.int64, np.int32
MAX_SHARED = 200 * 1024  # dynamic shared memory a helper kernel may ask for (sm_80 and sm_90 give more)


def launch(binary: Binary, entry: str, grid, threads: int, smem: int, args: list, device: torch.device) -> None:
    """Launch kernel `entry` of `binary` on torch's current stream of `device`."""
    fn = load_function(binary, entry, device.index)
    ensure_dynamic_shared(fn, smem)
    stream = torch.cuda.current_stream(device).cuda_stream
    driver.launch(fn, grid, (threads,), smem, stream, args, device.index, entry)


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _binary(render, device_index: int, *args) -> Binary:
    source = render(device_arch(device_index), *args)
    return compile_cached(source, f"{source.entries[0]}: a helper kernel of the call-time stages")


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [N, W] (CUDA, contiguous, W · itemsize a multiple of 16 bytes) gathered by rows (int64 [M]) -> [M, W]:
    a copy at memory bandwidth (torch's gathers read an index per element, or move rows in small pieces)."""
    out = x.new_empty(rows.shape[0], x.shape[1])
    vecs = x.shape[1] * x.element_size() // 16
    if out.numel():
        grid = (min(math.ceil(rows.shape[0] * vecs / 256), 8 * sm_count(x.device.index)), 1, 1)
        args = [_u64(x.data_ptr()), _u64(out.data_ptr()), _u64(rows.data_ptr()), _i64(rows.shape[0]), _i32(vecs)]
        launch(_binary(render_gather_rows, x.device.index), "attngen_gather_rows", grid, 256, 0, args, x.device)
    return out


def range_classes(ranges: torch.Tensor, bm: int, bn: int, Sk: int) -> torch.Tensor | None:
    """int8 [B, H, Tq, Tk] tile classes from key ranges (int32 [B, H, Sq, 2], first key and count, contiguous, on
    CUDA): what `schedule._key_range_classes` computes, in one launch. None where a query tile's counters would not
    fit in shared memory (more than ~50k key tiles)."""
    B, H, Sq = ranges.shape[:3]
    Tq, Tk = math.ceil(Sq / bm), math.ceil(Sk / bn)
    smem = 4 * (Tk + 1)
    if smem > MAX_SHARED or B * H > 65535:
        return None
    out = torch.empty(B, H, Tq, Tk, dtype=torch.int8, device=ranges.device)
    args = [_u64(ranges.data_ptr()), _u64(out.data_ptr()), *map(_i32, (Sq, Sk, bm, bn, Tq, Tk))]
    binary = _binary(render_range_classes, ranges.device.index)
    launch(binary, "attngen_range_classes", (Tq, B * H, 1), 256, smem, args, ranges.device)
    return out


def key_lists(indices: torch.Tensor, Sk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(bits int32 [..., ceil(Sk / 32)], sorted int32 [..., n], counts int32 [...]) of int32 lists [..., n]
    (contiguous, on CUDA) in one launch (keyindex.sorted_lists says what they hold), or None where a row's bitmap
    would not fit in shared memory."""
    n, words = indices.shape[-1], max(1, math.ceil(Sk / 32))
    if 4 * words > MAX_SHARED:
        return None
    rows = math.prod(indices.shape[:-1])
    bits = torch.empty(*indices.shape[:-1], words, dtype=torch.int32, device=indices.device)
    lists = torch.empty_like(indices)
    counts = torch.empty(indices.shape[:-1], dtype=torch.int32, device=indices.device)
    if n == 0:  # nothing listed anywhere
        return bits.zero_(), lists, counts.zero_()
    if rows:
        args = [_u64(indices.data_ptr()), _i64(rows), _i32(n), _i32(Sk), _i32(words)]
        args += [_u64(bits.data_ptr()), _u64(lists.data_ptr()), _u64(counts.data_ptr())]
        grid = (min(rows, 64 * sm_count(indices.device.index)), 1, 1)
        binary = _binary(render_key_lists, indices.device.index, GATHER_KEYS)
        launch(binary, "attngen_key_lists", grid, 256, 4 * words, args, indices.device)
    return bits, lists, counts


def tile_rows(bits: torch.Tensor, Sk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of key-index bits int32 [B, H', Sq, words] (CUDA, contiguous) at the granularity of GATHER_KEYS
    keys: (rows int32 [total], start int64 [B, H', tiles], count int32 [B, H', tiles]), where rows[start ..
    start + count) are the list rows (query tokens) of one list head that list a key of one tile, increasing."""
    B, H, Sq, words = bits.shape
    tiles, chunks = math.ceil(Sk / GATHER_KEYS), math.ceil(Sq / KEY_TILE_CHUNK)
    heads, dev = B * H, bits.device
    counts = torch.empty(heads, tiles, chunks, dtype=torch.int32, device=dev)
    threads = heads * tiles * chunks
    binary = _binary(render_key_lists, dev.index, GATHER_KEYS)
    shape = [_u64(bits.data_ptr()), _i64(heads), _i32(Sq), _i32(words), _i32(tiles), _i32(chunks)]
    grid = (math.ceil(threads / 256), 1, 1)
    if threads:
        launch(binary, "attngen_tile_count", grid, 256, 0, [*shape, _u64(counts.data_ptr())], dev)
    ends = counts.view(-1).cumsum(0)
    offsets = ends - counts.view(-1)
    total = int(ends[-1]) if threads else 0  # the one host sync: the rows' size
    rows = torch.empty(max(total, 1), dtype=torch.int32, device=dev)
    if total:
        fill = [*shape, _u64(offsets.data_ptr()), _u64(rows.data_ptr())]
        launch(binary, "attngen_tile_fill", grid, 256, 0, fill, dev)
    start = offsets.view(heads, tiles, chunks)[..., 0] if threads else offsets.new_zeros(heads, tiles)
    return rows, start.reshape(B, H, tiles).contiguous(), counts.sum(-1, dtype=torch.int32).view(B, H, tiles)


def topk_rows(scores: torch.Tensor, k: int, first: int = 0) -> torch.Tensor:
    """int32 [R, min(k, C)] of fp32 scores [R, C] (CUDA, unit column stride): per row, the columns (plus `first`)
    of the k largest scores in increasing order, ties to the lower column, -inf never taken; -1 after them."""
    R, C = scores.shape
    width = min(k, C)
    out = torch.empty(R, width, dtype=torch.int32, device=scores.device)
    if R and width:
        smem = 4 * C if C <= TOPK_CACHED else 0
        args = [_u64(scores.data_ptr()), _i64(R), _i32(C), _i64(scores.stride(0)), _i32(k), _i32(first)]
        args += [_u64(out.data_ptr()), _i64(width), _i32(width)]
        grid = (min(R, 16 * sm_count(scores.device.index)), 1, 1)
        binary = _binary(render_topk_rows, scores.device.index)
        launch(binary, "attngen_topk_rows", grid, 256, smem, args, scores.device)
    return out


INDEXER_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)


def indexer_scores(iq: torch.Tensor, ik: torch.Tensor, w: torch.Tensor, rows: slice, cols: slice):
    """fp32 [B, R, C]: the lightning indexer's scores of query rows `rows` with keys `cols` (slices of step 1), from
    iq [B, Sq, Hi, Di], ik [B, Sk, Di] (CUDA, one 16-bit dtype) and w [B, Sq, Hi]; on tensor cores with fp32
    accumulation. None where the kernel does not apply (other dtypes or head dims): the caller computes them."""
    B, Sq, Hi, Di = iq.shape  # (returns torch.Tensor | None)
    if iq.dtype not in (torch.float16, torch.bfloat16) or ik.dtype != iq.dtype or Di not in INDEXER_HEAD_DIMS:
        return None
    r0, r1 = rows.indices(Sq)[:2]
    c0, c1 = cols.indices(ik.shape[1])[:2]
    R, C = r1 - r0, c1 - c0
    out = torch.empty(B, R, C, dtype=torch.float32, device=iq.device)
    if out.numel():
        iq, ik, w = iq.contiguous(), ik.contiguous(), w.to(torch.float32).contiguous()
        dtype = "fp16" if iq.dtype == torch.float16 else "bf16"
        args = [_u64(t.data_ptr()) for t in (iq, ik, w, out)]
        args += [_i32(Sq), _i32(ik.shape[1]), _i32(Hi), _i32(r0), _i32(R), _i32(c0), _i32(C), _i64(C)]
        binary = _binary(render_indexer_scores, iq.device.index, dtype, Di)
        grid = (math.ceil(C / 64), math.ceil(R / 64), B)
        launch(binary, "attngen_indexer_scores", grid, 128, indexer_smem(Di), args, iq.device)
    return out
