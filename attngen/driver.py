"""The CUDA driver calls that run compiled kernels, through ctypes: load a cubin into a device's primary context (the
one torch uses), raise a function's dynamic shared memory cap, launch on a stream, encode TMA tensor maps.

Launching needs neither CuPy nor a CUDA toolkit, only the driver (libcuda.so.1), so a process whose kernels are all
in the cache never imports CuPy. Kernel arguments are numpy scalars (uint64 pointers, int64, int32, float32) or
`ByValue` structs (a TMA map: the bytes at an address, copied into the launch)."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

from .errors import AttngenError

MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

_VOIDP, _INT, _UINT, _U64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_uint64
_SCALARS = {
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.float32): ctypes.c_float,
}


@dataclass(frozen=True)
class ByValue:
    """A kernel parameter passed by value whose bytes lie at `address` (kept alive by its owner)."""

    address: int


@functools.cache
def lib() -> ctypes.CDLL:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise AttngenError(f"the CUDA driver (libcuda.so.1) could not be loaded: {exc}") from None
    p = ctypes.POINTER
    signatures = {
        "cuGetErrorName": [_INT, p(ctypes.c_char_p)],
        "cuDeviceGet": [p(_INT), _INT],
        "cuDevicePrimaryCtxRetain": [p(_VOIDP), _INT],
        "cuCtxGetCurrent": [p(_VOIDP)],
        "cuCtxPushCurrent_v2": [_VOIDP],
        "cuCtxPopCurrent_v2": [p(_VOIDP)],
        "cuModuleLoadData": [p(_VOIDP), ctypes.c_char_p],
        "cuModuleGetFunction": [p(_VOIDP), _VOIDP, ctypes.c_char_p],
        "cuFuncGetAttribute": [p(_INT), _INT, _VOIDP],
        "cuFuncSetAttribute": [_VOIDP, _INT, _INT],
        "cuLaunchKernel": [_VOIDP, _UINT, _UINT, _UINT, _UINT, _UINT, _UINT, _UINT, _VOIDP, p(_VOIDP), p(_VOIDP)],
        "cuTensorMapEncodeTiled": [_VOIDP, _INT, _UINT, _VOIDP, p(_U64), p(_U64), p(_UINT), p(_UINT), *[_INT] * 4],
    }
    for name, argtypes in signatures.items():
        fn = getattr(cuda, name)
        fn.argtypes, fn.restype = argtypes, _INT
    return cuda


def check(status: int, what: str) -> None:
    """AttngenError naming the failed call and the driver's error, for a status other than CUDA_SUCCESS."""
    if status:
        name = ctypes.c_char_p()
        lib().cuGetErrorName(status, ctypes.byref(name))
        raise AttngenError(f"{what} failed: {(name.value or b'?').decode()} ({status})")


@functools.cache
def _context(device_index: int) -> int:
    """The primary context of a device: the one torch's CUDA runtime works in."""
    device, context = _INT(), _VOIDP()
    check(lib().cuDeviceGet(ctypes.byref(device), device_index), f"cuDeviceGet({device_index})")
    check(lib().cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    return context.value


class _Current:
    """Makes a device's primary context current for a block, where it is not already (no call then)."""

    def __init__(self, device_index: int):
        self.context = _context(device_index)
        self.pushed = False

    def __enter__(self):
        current = _VOIDP()
        check(lib().cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
        if current.value != self.context:
            check(lib().cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
            self.pushed = True

    def __exit__(self, *exc):
        if self.pushed:
            check(lib().cuCtxPopCurrent_v2(ctypes.byref(_VOIDP())), "cuCtxPopCurrent")


def load_module(cubin: bytes, device_index: int) -> int:
    """A CUmodule of `cubin` in the device's primary context."""
    module = _VOIDP()
    with _Current(device_index):
        check(lib().cuModuleLoadData(ctypes.byref(module), cubin), f"cuModuleLoadData on device {device_index}")
    return module.value


def get_function(module: int, entry: str) -> int:
    function = _VOIDP()
    check(lib().cuModuleGetFunction(ctypes.byref(function), module, entry.encode()), f"cuModuleGetFunction({entry})")
    return function.value


def get_attribute(function: int, attribute: int) -> int:
    value = _INT()
    check(lib().cuFuncGetAttribute(ctypes.byref(value), attribute, function), "cuFuncGetAttribute")
    return value.value


def set_attribute(function: int, attribute: int, value: int) -> None:
    check(lib().cuFuncSetAttribute(function, attribute, value), "cuFuncSetAttribute")


def launch(function: int, grid, block, shared: int, stream: int, args, device_index: int, what: str) -> None:
    """Launch `function` on `stream` (a CUstream handle, 0 for the legacy default) of device `device_index`."""
    held = []  # the argument values, alive until the launch has copied them
    pointers = (_VOIDP * max(len(args), 1))()
    for i, a in enumerate(args):
        if isinstance(a, ByValue):
            pointers[i] = a.address
        else:
            value = _SCALARS[a.dtype](a)
            held.append(value)
            pointers[i] = ctypes.addressof(value)
    gx, gy, gz = (*grid, 1, 1)[:3]
    bx, by, bz = (*block, 1, 1)[:3]
    with _Current(device_index):
        status = lib().cuLaunchKernel(function, gx, gy, gz, bx, by, bz, shared, stream, pointers, None)
    check(status, f"launching {what} (grid {tuple(grid)}, block {tuple(block)}, {shared} B of shared memory)")
