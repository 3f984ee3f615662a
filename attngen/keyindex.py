"""Call-time stage, in `prepare`: a `key_indices()` leaf's lists -> the lists sorted and without duplicates, with
their lengths, which the gather kernels walk (`sorted_lists`), and a bit per (query row, key), which the kernels
read in their mask and the schedules classify at tile granularity.

`key_indices` is int32 or int64 [B, H', Sq, n]: row i of batch b and query head h lists the keys it may attend to,
with H' the KV heads (a group's query heads share the lists, as DeepSeek's and NSA's selections do) or the query
heads. Entries outside [0, Sk) are ignored (-1 pads), a key listed twice counts once. The bits are
int32 [B, H', Sq, ceil(Sk / 32)] (bit k % 32 of word k / 32), built a chunk of rows at a time so that little more
than the bits (Sq x Sk / 8 bytes per batch and head) is ever held; the schedules mark the tiles the lists touch.

A pattern `rest & key_indices()` runs on the gather kernels (`plan.Gather`): the forward and dQ walk each row's
sorted list, the dK/dV kernel the inverse lists at the granularity of a few keys (`device.tile_rows`). Any other
use of the leaf (under | or ~) runs the ordinary flash kernels with the bits in their mask, where every tile that
some listed pair touches is computed whole: exact, but what the touched tiles cost."""

from __future__ import annotations

import math

import torch

from . import device as _device
from .affine import PARTIAL
from .errors import InputError

CHUNK = 1 << 26  # (query row, key) pairs, or list entries, handled at once
_BYTE_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# sum of 2**(56 - 7 j), j < 8: times 8 bytes of 0 / 1, byte j's bit lands on bit 56 + j, every other product below
# bit 56 on a bit of its own or past bit 63 (dropped), so the top byte is the 8 flags packed, with no carry.
_PACK = sum(1 << (56 - 7 * j) for j in range(8))


def check(indices: object, B: int, Hq: int, Hkv: int, Sq: int) -> torch.Tensor:
    """The call's `key_indices` as given, after checking its type and shape."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        got = f"{indices.dtype} tensor" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise InputError(f"key_indices must be an int32 or int64 tensor [B, Hkv or Hq, Sq, n], got {got}")
    if indices.is_meta:
        raise InputError("key_indices must hold data (a CPU or CUDA tensor), got a meta tensor")
    heads = sorted({Hkv, Hq})
    if indices.dim() != 4 or indices.shape[0] != B or indices.shape[1] not in heads or indices.shape[2] != Sq:
        raise InputError(
            f"key_indices must be [B={B}, H={' or '.join(map(str, heads))}, Sq={Sq}, n] (the KV heads' lists shared "
            f"by their query heads, or one list per query head), got {tuple(indices.shape)}"
        )
    return indices


def bits(indices: torch.Tensor, Sk: int, device) -> torch.Tensor:
    """int32 [B, H', Sq, ceil(Sk / 32)]: bit k % 32 of word k / 32 of row i set where row i lists key k. A chunk of
    rows at a time: the listed keys marked in a row of bools, each 8 bools (one int64, byte j = key 8 m + j) packed
    into one byte by a multiply that moves byte j's low bit to bit 56 + j (`_PACK`)."""
    B, H, Sq, n = indices.shape
    words = max(1, math.ceil(Sk / 32))
    out = torch.empty(B, H, Sq, 4 * words, dtype=torch.uint8, device=device)
    if out.numel() == 0 or n == 0:
        return out.zero_().view(torch.int32)
    rows = max(1, CHUNK // (B * H * 32 * words))
    for r0 in range(0, Sq, rows):  # (bytes and words little-endian, as on every GPU and host torch runs on)
        idx = indices[:, :, r0 : r0 + rows].to(device, torch.int64)
        idx = torch.where((idx >= 0) & (idx < Sk), idx, 32 * words)  # ignored entries land past the last word
        dense = torch.zeros(*idx.shape[:3], 32 * words + 8, dtype=torch.bool, device=device)
        dense.scatter_(-1, idx, True)
        eights = dense[..., : 32 * words].view(torch.int64)  # [..., 4 * words]: 8 keys each
        out[:, :, r0 : r0 + rows] = (((eights * _PACK) >> 56) & 0xFF).to(torch.uint8)
    return out.view(torch.int32)


def sorted_lists(indices: torch.Tensor, Sk: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bits, lists, counts) of a call's lists [B, H', Sq, n]: the bits as `bits` makes them; int32 [B, H', Sq, n]
    holding each row's distinct keys in [0, Sk), increasing, then -1; int32 [B, H', Sq] their number. On CUDA one
    launch (`device.key_lists`); elsewhere, while torch.compile traces, or for a bitmap too long for shared memory,
    two sorts."""
    idx = indices.to(device)
    if idx.is_cuda and not torch.compiler.is_compiling():
        narrow = idx if idx.dtype == torch.int32 else torch.where((idx >= 0) & (idx < Sk), idx, -1).to(torch.int32)
        made = _device.key_lists(narrow.contiguous(), Sk)
        if made is not None:
            return made
    keys = torch.where((idx >= 0) & (idx < Sk), idx.long(), Sk).sort(-1).values  # ignored entries last, as Sk
    again = torch.zeros_like(keys, dtype=torch.bool)
    again[..., 1:] = keys[..., 1:] == keys[..., :-1]
    keys = torch.where(again, Sk, keys).sort(-1).values
    lists = torch.where(keys < Sk, keys, -1).to(torch.int32)
    return bits(idx, Sk, device), lists, (keys < Sk).sum(-1, dtype=torch.int32)


def unpack(words: torch.Tensor, Sk: int) -> torch.Tensor:
    """bool [..., Sk] of int32 [..., ceil(Sk / 32)] words (`bits`' layout)."""
    b = words.contiguous().view(torch.uint8)
    return ((b.unsqueeze(-1) & _BYTE_BITS.to(b.device)) != 0).flatten(-2)[..., :Sk]


def tile_classes(lists: torch.Tensor, bm: int, bn: int, Sq: int, Sk: int, group: int) -> torch.Tensor:
    """int8 [B, Hq or 1, Tq, Tk]: a bm x bn tile is PARTIAL where some row of it lists some key of it, else EMPTY
    (never FULL: the kernels then evaluate the bits on every visited tile; key-head lists are widened to the query
    heads of their group). Marked from the lists themselves, a chunk of rows at a time: every listed pair sets its
    tile's flag to 1 (the same value, whatever the order)."""
    B, H, _, n = lists.shape
    Tq, Tk = math.ceil(Sq / bm), math.ceil(Sk / bn)
    flags = torch.zeros(B * H * Tq * Tk + 1, dtype=torch.uint8, device=lists.device)  # + 1: where ignored go
    rows = max(1, CHUNK // max(1, B * H * n))
    heads = torch.arange(B * H, device=lists.device).view(B, H, 1, 1) * (Tq * Tk)
    for r0 in range(0, Sq, rows):
        idx = lists[:, :, r0 : r0 + rows].long()
        row_tiles = (torch.arange(r0, r0 + idx.shape[2], device=lists.device) // bm).view(1, 1, -1, 1)
        at = heads + row_tiles * Tk + idx // bn
        flags[torch.where((idx >= 0) & (idx < Sk), at, flags.numel() - 1).view(-1)] = 1
    cls = (flags[:-1].view(B, H, Tq, Tk) * PARTIAL).to(torch.int8)
    return cls.repeat_interleave(group, dim=1) if group > 1 else cls


def listed(words: torch.Tensor, b, h, qi, kj, group: int) -> torch.Tensor:
    """Whether rows qi of (b, h) list keys kj (broadcasting index tensors, in range)."""
    word = words[b.clamp(max=words.shape[0] - 1), h // group, qi, kj // 32]
    return ((word >> (kj % 32)) & 1) != 0


def divisor(words: torch.Tensor, Hq: int) -> int:
    """Query heads per list: the group size where the lists are the KV heads', else 1."""
    return Hq // words.shape[1]
