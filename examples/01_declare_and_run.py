"""Declare a pattern, run it, check it against the reference and time it against PyTorch SDPA.

    python examples/01_declare_and_run.py
    python examples/01_declare_and_run.py --seq 8192 --heads 8

The pattern is a causal sliding window of 1024 keys plus 16 global tokens. attngen's output is compared with
the float64 reference (reference.py) on a slice of the heads, then attngen, SDPA with the same pattern as a dense
boolean mask, and SDPA's dense causal kernel (a different, denser pattern, for scale) are timed: median of
CUDA-event timings. Exits 1 if the error is above the fp16 tolerance. Without a GPU it shows what would run
(the plan, compiled for sm_90) and exits 0."""

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import attngen
from attngen import reference

PATTERN = attngen.causal() & attngen.sliding_window(1024) | attngen.global_tokens(16)
TOLERANCE = 2e-3  # ||out - ref|| / ||ref|| for fp16 (11 significant bits; P is rounded to fp16 before P V)


def median_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of `fn` on the GPU, each call bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    B, H, S, D = args.batch, args.heads, args.seq, args.head_dim
    print(f"pattern  {PATTERN!r}")

    if not torch.cuda.is_available():
        print("no CUDA GPU here: running the kernel needs one. What would run, compiled for sm_90:")
        print(attngen.compile(PATTERN, head_dim=D, dtype=torch.float16, arch="sm_90").explain(S, S))
        return 0

    print(attngen.compile(PATTERN, head_dim=D, dtype=torch.float16).explain(S, S))  # this GPU's arch
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(3))
    out = attngen.attention(q, k, v, PATTERN)

    # Heads are independent; the float64 oracle builds S x S scores, so check a slice of them.
    ref, _ = reference.attention(q[:1, :2], k[:1, :2], v[:1, :2], PATTERN)
    err = out[:1, :2].double() - ref
    rel = (err.norm() / ref.norm()).item()
    print(
        f"\nvs reference (batch 0, heads 0-1, float64): max abs error {err.abs().max().item():.2e}, "
        f"relative error {rel:.2e} (tolerance {TOLERANCE:.0e})"
    )

    mask = PATTERN.mask(S, S, device="cuda")  # [1, 1, S, S] bool, what SDPA needs for the same pattern
    sdpa_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    print(f"vs SDPA with the dense mask: max abs difference {(out - sdpa_out).abs().max().item():.2e}")

    density = mask.float().mean().item()
    flops = 4 * B * H * S * S * D * density  # two matmuls over the kept (query, key) pairs
    times = {
        "attngen": median_ms(lambda: attngen.attention(q, k, v, PATTERN)),
        "SDPA, dense bool mask": median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        "SDPA is_causal (denser pattern)": median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }
    print(f"\nforward, fp16, B={B} H={H} S={S} D={D}, {density:.1%} of pairs kept, {torch.cuda.get_device_name()}")
    for name, ms in times.items():
        tflops, ratio = flops / ms / 1e9, ms / times["attngen"]
        print(f"  {name:32s} {ms:8.3f} ms  {tflops:6.1f} TFLOP/s on kept pairs  {ratio:5.2f}x attngen's time")
    return 0 if rel <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
