"""Try forward tilings side by side on the GPU: correctness against the reference, then time vs SDPA FLASH.

Tilings of the kernel family the GPU runs: on Hopper (sm_90) the TMA + wgmma forward, elsewhere mma.sync.

python bench/variants.py 64:3,128,2 64:2,128,2     (sm_90: head_dim:consumer warpgroups,BLOCK_N,stages)
python bench/variants.py 64:128,8,1,1 64:64,4,2,0  (others: head_dim:BLOCK_N,warps,m_tiles,q_in_regs)"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attngen as ag
from attngen import kernel, reference, tiling

B, H = 4, 16
hopper = torch.cuda.get_device_capability() == (9, 0)
for spec in sys.argv[1:]:
    d, cfg = spec.split(":")
    d, values = int(d), tuple(map(int, cfg.split(",")))
    if hopper:
        tiling.WGMMA_FORWARD_CONFIGS[d] = values
    else:
        bn, warps, mt, qr = values
        tiling.FORWARD_CONFIGS[d] = (bn, warps, mt, bool(qr))
    kernel.compiled.cache_clear()
    q, k, v = (torch.randn(2, 4, 777, d, device="cuda", dtype=torch.float16) for _ in range(3))
    pat = ag.causal() & ag.sliding_window(300) | ag.global_tokens(16)
    err = (ag.attention(q, k, v, pat).double() - reference.attention(q, k, v, pat)[0]).norm().item()
    kern = ag.compile(ag.causal(), head_dim=d)
    res = kern.resources[0][1]
    line = [f"D{d} {kern.kernel_plan.fwd}: regs {res.registers} spill {res.spill_stores} err {err:.1e}"]
    for S in (4096, 16384):
        q, k, v = (torch.randn(B, H, S, d, device="cuda", dtype=torch.float16) for _ in range(3))
        for causal in (False, True):
            ours = do_bench(lambda: ag.attention(q, k, v, ag.causal() if causal else ag.full()), warmup=25, rep=100)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), warmup=25, rep=100)
            tf = 4 * B * H * S * S * d * (0.5 if causal else 1) / ours / 1e9
            line.append(f"{'c' if causal else 'd'}{S}: {ours:.3f}ms {tf:.0f}TF {fa / ours:.2f}x")
    print(" | ".join(line), flush=True)
