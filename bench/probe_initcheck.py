"""Does compute-sanitizer's initcheck see memory written by TMA stores? A minimal reproducer, outside attngen's
kernels: one kernel writes a fresh 64 x 64 tensor of 2-byte elements in one of three ways, a second kernel reads
every element.

    python bench/probe_initcheck.py              # on a GPU (sm_90): runs each way under initcheck, prints a table
    python bench/probe_initcheck.py --way tma    # one way, without the sanitizer

Ways: `plain` (st.global from every thread), `bulk` (one cp.async.bulk shared -> global copy), `tma`
(cp.async.bulk.tensor store through a tensor map, as the sm_90a forward writes O), `cublas` (torch.bmm's fp32
scores from fp16 operands, as top-k by token scores keys; read as words). All three write every byte and
the reader checks the values, so a report on a way whose values check out is initcheck not recording the write."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = COLS = 64
WAYS = ("plain", "bulk", "tma", "cublas")

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;  // the elements are only moved: written as bit patterns, read back as integers
struct alignas(64) TensorMap { unsigned char bytes[128]; };

extern "C" __global__ void write_plain(u16* dst) {  // element i holds the bits i
  for (int i = threadIdx.x; i < 64 * 64; i += blockDim.x) dst[i] = static_cast<u16>(i);
}

// The tile filled as write_plain fills dst and made visible to the async proxy; its shared-memory address.
__device__ __forceinline__ u32 staged(u16* tile) {
  for (int i = threadIdx.x; i < 64 * 64; i += blockDim.x) tile[i] = static_cast<u16>(i);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  return static_cast<u32>(__cvta_generic_to_shared(tile));
}

__device__ __forceinline__ void drain() {  // this thread's bulk stores complete
  asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group 0;" ::: "memory");
}

extern "C" __global__ void write_bulk(u16* dst) {
  __shared__ __align__(1024) u16 tile[64 * 64];
  const u32 src = staged(tile);
  if (threadIdx.x == 0) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(dst), "r"(src), "r"(64 * 64 * 2)
                 : "memory");
    drain();
  }
}

// The map's 128-byte swizzle permutes 16-byte chunks within each 128-byte row; the reader undoes it.
extern "C" __global__ void write_tma(const __grid_constant__ TensorMap map) {
  __shared__ __align__(1024) u16 tile[64 * 64];
  const u32 src = staged(tile);
  if (threadIdx.x == 0) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {0, 0, 0, 0}], [%1];"
                 :: "l"(&map), "r"(src) : "memory");
    drain();
  }
}

extern "C" __global__ void read(const u16* src, int* out) {
  for (int i = threadIdx.x; i < 64 * 64; i += blockDim.x) out[i] = src[i];
}

extern "C" __global__ void read_words(const u32* src, u32* out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = src[i];
}
"""


def run_way(way: str) -> None:
    """Write a fresh tensor one way, read it back with a kernel, check the values."""
    import numpy as np
    import torch

    from attngen import device, tensormap
    from attngen.nvrtc import nvrtc_compile
    from attngen.render import KernelSource

    dev = torch.device("cuda", 0)
    entries = ("write_plain", "write_bulk", "write_tma", "read", "read_words")
    binary = nvrtc_compile(KernelSource("probe_initcheck", SOURCE, entries, "sm_90a"))
    if way == "cublas":  # fp32 scores from fp16 operands, as top-k by token and the threshold compute them
        a, b = (torch.randn(8, 200, 64, device=dev, dtype=torch.float16) for _ in range(2))
        s = torch.bmm(a, b.transpose(1, 2), out_dtype=torch.float32)
        words = torch.empty(s.numel(), dtype=torch.int32, device=dev)
        n = np.int32(s.numel())
        device.launch(
            binary, "read_words", (64,), 256, 0, [np.uint64(s.data_ptr()), np.uint64(words.data_ptr()), n], dev
        )
        torch.cuda.synchronize(dev)
        print(f"{way}: values {'correct' if torch.equal(words, s.flatten().view(torch.int32)) else 'WRONG'}")
        return
    dst = torch.empty(1, 1, ROWS, COLS, dtype=torch.float16, device=dev)
    out = torch.empty(ROWS * COLS, dtype=torch.int32, device=dev)
    if way == "tma":
        tmap = tensormap.tensor_map(tensormap.spec(dst, ROWS))
        device.launch(binary, "write_tma", (1,), 128, 0, [tmap.arg], dev)
    else:
        device.launch(binary, f"write_{way}", (1,), 128, 0, [np.uint64(dst.data_ptr())], dev)
    device.launch(binary, "read", (1,), 128, 0, [np.uint64(dst.data_ptr()), np.uint64(out.data_ptr())], dev)
    torch.cuda.synchronize(dev)
    got = out.view(ROWS, COLS // 8, 8)
    want = torch.arange(ROWS * COLS, device=dev, dtype=torch.int32).view(ROWS, COLS // 8, 8)
    if way == "tma":  # 128-byte swizzle: chunk c of row r lands at chunk c ^ (r % 8)
        chunks = torch.arange(COLS // 8, device=dev)[None, :] ^ (torch.arange(ROWS, device=dev)[:, None] % 8)
        want = want.gather(1, chunks[:, :, None].expand(-1, -1, 8))
    print(f"{way}: values {'correct' if torch.equal(got, want) else 'WRONG'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--way", choices=WAYS, help="run one way, without the sanitizer")
    args = ap.parse_args()
    if args.way:
        run_way(args.way)
        return 0
    rows = []
    for way in WAYS:
        cmd = ["compute-sanitizer", "--tool", "initcheck", sys.executable, __file__, "--way", way]
        log = subprocess.run(cmd, capture_output=True, text=True).stdout
        values = re.search(r"values (\w+)", log)
        errors = re.search(r"ERROR SUMMARY: (\d+) error", log)
        first = re.search(r"=+ (Uninitialized.*)", log)
        rows.append((way, values[1] if values else "?", errors[1] if errors else "?", first[1] if first else ""))
        if not (values and errors):
            print(log[-2000:])
    print(f"{'way':6} {'values':8} {'initcheck errors':17} first report")
    for way, values, errors, first in rows:
        print(f"{way:6} {values:8} {errors:17} {first[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
