"""The kernel cache: keys, memory and disk hits without NVRTC, repair of damaged entries, read-only and memory-only
directories, one artifact from racing processes, listing and clearing, and a fast hit from a fresh process."""

import importlib
import multiprocessing
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from attngen import cache
from attngen.render import KernelSource

compile_module = importlib.import_module("attngen.nvrtc")

CODE = r"""
extern "C" __global__ void axpy(float a, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
"""


def source(code: str = CODE, **changes) -> KernelSource:
    return replace(KernelSource(name="axpy", code=code, entries=("axpy",), arch="sm_80"), **changes)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache directory and an empty memory cache for one test."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(directory))
    monkeypatch.setattr(cache, "_memory", {})
    return directory


def cache_key(src: KernelSource) -> str:
    return compile_module.cache_key(src)


@pytest.fixture
def builds(monkeypatch):
    """Counts real NVRTC compiles made through compile_cached."""
    calls = []
    real = compile_module.nvrtc_compile

    def counting(source):
        calls.append(source)
        return real(source)

    monkeypatch.setattr(compile_module, "nvrtc_compile", counting)
    return calls


def entry_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.bin"))


def test_key_depends_on_everything_that_changes_the_cubin():
    base = cache_key(source())
    assert cache_key(source()) == base
    variants = [
        source(CODE.replace("a * x[i]", "x[i] * a")),
        source(options=("-lineinfo",)),
        source(arch="sm_90"),
        source(entries=("axpy", "other")),
    ]
    keys = {cache_key(v) for v in variants}
    assert base not in keys and len(keys) == len(variants)


def test_name_does_not_change_key():
    assert cache_key(source(name="renamed")) == cache_key(source())


def test_hits_do_not_compile(cache_dir, builds, monkeypatch):
    first = compile_module.compile_cached(source())
    assert len(builds) == 1
    assert compile_module.compile_cached(source()) == first and len(builds) == 1  # memory hit
    monkeypatch.setattr(cache, "_memory", {})  # as a new process would start
    from_disk = compile_module.compile_cached(source())
    assert len(builds) == 1
    assert from_disk == first
    (path,) = entry_files(cache_dir)
    assert path.name == f"axpy_sm_80-{cache_key(source())[:20]}.bin"


def test_store_knows_no_compiler_types(cache_dir):
    """The cache is a byte store: any bytes under a key, a note beside them, no decoding of its own."""
    key = "ab" * 32
    assert cache.fetch("blob", key, lambda: b"\x00payload", note="what made it") == b"\x00payload"
    cache._memory.clear()
    assert cache.fetch("blob", key, lambda: pytest.fail("rebuilt a stored entry")) == b"\x00payload"
    (entry,) = cache.list_entries()
    assert (entry.name, entry.note) == ("blob", "what made it")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.fetch("blob", "not-a-key", lambda: b"")
    source_text = Path(cache.__file__).read_text()
    assert "attngen.nvrtc" not in source_text and "Binary" not in source_text


def test_read_only_directory_is_still_read(cache_dir, builds, monkeypatch):
    """A prewarmed cache on a read-only mount (a container image, a shared file system) serves its kernels."""
    first = compile_module.compile_cached(source())
    assert len(builds) == 1
    monkeypatch.setattr(cache, "_memory", {})
    monkeypatch.setattr(cache, "writable", lambda directory: False)  # as on a read-only mount, even for root
    assert compile_module.compile_cached(source()) == first and len(builds) == 1
    other = compile_module.compile_cached(source(arch="sm_90"))  # a miss is built and kept in memory only
    assert len(builds) == 2 and len(entry_files(cache_dir)) == 1
    assert compile_module.compile_cached(source(arch="sm_90")) == other and len(builds) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign"])
def test_damaged_entry_is_detected_deleted_and_rebuilt(cache_dir, builds, monkeypatch, damage):
    good = compile_module.compile_cached(source())
    (path,) = entry_files(cache_dir)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "empty":
        data = b""
    else:
        data = b"\x7fELF" + bytes(data[4:])
    path.write_bytes(bytes(data))
    monkeypatch.setattr(cache, "_memory", {})
    with pytest.warns(cache.CacheWarning, match="corrupt"):
        rebuilt = compile_module.compile_cached(source())
    # Rebuilt from scratch: same cubin and resources (the log differs, it holds ptxas's compile time).
    assert (rebuilt.cubin, rebuilt.resources) == (good.cubin, good.resources)
    assert len(builds) == 2
    assert path.read_bytes() != bytes(data)
    monkeypatch.setattr(cache, "_memory", {})
    assert compile_module.compile_cached(source()) == rebuilt and len(builds) == 2


def test_unwritable_directory_falls_back_to_memory(tmp_path, builds, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should go")
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(cache, "_memory", {})
    with pytest.warns(cache.CacheWarning, match=str(blocker / "cache")):
        first = compile_module.compile_cached(source())
    assert cache.cache_dir() is None
    assert compile_module.compile_cached(source()) == first
    assert len(builds) == 1
    assert cache.list_entries() == [] and cache.clear() == 0


def _race(directory: str, marker: str, start, results) -> None:
    """Child process: count builds in `marker`, hold the build long enough for the other child to collide."""
    import time

    os.environ["ATTNGEN_CACHE_DIR"] = directory
    compile_module = importlib.import_module("attngen.nvrtc")
    real = compile_module.nvrtc_compile

    def slow_counting_build(source):
        with open(marker, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return real(source)

    compile_module.nvrtc_compile = slow_counting_build
    start.wait()
    binary = compile_module.compile_cached(source())
    results.put(binary.cubin)


@pytest.mark.slow
def test_racing_processes_compile_once(tmp_path):
    directory, marker = tmp_path / "cache", tmp_path / "builds.txt"
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_race, args=(str(directory), str(marker), start, results)) for _ in range(2)]
    for child in children:
        child.start()
    cubins = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len(marker.read_text().splitlines()) == 1
    assert len(entry_files(directory)) == 1
    assert cubins[0] == cubins[1] and cubins[0][:4] == b"\x7fELF"
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*.tmp"))


def test_list_and_clear(cache_dir):
    compile_module.compile_cached(source())
    compile_module.compile_cached(source(arch="sm_90"))
    entries = cache.list_entries()
    assert [e.name for e in entries] == ["axpy_sm_80", "axpy_sm_90"]
    assert all(e.size == e.path.stat().st_size > 0 and e.path.parent == cache_dir for e in entries)
    assert cache.cache_dir() == cache_dir
    assert cache.clear() == 2
    assert cache.list_entries() == [] and not list(cache_dir.iterdir())


def test_hit_in_a_new_process_is_fast_and_never_compiles(cache_dir):
    compile_module.compile_cached(source())
    # Imports are outside the timed part: a process using attngen has CuPy and torch loaded anyway.
    script = textwrap.dedent(
        f"""
        import importlib, time
        import cupy
        import attngen.cache
        from attngen.render import KernelSource
        compile_module = importlib.import_module("attngen.nvrtc")
        def refuse(source):
            raise AssertionError("cache hit compiled")
        compile_module.nvrtc_compile = refuse
        source = KernelSource(name="axpy", code={CODE!r}, entries=("axpy",), arch="sm_80")
        start = time.perf_counter()
        binary = compile_module.compile_cached(source)
        print(time.perf_counter() - start, binary.resources_of("axpy").registers)
        """
    )
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "ATTNGEN_CACHE_DIR": str(cache_dir), "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    seconds, registers = result.stdout.split()
    assert float(seconds) < 0.05
    assert int(registers) > 0
