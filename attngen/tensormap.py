"""TMA tensor maps for the sm_90a kernels: a torch tensor [B, H, S, D] as the driver's 4-d CUtensorMap (5-d for the
keys of the sparse P·V forward, `key_groups_spec`).

The map views the tensor innermost first, (D, S, H, B), with its own strides (any 16-byte multiples, so [B, S, H, D]
storage works without a copy), and copies boxes of 64 head-dim columns x `rows` rows, 128-byte swizzled, which is
the shared-memory layout the kernels' wgmma descriptors expect. Rows outside the tensor read as zeros and are never
written. Encoding calls the CUDA driver (cuTensorMapEncodeTiled, attngen/driver.py); maps are cached per layout."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from . import driver
from .errors import AttngenError

BOX_COLS = 64  # 64 two-byte elements: one 128-byte swizzle row
_DTYPES = {torch.float16: 6, torch.bfloat16: 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16, _BFLOAT16
_SWIZZLE_128B, _L2_PROMOTION_256B = 3, 3
_MAP_BYTES, _MAP_ALIGN = 128, 64


@dataclass(frozen=True)
class TensorMapSpec:
    """Everything a tensor map encodes: address, dtype, sizes innermost first, the byte strides of every dimension
    but the first, and the box copied (elements per dimension)."""

    address: int
    dtype: torch.dtype
    dims: tuple[int, ...]  # (D, S, H, B), or see `key_groups_spec`
    strides: tuple[int, ...]  # bytes, dimensions 1.. (rows, heads, batches)
    box: tuple[int, ...]


def spec(t: torch.Tensor, box_rows: int) -> TensorMapSpec:
    """The map of a 4-d [B, H, S, D] tensor whose rows are 16-byte aligned (see `launch._aligned`)."""
    B, H, S, D = t.shape
    size = t.element_size()
    # A dimension of extent 1 is never stepped over, but the driver still wants a 16-byte multiple there.
    strides = tuple(st * size if n > 1 else 16 for st, n in zip(t.stride()[2::-1], (S, H, B)))
    return TensorMapSpec(t.data_ptr(), t.dtype, (D, S, H, B), strides, (BOX_COLS, box_rows, 1, 1))


def key_groups_spec(t: torch.Tensor, block_n: int) -> TensorMapSpec:
    """The 5-d map of a contiguous [B, H, S, D] tensor with S a multiple of 16 that the sparse P·V forward reads K
    through: key 16 h + 4 t + r of (batch, head) is element (d, r, t, h, batch · H + head). A box of (64, 2, 4,
    block_n / 16, 1) at r = 2 j copies the keys 16 h + 4 t + 2 j + e (h over the tile, then t, then e) as
    block_n / 2 consecutive rows: two boxes lay a tile out in the order the kernel's fragments want
    (templates/_sparse_pv.cuh.j2)."""
    B, H, S, D = t.shape
    if not t.is_contiguous() or S % 16:
        raise AttngenError(f"key_groups_spec needs a contiguous tensor with S a multiple of 16, got {tuple(t.shape)}")
    row = D * t.element_size()
    dims = (D, 4, 4, S // 16, B * H)
    return TensorMapSpec(
        t.data_ptr(), t.dtype, dims, (row, 4 * row, 16 * row, S * row), (BOX_COLS, 2, 4, block_n // 16, 1)
    )


class TensorMap:
    """An encoded map in 64-byte aligned host memory; `arg` passes it by value as a kernel parameter."""

    def __init__(self, s: TensorMapSpec):
        self.spec = s
        self._buffer = ctypes.create_string_buffer(_MAP_BYTES + _MAP_ALIGN)
        address = ctypes.addressof(self._buffer)
        address += -address % _MAP_ALIGN
        _encode(s, address)
        self.arg = driver.ByValue(address)  # the launch copies the 128 bytes at the address


@functools.lru_cache(maxsize=512)
def tensor_map(s: TensorMapSpec) -> TensorMap:
    """Encoded once per layout: a training loop's tensors reuse a few addresses, so launches rarely re-encode."""
    return TensorMap(s)


def _encode(s: TensorMapSpec, address: int) -> None:
    rank = len(s.dims)
    dims = (ctypes.c_uint64 * rank)(*s.dims)
    strides = (ctypes.c_uint64 * (rank - 1))(*s.strides)
    box = (ctypes.c_uint32 * rank)(*s.box)
    ones = (ctypes.c_uint32 * rank)(*[1] * rank)
    status = driver.lib().cuTensorMapEncodeTiled(
        address, _DTYPES[s.dtype], rank, s.address, dims, strides, box, ones, 0, _SWIZZLE_128B, _L2_PROMOTION_256B, 0
    )
    driver.check(status, f"cuTensorMapEncodeTiled for {s}")
