"""Compile every kernel the GPU tests and the benchmark use, in parallel, into $ATTNGEN_CACHE_DIR.

NVRTC compiles one file per process at a time; a pool fills the disk cache in seconds so the test and
benchmark processes only load cubins."""

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(job):
    from attngen.launch import get_kernel

    pattern, head_dim, dtype, arch = job
    kern = get_kernel(pattern, head_dim, dtype, arch)
    kern.backward_binary  # noqa: B018 - compiles and caches the backward kernels
    return repr(pattern), head_dim, dtype


def jobs(arch: str):
    from test_kernels_gpu import PATTERNS

    import attngen as ag

    pats = [*list(PATTERNS.values()), ag.sliding_window(1024), ag.causal() & ag.sliding_window(256)]
    out = [(p, d, t, arch) for p in pats for d in (64, 128) for t in ("fp16", "bf16")]
    layout = ag.block_layout(torch.rand(128, 128) < 0.25, 128)  # the benchmark's kind of layout (same code)
    return [*out, (layout, 64, "fp16", arch)]


if __name__ == "__main__":
    arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
    todo = jobs(arch)
    with ProcessPoolExecutor(max_workers=16) as pool:
        for _ in pool.map(build, todo):
            pass
    print(f"prewarmed {len(todo)} forward + backward kernel sets for {arch}")
