"""Benchmark attngen against SDPA (FlashAttention-2 and cuDNN back ends) and compiled FlexAttention, same run.

fp16, B=4, H=16. Forward: dense and causal (D 64/128, S 4096/16384), sliding_window(1024) and a random 25%
layout of 128x128 blocks (S 16384, D 64). Forward+backward: causal vs SDPA FLASH and cuDNN, the sparse ones vs Flex
(compiled with dynamic=False: one specialisation per shape, Flex at its best).
Also: cold compile of a never-seen pattern, and loading a cached kernel in a new process.
Ratios are other / attngen time (above 1: attngen is faster). Writes JSON (device, versions, every timing)."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

import attngen as ag

B, H = 4, 16
ROWS: list[dict] = []
OUT_JSON = os.path.join(os.environ.get("OUT", "."), "bench.json")


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def flops(S: int, D: int, density: float, backward: bool) -> float:
    f = 4 * B * H * S * S * D * density
    return f * 3.5 if backward else f


def record(case: str, D: int, S: int, density: float, backward: bool, ours: float, others: dict) -> None:
    row = dict(
        case=case,
        D=D,
        S=S,
        backward=backward,
        attngen_ms=ours,
        attngen_tflops=flops(S, D, density, backward) / ours / 1e9,
        others_ms=others,
        ratios={k: v / ours for k, v in others.items() if v is not None},
    )
    ROWS.append(row)
    with open(OUT_JSON, "w") as f:  # rewritten after every row, so a cut-short run still leaves its numbers
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=ROWS), f, indent=1)
    rs = "  ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items())
    print(f"{case:42s} attngen {ours:8.3f} ms {row['attngen_tflops']:6.0f} TF   {rs}", flush=True)


def fwd_bwd(fn, q, k, v, g):
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g)


def sdpa(backend, causal):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    ap.add_argument("--quick", action="store_true", help="S=4096 only")
    args = ap.parse_args()
    global OUT_JSON
    OUT_JSON = args.out
    torch.manual_seed(0)
    # Flex at its best: specialised per shape. With the default, a second shape recompiles it with dynamic
    # shapes and every later Flex number would come from that slower kernel.
    flex = torch.compile(flex_attention, dynamic=False)
    lengths = (4096,) if args.quick else (4096, 16384)

    for D in (64, 128):
        for S in lengths:
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(3))
            for causal in (False, True):
                pat = ag.causal() if causal else ag.full()
                ours = bench(lambda: ag.attention(q, k, v, pat))
                others = {
                    "sdpa_flash": bench(lambda: sdpa(SDPBackend.FLASH_ATTENTION, causal)(q, k, v)),
                    "sdpa_cudnn": bench(lambda: sdpa(SDPBackend.CUDNN_ATTENTION, causal)(q, k, v)),
                }
                if causal and D == 64:
                    bm = create_block_mask(lambda b, h, i, j: i >= j, None, None, S, S)
                    others["flex"] = bench(lambda: flex(q, k, v, block_mask=bm))
                record(
                    f"{'causal' if causal else 'dense'} fwd D{D} S{S}",
                    D,
                    S,
                    0.5 if causal else 1.0,
                    False,
                    ours,
                    others,
                )
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            g = torch.randn_like(q)
            ours = bench(fwd_bwd(lambda q, k, v: ag.attention(q, k, v, ag.causal()), qg, kg, vg, g))
            theirs = {
                "sdpa_flash": bench(fwd_bwd(sdpa(SDPBackend.FLASH_ATTENTION, True), qg, kg, vg, g)),
                "sdpa_cudnn": bench(fwd_bwd(sdpa(SDPBackend.CUDNN_ATTENTION, True), qg, kg, vg, g)),
            }
            record(f"causal fwd+bwd D{D} S{S}", D, S, 0.5, True, ours, theirs)
            del q, k, v, qg, kg, vg, g

    S, D = lengths[-1], 64
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    g = torch.randn_like(q)
    layout = torch.rand(S // 128, S // 128, device="cuda") < 0.25
    cases = {
        "sliding_window(1024)": (ag.sliding_window(1024), lambda b, h, i, j: (i >= j) & (i - j < 1024), 1024 / S),
        "random 25% 128x128 blocks": (
            ag.block_layout(layout, 128),
            lambda b, h, i, j: layout[i // 128, j // 128],
            layout.float().mean().item(),
        ),
    }
    for name, (pat, mask_mod, density) in cases.items():
        bm = create_block_mask(mask_mod, None, None, S, S)
        ours = bench(lambda: ag.attention(q, k, v, pat))
        record(
            f"{name} fwd D{D} S{S}", D, S, density, False, ours, {"flex": bench(lambda: flex(q, k, v, block_mask=bm))}
        )
        ours = bench(fwd_bwd(lambda q, k, v: ag.attention(q, k, v, pat), qg, kg, vg, g))
        theirs = bench(fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=bm), qg, kg, vg, g))
        record(f"{name} fwd+bwd D{D} S{S}", D, S, density, True, ours, {"flex": theirs})

    compile_times = measure_compile()
    c = compile_times
    print(
        f"cold compile of a new pattern (forward): {c['cold_s']:.3f} s ({c['cold_fresh_process_s']:.3f} s as the "
        f"first compile of a fresh process); cached kernel in a new process: {c['cached_load_ms']:.1f} ms "
        f"(+ {c['cached_first_launch_ms']:.1f} ms first launch)",
        flush=True,
    )
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        attngen=ag.__version__,
        cupy=__import__("cupy").__version__,
        rows=ROWS,
        compile=compile_times,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


LOAD_SNIPPET = """
import time, torch, cupy, attngen as ag
q = torch.randn(1, 1, 256, 64, device="cuda", dtype=torch.float16); cupy.zeros(1)  # CUDA context up front
if {warm}:  # this process has compiled a kernel before: NVRTC is loaded
    ag.compile(ag.local({a} + 1, {b}) & ag.causal(), head_dim=64, dtype=torch.float16)
pat = ag.local({a}, {b}) & ag.causal()
t0 = time.perf_counter(); kern = ag.compile(pat, head_dim=64, dtype=torch.float16)
t1 = time.perf_counter(); kern(q, q, q); torch.cuda.synchronize(); t2 = time.perf_counter()
print((t1 - t0) * 1e3, (t2 - t1) * 1e3)
"""


def measure_compile() -> dict:
    """Compile time of a pattern no cache has seen: in a process that has compiled before (the usual case: a new
    mask in a running program) and as the first compile of a fresh process (which also loads NVRTC). Cached: the
    same pattern in another fresh process, found on disk. Each also reports its first launch (module load,
    schedule)."""
    a, b = int(time.time()) % 997 + 3, os.getpid() % 991 + 5

    def run(directory: str, warm: bool) -> tuple[float, float]:
        env = dict(os.environ, ATTNGEN_CACHE_DIR=directory)
        code = LOAD_SNIPPET.format(a=a, b=b, warm=warm)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)
        return tuple(map(float, r.stdout.split()[-2:]))

    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as warm:
        (fresh, _), (cached, cached_launch) = run(first, False), run(first, False)
        new, new_launch = run(warm, True)
    return dict(
        cold_s=new / 1e3,
        cold_first_launch_ms=new_launch,
        cold_fresh_process_s=fresh / 1e3,
        cached_load_ms=cached,
        cached_first_launch_ms=cached_launch,
    )


if __name__ == "__main__":
    main()
