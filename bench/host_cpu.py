"""The Python cost of a call, on a machine without a GPU: `attngen.attention` forward and forward+backward with the
kernels compiled for real (NVRTC, sm_90) and launched through a stand-in driver that accepts every launch, on CPU
tensors. What it times is the call path's Python (checks, prepare, plan and schedule lookups, argument packing, the
launch's ctypes work), not CUDA's: a GPU run measures the whole (`bench/bench_latency.py`), this one shows which
part of it is Python and where, without spending GPU time.

    python bench/host_cpu.py [--calls 300] [--patterns causal window documents] [--profile]

The outputs are meaningless (no kernel runs); only the time is read."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import time

import torch

import attngen as ag
from attngen import bind, device, driver, launch, nvrtc, op, tensormap

PATTERNS = {
    "causal": lambda: ag.causal(),
    "window": lambda: ag.causal() & ag.sliding_window(256),
    "documents": lambda: ag.documents() & ag.causal(),
}
SHAPE = (1, 8, 512, 64)  # B, H, S, D


class _Driver:
    """Accepts every call the launch path makes, as a driver would, and does nothing."""

    def cuLaunchKernel(self, *args):
        return 0

    def cuCtxGetCurrent(self, out):
        return 0


@contextlib.contextmanager
def cpu_launches(arch: str = "sm_90"):
    """attngen's call path on CPU tensors: kernels compiled for `arch`, launched through `_Driver` on stream 0."""
    stand_in = _Driver()

    def launch_on_cpu(binary, entry, grid, threads, smem, args, dev):
        fn = nvrtc.load_function(binary, entry, dev.index)
        driver.launch(fn, grid, (threads,), smem, 0, args, dev.index, entry)

    saved = [
        (driver, "lib", lambda: stand_in),
        (driver, "_context", lambda index: None),
        (launch, "_require_cuda", lambda q: None),
        (op, "_arch", lambda index: arch),
        (bind, "sm_count", lambda index: 132),
        (device, "sm_count", lambda index: 132),
        (nvrtc, "_function", lambda cubin, arch, entry, index: 1),
        (tensormap, "_encode", lambda spec, address: None),
        (bind, "launch", launch_on_cpu),
        (device, "launch", launch_on_cpu),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in saved]
    for obj, name, value in saved:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in originals:
            setattr(obj, name, value)


def per_call_us(fn, calls: int, repeats: int = 5) -> float:
    for _ in range(min(calls, 20)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    ap.add_argument("--profile", action="store_true", help="print the functions a forward+backward spends most in")
    args = ap.parse_args()
    torch.set_num_threads(1)
    B, H, S, D = SHAPE
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=gen).half().requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, S, D, generator=gen).half()
    docs = {"document_ids": (torch.rand(S, generator=gen) < 0.01).cumsum(0)}
    print(f"{'pattern':>10} {'forward us':>11} {'fwd+bwd us':>11}   (B, H, S, D = {SHAPE}, Python only)")
    with cpu_launches():
        for name in args.patterns:
            pat = PATTERNS[name]()
            rt = docs if "document_ids" in pat.runtime_inputs else {}

            def forward():
                with torch.no_grad():
                    ag.attention(q, k, v, pat, **rt)

            def both():
                torch.autograd.grad(ag.attention(q, k, v, pat, **rt), (q, k, v), dout)

            print(f"{name:>10} {per_call_us(forward, args.calls):11.1f} {per_call_us(both, args.calls):11.1f}")
            if args.profile and name == "causal":
                profile = cProfile.Profile()
                profile.runcall(lambda: [both() for _ in range(args.calls)])
                pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
