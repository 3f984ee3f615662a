"""Weak scaling of context-parallel attention (attngen.distributed) on the GPUs of one machine.

    torchrun --nproc-per-node N bench/bench_cp.py [--per-gpu 65536] [--out results.json]

Each GPU holds --per-gpu positions of a sequence of N·per-gpu (B1, H16, D128, bf16); for causal (zigzag layout) and
sliding_window(8192) (contiguous), forward+backward, the median time per step, the per-GPU throughput as a share
of one GPU's attngen.attention on a per-gpu-long sequence of the same pattern (the weak-scaling efficiency), and the
bytes each rank received. Rank 0 prints the table and writes the JSON."""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import attngen as ag

CASES = {"causal": (ag.causal(), "zigzag"), "sliding_window(8192)": (ag.sliding_window(8192), "contiguous")}


def timed(fn, reps: int = 5) -> float:
    fn()  # compiles
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-gpu", type=int, default=65536)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_cp.json"))
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    shape = (1, 16, args.per_gpu, 128)
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (t.requires_grad_() for t in (q.clone(), k.clone(), v.clone()))
    rows = []
    for name, (pattern, layout) in CASES.items():
        single = timed(lambda: torch.autograd.grad(ag.attention(qg, kg, vg, pattern), (qg, kg, vg), dout))
        p = ag.distributed.plan(pattern, world, args.per_gpu, layout)
        cp = timed(
            lambda: torch.autograd.grad(
                ag.distributed.attention(qg, kg, vg, pattern, layout=layout), (qg, kg, vg), dout
            )
        )
        # Work per GPU grows with the blocks it computes: one GPU's time for the same number of blocks.
        blocks = len(p.blocks[rank])
        single_blocks = len(ag.distributed.plan(pattern, 1, args.per_gpu, layout).blocks[0])
        efficiency = single * blocks / single_blocks / cp
        received = len(p.needs(rank)) * k.numel() * k.element_size() * 2 * 2  # K and V shards, forward and backward
        rows.append(dict(case=name, world=world, rank=rank, seconds=cp, single_seconds=single, blocks=blocks,
                         efficiency=efficiency, received_bytes=received))  # fmt: skip
    everyone = [None] * world
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        for r in sorted((r for rs in everyone for r in rs), key=lambda r: (r["case"], r["rank"])):
            mib = r["received_bytes"] / 2**20
            print(f"{r['case']:22s} S={world * args.per_gpu:8d} rank {r['rank']}: {r['seconds'] * 1e3:8.1f} ms "
                  f"({r['blocks']} blocks) efficiency {r['efficiency']:.2f}  received {mib:.0f} MiB")  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(everyone, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
