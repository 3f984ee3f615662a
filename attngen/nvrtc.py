"""Stage 4: KernelSource -> Binary (a cubin plus the ptxas resource report of each entry), compiled by NVRTC.

NVRTC runs in-process through CuPy, so no CUDA toolkit is needed: rendered sources include no header, so NVRTC
needs nothing beside itself. A failed compile raises CompileError carrying the full log and a path to the exact
source text that failed.
`compile_cached` goes through cache.py, a byte store: encoding a Binary (and its cache key) belongs here.
`load_function` turns a Binary into a launchable CUfunction (attngen/driver.py: the driver through ctypes, no CuPy)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

from attngen import cache, driver
from attngen._version import __version__
from attngen.errors import AttngenError, InputError
from attngen.render import KernelSource

# Options every compile uses; `-arch`, the source's own options and `-I` dirs are added per compile.
BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v")
# Above this much dynamic shared memory CUDA requires an explicit per-function opt-in.
DEFAULT_DYNAMIC_SHARED_LIMIT = 48 * 1024

_ARCH = re.compile(r"sm_(\d+)(a?)")
# The kernels use cp.async, ldmatrix and bf16 mma.sync, which need compute capability 8.0.
MIN_COMPUTE_CAPABILITY = 80
TOO_OLD = "attngen needs an NVIDIA GPU of compute capability sm_80 or newer (Ampere, Ada, Hopper, Blackwell)"
NO_CUPY = (
    "attngen compiles and launches kernels through CuPy, which is not installed; install it with "
    'pip install "attngen[cuda13]" (or "attngen[cuda12]" for a CUDA 12 driver)'
)


@dataclass(frozen=True)
class Resources:
    """What ptxas reports for one kernel entry; spills above zero usually mean a slow kernel."""

    registers: int
    shared_bytes: int  # static shared memory only; dynamic shared memory is chosen at launch
    stack_bytes: int
    spill_stores: int
    spill_loads: int

    def __str__(self) -> str:
        return "\n".join(
            f"{name}: {getattr(self, name)}"
            for name in ("registers", "shared_bytes", "spill_stores", "spill_loads", "stack_bytes")
        )


@dataclass(frozen=True)
class Binary:
    """A compiled cubin for one arch and the resources of each entry, in the source's entry order."""

    cubin: bytes = field(repr=False)
    arch: str
    resources: tuple[tuple[str, Resources], ...]
    log: str = field(repr=False)

    @property
    def entries(self) -> tuple[str, ...]:
        return tuple(entry for entry, _ in self.resources)

    @property
    def resource_map(self) -> Mapping[str, Resources]:
        """Read-only entry -> Resources view."""
        return MappingProxyType(dict(self.resources))

    @property
    def performance_notes(self) -> tuple[str, ...]:
        """What ptxas says it had to give up (wgmma serialised, setmaxnreg ignored): empty for a kernel that
        compiled as written. Informational notes that cost nothing (see `_BENIGN_NOTE`) are left out."""
        return tuple(
            line.split(":", 1)[1].strip()
            for line in self.log.splitlines()
            if _PERFORMANCE_NOTE.search(line) and not _BENIGN_NOTE.search(line)
        )

    def resources_of(self, entry: str) -> Resources:
        for name, resources in self.resources:
            if name == entry:
                return resources
        raise KeyError(f"no kernel entry {entry!r} in this binary; it defines {', '.join(self.entries)}")

    def __str__(self) -> str:
        return "\n".join(f"# {entry}\n{resources}" for entry, resources in self.resources)


class CompileError(AttngenError):
    """NVRTC rejected a source. `.log` is the compiler's log, `.source_path` a saved copy of the source."""

    def __init__(self, message: str, log: str, source_path: Path | None) -> None:
        # All three go to Exception.args so the error survives pickling (e.g. from a worker process).
        super().__init__(message, log, source_path)
        self.log = log
        self.source_path = source_path

    def __str__(self) -> str:
        message = self.args[0]
        saved = self.source_path if self.source_path is not None else "(could not be saved)"
        return f"{message}\nsource: {saved}\n{self.log.rstrip()}"


def check_arch(arch: str) -> str:
    """Return `arch` if it names a real-GPU target such as sm_80, sm_90a or sm_120; raise InputError if not."""
    if not isinstance(arch, str) or _ARCH.fullmatch(arch) is None:
        raise InputError(
            f"arch must look like 'sm_80', 'sm_90', 'sm_90a' or 'sm_120' (sm_ + compute capability digits, "
            f"optionally 'a'); got {arch!r}"
        )
    if int(_ARCH.fullmatch(arch)[1]) < MIN_COMPUTE_CAPABILITY:
        raise InputError(f"{TOO_OLD}; got arch={arch!r}")
    return arch


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library CuPy loads. A cache hit needs only this, so it is asked without importing
    CuPy (~0.1-0.4 s): the library is found as CuPy finds it (cuda.pathfinder) and asked through ctypes."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        lib = ctypes.CDLL(load_nvidia_dynamic_lib("nvrtc").abs_path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) == 0:
            return major.value, minor.value
    except (ImportError, OSError, RuntimeError, AttributeError):  # not found that way: ask CuPy
        pass
    try:
        from cupy.cuda import nvrtc  # importing CuPy costs ~0.4 s, so only code that needs NVRTC pays it
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "cupy":
            raise
        raise AttngenError(NO_CUPY) from exc

    major, minor = nvrtc.getVersion()
    return int(major), int(minor)


def nvrtc_compile(source: KernelSource) -> Binary:
    """Compile `source` for `source.arch` to a cubin and read each entry's registers, shared memory and spills."""
    try:
        from cupy.cuda import nvrtc
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "cupy":
            raise
        raise AttngenError(NO_CUPY) from exc

    arch = check_arch(source.arch)
    supported = nvrtc.getSupportedArchs()
    if int(_ARCH.fullmatch(arch)[1]) not in supported:
        major, minor = nvrtc_version()
        raise InputError(
            f"NVRTC {major}.{minor} cannot compile for {arch}; it supports {', '.join(f'sm_{cc}' for cc in supported)}"
        )
    options = [f"-arch={arch}", *BASE_OPTIONS, *source.options]
    if nvrtc_version() >= (12, 9):
        # NVRTC 12.9+ keeps a cache of its own; a hit there skips ptxas and so the resource report parsed below.
        options.append("--no-cache")
    program = nvrtc.createProgram(source.code, f"{source.name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            # An invalid option leaves the program log empty; the exception text is then the only clue.
            log = nvrtc.getProgramLog(program).strip("\x00").strip() or str(exc)
            raise CompileError(f"NVRTC failed to compile {source.name} for {arch}", log, _save(source)) from None
        log = nvrtc.getProgramLog(program).rstrip("\x00")  # CuPy keeps the C string's terminator
        cubin = nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    report = parse_ptxas_report(log)
    missing = [entry for entry in source.entries if entry not in report]
    if missing:
        raise CompileError(
            f"{source.name}: ptxas reported no kernel named {', '.join(missing)}; every entry must be an "
            'extern "C" __global__ function of the source',
            log,
            _save(source),
        )
    return Binary(cubin=cubin, arch=arch, resources=tuple((e, report[e]) for e in source.entries), log=log)


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PERFORMANCE_NOTE = re.compile(r"\(C75\d\d\)")  # ptxas's notes on wgmma pipelining and register hand-over
# The one C75xx note that reports no loss. The ptxas inside NVRTC 13.0 (13.0.88, the version the CUDA 13 torch
# wheels pin; CUDA 12.8's ptxas too) prints "(C7519) warpgroup.arrive is injected in around line N by compiler to
# allow use of registers in GMMA in function '...'" at wgmmas that read their A operand from registers (the
# sm_90a kernels' P·V and backward products): ptxas adds the warpgroup.arrive (wgmma.fence) such a wgmma needs
# after its registers were written, and the wgmmas stay asynchronous. NVRTC 13.5 no longer contains the message,
# and kernels from 13.0 and 13.5 ran at the same speed on an H200. Lost performance is worded "Potential
# Performance Loss: wgmma.mma_async instructions are serialized ..." (C7510, C7511, C7515, ...) or "Potential
# Performance Loss: 'setmaxnreg' ignored ..." (C7504, C7507, C7508) and stays a note, as does any C75xx line not
# matched below. Both the code and the wording must match, so a renumbered or reworded note is reported.
_BENIGN_NOTE = re.compile(r"\(C7519\) warpgroup\.arrive is injected in around line \d+ by compiler")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")


def parse_ptxas_report(log: str) -> dict[str, Resources]:
    """Entry name -> Resources from a `--ptxas-options=-v` log.

    Non-entry device functions also get a "Function properties" block; their stack and spills are not the
    entry's, so a block only counts when it names the entry ptxas is compiling."""
    found: dict[str, dict[str, int]] = {}
    entry = properties_of = None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            entry = match[1]
            found[entry] = {f.name: 0 for f in fields(Resources)}
        elif match := _PROPERTIES.search(line):
            properties_of = match[1]
        elif (match := _FRAME.search(line)) and entry is not None and properties_of == entry:
            stack, stores, loads = map(int, match.groups())
            found[entry].update(stack_bytes=stack, spill_stores=stores, spill_loads=loads)
        elif (match := _REGISTERS.search(line)) and entry is not None:
            found[entry]["registers"] = int(match[1])
            if shared := _SHARED.search(line):
                found[entry]["shared_bytes"] = int(shared[1])
    return {name: Resources(**values) for name, values in found.items()}


def _save(source: KernelSource) -> Path | None:
    """Write the failing source where the user can open it; named by content so retries do not pile up."""
    digest = hashlib.sha256(source.code.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir(), "attngen-failed", f"{source.name}-{source.arch}-{digest}.cu")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source.code)
    except OSError:
        return None
    return path


def compile_cached(source: KernelSource, note: str = "") -> Binary:
    """`nvrtc_compile(source)` through the kernel cache (a hit involves no NVRTC compile); `note` says what made
    the kernel (shown by `attngen cache list`)."""
    data = cache.fetch(f"{source.name}_{source.arch}", cache_key(source), lambda: encode(nvrtc_compile(source)), note)
    return decode(data)


@functools.cache
def attngen_version() -> str:
    """Installed distribution version, or the source tree's when attngen runs uninstalled."""
    import importlib.metadata

    try:
        return importlib.metadata.version("attngen")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def cache_key(source: KernelSource) -> str:
    """Hex sha256 naming the Binary that `source` compiles to with this NVRTC and this attngen."""
    parts = [
        FORMAT,
        source.code,
        list(source.entries),
        list(source.options),
        source.arch,
        list(BASE_OPTIONS),
        list(nvrtc_version()),
        attngen_version(),
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


FORMAT = 1  # bump when `encode`'s layout changes
_JSON_LENGTH = struct.Struct("<I")


def encode(binary: Binary) -> bytes:
    """A Binary as bytes: the length of a JSON header (arch, resources, log), the header, then the cubin."""
    header = {
        "arch": binary.arch,
        "resources": [[entry, {f.name: getattr(r, f.name) for f in fields(r)}] for entry, r in binary.resources],
        "log": binary.log,
    }
    text = json.dumps(header).encode()
    return _JSON_LENGTH.pack(len(text)) + text + binary.cubin


def decode(data: bytes) -> Binary:
    """The Binary that `encode` wrote (the cache has checked the bytes' checksum)."""
    (length,) = _JSON_LENGTH.unpack_from(data)
    end = _JSON_LENGTH.size + length
    header = json.loads(data[_JSON_LENGTH.size : end])
    resources = tuple((entry, Resources(**values)) for entry, values in header["resources"])
    return Binary(cubin=bytes(data[end:]), arch=header["arch"], resources=resources, log=header["log"])


def device_arch(device_index: int) -> str:
    """The sm_XY target of CUDA device `device_index`, e.g. "sm_90" for an H100; InputError below sm_80."""
    import torch  # kept out of module import so that `attngen cache ...` stays quick

    major, minor = torch.cuda.get_device_capability(device_index)
    if major * 10 + minor < MIN_COMPUTE_CAPABILITY:
        name = torch.cuda.get_device_name(device_index)
        raise InputError(f"{TOO_OLD}; CUDA device {device_index} ({name}) is sm_{major}{minor}")
    return f"sm_{major}{minor}"


def load_function(binary: Binary, entry: str, device_index: int) -> int:
    """The CUfunction of `entry` of `binary` on device `device_index`; each cubin loads once per device."""
    binary.resources_of(entry)  # a clear KeyError instead of CUDA_ERROR_NOT_FOUND
    return _function(binary.cubin, binary.arch, entry, device_index)


def ensure_dynamic_shared(function: int, nbytes: int) -> None:
    """Let `function` launch with `nbytes` of dynamic shared memory (CUDA caps it at 48 KB unless raised)."""
    if nbytes > DEFAULT_DYNAMIC_SHARED_LIMIT:
        _raise_dynamic_shared(function, nbytes)


@functools.cache  # once per (function, size): launches pay no driver call after the first
def _raise_dynamic_shared(function: int, nbytes: int) -> None:
    # Reading the current cap first means the cap is raised once and never lowered by a smaller launch.
    if driver.get_attribute(function, driver.MAX_DYNAMIC_SHARED) < nbytes:
        driver.set_attribute(function, driver.MAX_DYNAMIC_SHARED, nbytes)


@functools.cache
def _function(cubin: bytes, arch: str, entry: str, device_index: int) -> int:
    return driver.get_function(_module(cubin, arch, device_index), entry)


@functools.cache
def _module(cubin: bytes, arch: str, device_index: int) -> int:
    device = device_arch(device_index)  # InputError for a GPU older than sm_80
    if not _runs_on(arch, device):
        raise AttngenError(
            f"kernel compiled for {arch} cannot run on CUDA device {device_index} ({device}); compile for {device}"
        )
    return driver.load_module(cubin, device_index)


def _runs_on(arch: str, device: str) -> bool:
    """Whether a cubin for `arch` runs on a `device` GPU: same major, minor not newer; 'a' targets match exactly."""
    code, specific = _ARCH.fullmatch(arch).groups()
    device_code = int(_ARCH.fullmatch(device)[1])
    if specific:
        return int(code) == device_code
    return int(code) // 10 == device_code // 10 and int(code) % 10 <= device_code % 10
