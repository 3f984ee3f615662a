"""Read the register layout of `mma.sp::ordered_metadata.m16n8k32` (f16) off the GPU: which (row, key group, slot)
each compressed A register half feeds, and which (row, key group) each metadata nibble of each lane describes.

    python bench/probe_sparse_layout.py        # on a GPU; prints both maps and checks them against the layout
                                               # the sparse P·V of templates/_fragment.cuh.j2 assumes

B (32 keys x 8 columns, fed by ldmatrix.x4.trans as the kernels feed V) is B[k][n] = 2^(k % 4) if k / 4 == n else 0,
so D[row][n] is the bit set of the positions kept in key group n of that row: one experiment per A half (the rest
0, every nibble (0, 1)) and one per (lane, nibble) (A all ones, that nibble (2, 3)) name every slot."""

from __future__ import annotations

import sys

import numpy as np

SOURCE = r"""
typedef unsigned int u32;
extern "C" __global__ void probe(const u32* a, const u32* meta, const __half* b, float* d, int n) {
  __shared__ __align__(16) __half sb[32 * 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) sb[i] = b[i];
  __syncwarp();
  u32 bf[4];
  const u32 addr = static_cast<u32>(__cvta_generic_to_shared(sb + lane * 8));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(bf[0]), "=r"(bf[1]), "=r"(bf[2]), "=r"(bf[3]) : "r"(addr));
  for (int e = 0; e < n; ++e) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    const u32* ae = a + (e * 32 + lane) * 4;
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(ae[0]), "r"(ae[1]), "r"(ae[2]), "r"(ae[3]), "r"(bf[0]), "r"(bf[1]), "r"(bf[2]), "r"(bf[3]),
          "r"(meta[e * 32 + lane]));
    const int g = lane / 4, t = lane % 4;
    float* de = d + e * 128;
    de[g * 8 + 2 * t] = c[0];
    de[g * 8 + 2 * t + 1] = c[1];
    de[(g + 8) * 8 + 2 * t] = c[2];
    de[(g + 8) * 8 + 2 * t + 1] = c[3];
  }
}
"""

ONE = 0x3C00  # fp16 1.0


def run(a: np.ndarray, meta: np.ndarray) -> np.ndarray:
    import cupy as cp

    mod = cp.RawModule(code="#include <cuda_fp16.h>\n" + SOURCE, options=("-std=c++17",))
    fn = mod.get_function("probe")
    k = np.arange(32)
    b = np.zeros((32, 8), np.float16)
    b[k, k // 4] = 2.0 ** (k % 4)
    n = a.shape[0]
    d = cp.zeros((n, 16, 8), cp.float32)
    fn(
        (1,),
        (32,),
        (cp.asarray(a.astype(np.uint32)), cp.asarray(meta.astype(np.uint32)), cp.asarray(b), d, np.int32(n)),
    )
    return cp.asnumpy(d)


def main() -> int:
    # A halves: lane, register, half -> (row, group, slot 0 / 1 of the group's two kept values)
    exps = [(lane, r, h) for lane in range(32) for r in range(4) for h in range(2)]
    a = np.zeros((len(exps), 32, 4), np.uint64)
    for i, (lane, r, h) in enumerate(exps):
        a[i, lane, r] = ONE << (16 * h)
    d = run(a, np.full((len(exps), 32), 0x44444444, np.uint64))
    a_map = {}
    for i, key in enumerate(exps):
        nz = np.argwhere(d[i] != 0)
        assert len(nz) == 1, (key, nz)
        row, grp = nz[0]
        a_map[key] = (int(row), int(grp), {1.0: 0, 2.0: 1}[float(d[i, row, grp])])
    # metadata: lane, nibble -> (row, group), or None where the lane supplies no metadata
    exps = [(lane, p) for lane in range(32) for p in range(8)]
    meta = np.full((len(exps), 32), 0x44444444, np.uint64)
    for i, (lane, p) in enumerate(exps):
        meta[i, lane] = (0x44444444 & ~(0xF << (4 * p))) | (0xE << (4 * p))
    ones = np.full((len(exps), 32, 4), ONE | (ONE << 16), np.uint64)
    d = run(ones, meta)
    m_map = {}
    for i, key in enumerate(exps):
        changed = np.argwhere(d[i] != 3.0)
        assert len(changed) <= 1, (key, changed)
        if len(changed):
            assert d[i][tuple(changed[0])] == 12.0
        m_map[key] = tuple(int(x) for x in changed[0]) if len(changed) else None

    print("A: (lane, reg, half) -> (row, group, slot)")
    for lane in range(4):
        print("  lane", lane, [a_map[lane, r, h] for r in range(4) for h in range(2)])
    print("metadata: (lane, nibble) -> (row, group)")
    for lane in range(8):
        print("  lane", lane, [m_map[lane, p] for p in range(8)])

    # What the kernels assume (templates/_fragment.cuh.j2, SparseA): lane = 4 g + t holds, in register r, half h:
    # row g + 8 (r % 2), group t + 4 (r / 2), slot h; lanes 4 g and 4 g + 1 supply metadata, nibble p of lane
    # 4 g + i describing row g + 8 i, group p.
    ok = True
    for (lane, r, h), got in a_map.items():
        want = (lane // 4 + 8 * (r % 2), lane % 4 + 4 * (r // 2), h)
        ok &= got == want
    for (lane, p), got in m_map.items():
        want = (lane // 4 + 8 * (lane % 4), p) if lane % 4 < 2 else None
        ok &= got == want
    print("layout as assumed:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
