"""Stage 4 on the CPU: NVRTC compiles to cubins for sm_80 and sm_90, ptxas reports are parsed per entry,
failures carry their log and a saved source, and bad arch strings are refused with a clear message."""

import importlib
from pathlib import Path

import pytest

from attngen.errors import AttngenError, InputError
from attngen.render import KernelSource

compile_module = importlib.import_module("attngen.nvrtc")

SCALE = r"""
// fp16 / bf16 elements as bits with PTX conversions, as attngen's kernels do: no header needed.
extern "C" __global__ void scale_bf16(unsigned short* x, float s, int n) {
  __shared__ float staged[128];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  staged[threadIdx.x] = i < n ? __uint_as_float(static_cast<unsigned>(x[i]) << 16) : 0.f;
  __syncthreads();
  if (i < n) x[i] = __float_as_uint(staged[(threadIdx.x + 1) % 128] * s) >> 16;
}
extern "C" __global__ void scale_fp16(unsigned short* x, float s, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    float f;
    unsigned short h = x[i];
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f * s));
    x[i] = h;
  }
}
"""


def scale_source(arch: str, code: str = SCALE) -> KernelSource:
    return KernelSource(name="scale", code=code, entries=("scale_bf16", "scale_fp16"), arch=arch)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles_to_cubin_with_resources(arch):
    binary = compile_module.nvrtc_compile(scale_source(arch))
    assert binary.cubin[:4] == b"\x7fELF"
    assert binary.arch == arch
    assert binary.entries == ("scale_bf16", "scale_fp16")
    for entry in binary.entries:
        resources = binary.resources_of(entry)
        assert resources.registers > 0
        assert (resources.spill_stores, resources.spill_loads, resources.stack_bytes) == (0, 0, 0)
    assert binary.resources_of("scale_bf16").shared_bytes == 128 * 4
    assert binary.resources_of("scale_fp16").shared_bytes == 0
    assert dict(binary.resource_map) == dict(binary.resources)
    assert f"for '{arch}'" in binary.log


def test_resources_print_one_line_per_field():
    resources = compile_module.Resources(registers=72, shared_bytes=384, stack_bytes=8, spill_stores=4, spill_loads=2)
    assert str(resources).splitlines() == [
        "registers: 72",
        "shared_bytes: 384",
        "spill_stores: 4",
        "spill_loads: 2",
        "stack_bytes: 8",
    ]


def test_ptxas_report_keeps_device_function_frames_out_of_entries():
    # Verbatim shape of a real report: a noinline device function's block follows the entry's own.
    log = """\
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
ptxas         .     256 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 256 bytes cumulative stack size, 360 bytes cmem[0]
ptxas info    : Function properties for _Z1hf
ptxas         .     64 bytes stack frame, 99 bytes spill stores, 99 bytes spill loads
ptxas info    : Compiling entry function 'g' for 'sm_80'
ptxas info    : Function properties for g
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 1 barriers, 384 bytes smem, 368 bytes cmem[0]
"""
    report = compile_module.parse_ptxas_report(log)
    assert report == {
        "k": compile_module.Resources(registers=32, shared_bytes=0, stack_bytes=256, spill_stores=8, spill_loads=12),
        "g": compile_module.Resources(registers=8, shared_bytes=384, stack_bytes=0, spill_stores=0, spill_loads=0),
    }


def test_syntax_error_raises_with_log_and_saved_source():
    code = SCALE.replace("float s, int n) {\n  __shared__", "float s, int n) {\n  undeclared_name = 1;\n  __shared__")
    with pytest.raises(compile_module.CompileError) as caught:
        compile_module.nvrtc_compile(scale_source("sm_90", code))
    error = caught.value
    assert isinstance(error, AttngenError)
    assert '"undeclared_name" is undefined' in error.log
    assert error.log in str(error) and str(error.source_path) in str(error)
    assert Path(error.source_path).read_text() == code


def test_missing_entry_is_a_compile_error():
    source = KernelSource(name="scale", code=SCALE, entries=("scale_bf16", "scale_fp32"), arch="sm_80")
    with pytest.raises(compile_module.CompileError, match="scale_fp32"):
        compile_module.nvrtc_compile(source)


@pytest.mark.parametrize("arch", ["sm90", "compute_90", "sm_90x", "SM_90", "sm_", "90", ""])
def test_malformed_arch_is_refused(arch):
    with pytest.raises(InputError, match=r"arch must look like 'sm_80'"):
        compile_module.nvrtc_compile(scale_source(arch))


def test_arch_nvrtc_does_not_know_is_refused():
    with pytest.raises(InputError, match=r"cannot compile for sm_999; it supports .*sm_90"):
        compile_module.nvrtc_compile(scale_source("sm_999"))


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100a", "sm_120"])
def test_well_formed_arch_is_accepted(arch):
    assert compile_module.check_arch(arch) == arch


@pytest.mark.parametrize(
    ("arch", "device", "runs"),
    [
        ("sm_80", "sm_86", True),
        ("sm_86", "sm_80", False),
        ("sm_80", "sm_90", False),
        ("sm_90a", "sm_90", True),
        ("sm_90a", "sm_100", False),
        ("sm_120", "sm_120", True),
    ],
)
def test_cubin_compatibility(arch, device, runs):
    assert compile_module._runs_on(arch, device) is runs


def test_nvrtc_version_is_the_loaded_library_and_keys_the_cache(monkeypatch):
    from cupy.cuda import nvrtc

    from attngen.render import KernelSource

    assert compile_module.nvrtc_version() == tuple(int(x) for x in nvrtc.getVersion())
    src = KernelSource(name="k", code='extern "C" __global__ void k() {}', entries=("k",), arch="sm_80")
    key = compile_module.cache_key(src)
    monkeypatch.setattr(compile_module, "nvrtc_version", lambda: (99, 1))  # another NVRTC, another cubin
    assert compile_module.cache_key(src) != key


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
def test_loaded_function_runs_on_gpu():
    import numpy as np
    import torch

    from attngen import device as launcher
    from attngen import driver

    device = torch.cuda.current_device()
    binary = compile_module.nvrtc_compile(scale_source(compile_module.device_arch(device)))
    function = compile_module.load_function(binary, "scale_fp16", device)
    assert compile_module.load_function(binary, "scale_fp16", device) == function
    x = torch.randn(1000, device="cuda", dtype=torch.float16)
    expected = x.float() * 3
    args = [np.uint64(x.data_ptr()), np.float32(3), np.int32(1000)]
    launcher.launch(binary, "scale_fp16", (4,), 256, 0, args, x.device)
    torch.testing.assert_close(x.float(), expected, rtol=2e-3, atol=0)
    compile_module.ensure_dynamic_shared(function, 100 * 1024)
    cap = driver.get_attribute(function, driver.MAX_DYNAMIC_SHARED)
    assert cap == 100 * 1024
    compile_module.ensure_dynamic_shared(function, 64 * 1024)  # a smaller launch must not lower the cap
    assert driver.get_attribute(function, driver.MAX_DYNAMIC_SHARED) == cap
    with pytest.raises(AttngenError, match=r"launching scale_fp16 .* CUDA_ERROR_INVALID_VALUE"):  # 2048 threads
        launcher.launch(binary, "scale_fp16", (4,), 2048, 0, args, x.device)
