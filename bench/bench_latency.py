"""Time per call at small shapes, where the host sets the pace: attngen against SDPA's FlashAttention-2 and cuDNN
back ends, causal, fp16, forward and forward+backward. Calls run back to back with no synchronisation between them
(as in a training step), so each time is the slower of the host's work per call and the GPU's.

    python bench/bench_latency.py [--out latency.json]     # on a GPU

A call's host time shows wherever it exceeds the kernels' time: attngen's ratio (other / attngen) below 1 at the
small shapes and near the large ones' means Python on the call path, not the kernels, is what to shorten."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen as ag

SHAPES = ((1, 1, 128, 64), (1, 8, 512, 64), (2, 16, 1024, 128), (4, 16, 2048, 128))
BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def per_call_us(fn, calls: int = 300, repeats: int = 5) -> float:
    """Median over `repeats` of the microseconds per call of `calls` back-to-back calls (one sync at the end)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "latency.json"))
    args = ap.parse_args()
    pattern, rows = ag.causal(), []
    print(f"{'B, H, S, D':>20} {'step':>8} {'attngen':>10}  " + "  ".join(f"{n:>18}" for n in BACKENDS))
    for B, H, S, D in SHAPES:
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in "qkv")
        dout = torch.randn_like(q)

        def attngen_fwd():
            with torch.no_grad():
                ag.attention(q, k, v, pattern)

        def attngen_fwd_bwd():
            torch.autograd.grad(ag.attention(q, k, v, pattern), (q, k, v), dout)

        def sdpa(backend, backward):
            def run():
                with sdpa_kernel(backend):
                    if not backward:
                        with torch.no_grad():
                            F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        return
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(out, (q, k, v), dout)

            return run

        for step, mine, backward in (("fwd", attngen_fwd, False), ("fwd+bwd", attngen_fwd_bwd, True)):
            us = per_call_us(mine)
            others = {}
            for name, backend in BACKENDS.items():
                try:
                    others[name] = per_call_us(sdpa(backend, backward))
                except RuntimeError as exc:  # a back end this torch or GPU lacks
                    print(f"  {name}: {str(exc).splitlines()[0][:80]}")
            rows.append(dict(shape=[B, H, S, D], step=step, attngen_us=us, others_us=others))
            cells = [f"{others[n]:8.1f} us {others[n] / us:5.2f}x" if n in others else f"{'-':>18}" for n in BACKENDS]
            print(f"{(B, H, S, D)!s:>20} {step:>8} {us:7.1f} us  {'  '.join(cells)}", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
