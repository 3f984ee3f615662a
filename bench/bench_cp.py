"""Weak scaling of context-parallel attention (attngen.distributed) on the GPUs of one machine.

    python bench/bench_cp.py --prewarm N [--per-gpu 131072]     # compile the kernels N ranks will use (no GPU)
    torchrun --nproc-per-node N bench/bench_cp.py [--per-gpu 131072] [--single 65536] [--out results.json]

Each GPU holds --per-gpu positions of a sequence of N·per-gpu (B1, H16, D128, bf16). For causal (zigzag layout) and
sliding_window(8192) (contiguous), forward and forward+backward: the median time of a step, the attention pairs
each rank computes, and the weak-scaling efficiency, the per-GPU throughput (pairs the pattern allows in the
whole sequence, divided by N and by the step's time) as a share of one GPU's attngen.attention on a --single-long
sequence of the same pattern; also the bytes each rank receives. Rank 0 prints the table and writes the JSON."""

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.distributed as dist

import attngen as ag

WINDOW = 8192
CASES = {"causal": (None, "zigzag"), f"sliding_window({WINDOW})": (WINDOW, "contiguous")}
B, H, D = 1, 16, 128


def pattern_of(window):
    return ag.causal() if window is None else ag.sliding_window(window)


def pairs(window, rows: range, keys: range) -> int:
    """Allowed (query, key) pairs of causal (window None) or sliding_window(window) among these rows and keys."""
    i = torch.arange(rows.start, rows.stop, dtype=torch.int64)
    lo = torch.clamp(i - (window or rows.stop + 1) + 1, min=keys.start)
    hi = torch.clamp(i, max=keys.stop - 1)
    return int(torch.clamp(hi - lo + 1, min=0).sum())


def _compile(structure):
    from attngen import kernel

    kernel.compiled(structure, D, "bf16", "sm_90").backward_binary  # noqa: B018 - compiles forward and backward
    return repr(structure)


def prewarm(world: int, per_gpu: int) -> None:
    structures = set()
    for window, layout in CASES.values():
        pat = pattern_of(window)
        structures.add(pat.structure())
        p = ag.distributed.plan(pat, world, per_gpu, layout)
        structures |= {bl.pattern.structure() for blocks in p.blocks for bl in blocks}
    with ProcessPoolExecutor(min(len(structures), os.cpu_count() or 1)) as pool:
        for name in pool.map(_compile, structures):
            print("compiled", name, flush=True)


def timed(fn, reps: int = 5) -> float:
    fn()  # the first call loads the kernels
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(attend, q, k, v, dout):
    return lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), dout)


def measure(name: str, window, layout: str, args, rank: int, world: int) -> list[dict]:
    """This rank's rows for one case: one GPU on a --single-long sequence, then this rank's shard of the whole."""
    pat = pattern_of(window)
    q, k, v, g = (torch.randn(B, H, args.single, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    single = {
        "fwd": timed(lambda: ag.attention(q, k, v, pat)),
        "fwd+bwd": timed(fwd_bwd(lambda q, k, v: ag.attention(q, k, v, pat), q, k, v, g)),
    }
    q, k, v, g = (torch.randn(B, H, args.per_gpu, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def attend(q, k, v):
        return ag.distributed.attention(q, k, v, pat, layout=layout)

    cp = {"fwd": timed(lambda: attend(q, k, v)), "fwd+bwd": timed(fwd_bwd(attend, q, k, v, g))}
    p = ag.distributed.plan(pat, world, args.per_gpu, layout)
    S, chunk = world * args.per_gpu, p.chunk
    mine = sum(pairs(window, range(b.q_chunk * chunk + b.rows[0], b.q_chunk * chunk + b.rows[1]),
                     range(b.k_chunk * chunk + b.keys[0], b.k_chunk * chunk + b.keys[1]))
               for b in p.blocks[rank])  # fmt: skip
    position = B * H * D * 2  # bytes of one position's K (or V) row in bf16
    kv = sum(2 * position * (b - a) for a, b in (p.span(owner, rank) for owner in p.needs(rank)))
    shares = sum(2 * 2 * position * (b - a) for a, b in (p.span(rank, user) for user in p.users(rank)))  # fp32
    return [
        dict(case=name, step=step, world=world, rank=rank, S=S, seconds=cp[step], pairs=mine,
             whole_pairs=pairs(window, range(S), range(S)), single_S=args.single, single_seconds=single[step],
             single_pairs=pairs(window, range(args.single), range(args.single)),
             received_bytes=kv if step == "fwd" else 2 * kv + shares)
        for step in ("fwd", "fwd+bwd")
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-gpu", type=int, default=131072)
    ap.add_argument("--single", type=int, default=65536, help="sequence length of the one-GPU reference")
    ap.add_argument("--prewarm", type=int, metavar="N", help="only compile the kernels N ranks use, then exit")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_cp.json"))
    args = ap.parse_args()
    if args.prewarm:
        prewarm(args.prewarm, args.per_gpu)
        return
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = [r for name, (window, layout) in CASES.items() for r in measure(name, window, layout, args, rank, world)]
    everyone = [None] * world
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        print(table([r for rs in everyone for r in rs]))
        with open(args.out, "w") as f:
            json.dump(everyone, f, indent=1)
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    """One line per (case, step): the step's time (its slowest rank), one GPU's (median over the ranks, each
    measured on its own GPU) and the weak-scaling efficiency: the per-GPU throughput, pairs of the whole sequence
    / GPUs / step time, as a share of one GPU's pairs / time."""
    lines = [f"{'case':22s} {'step':8s} {'GPUs':>4s} {'S':>8s} {'ms':>8s} {'1 GPU S':>8s} {'1 GPU ms':>8s} "
             f"{'efficiency':>10s} {'most received':>13s} {'pairs/rank':>10s}"]  # fmt: skip
    for key in sorted({(r["case"], r["step"]) for r in rows}):
        rs = [r for r in rows if (r["case"], r["step"]) == key]
        r0, world = rs[0], len(rs)
        step = max(r["seconds"] for r in rs)
        single = statistics.median(r["single_seconds"] for r in rs)
        efficiency = (r0["whole_pairs"] / world / step) / (r0["single_pairs"] / single)
        share = [r["pairs"] / r0["whole_pairs"] for r in rs]
        spread = f"{min(share):.3f}-{max(share):.3f}"
        lines.append(f"{key[0]:22s} {key[1]:8s} {world:4d} {r0['S']:8d} {step * 1e3:8.1f} {r0['single_S']:8d} "
                     f"{single * 1e3:8.1f} {efficiency:10.2f} {max(r['received_bytes'] for r in rs) / 2**20:9.0f} MiB "
                     f"{spread:>10s}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
