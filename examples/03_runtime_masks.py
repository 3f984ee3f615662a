"""Masks that change every call: packed documents and key padding, given as tensors at call time.

    python examples/03_runtime_masks.py

Each sequence of the batch packs documents of random lengths end to end and is then padded to the batch length;
the pattern `documents() & causal() & key_padding()` keeps a query on the earlier keys of its own document and
never on padding. The document ids and key lengths are call-time tensors: one compiled kernel serves every
packing, its tile schedule is rebuilt on the GPU per call. Padded queries see no key at all: their output is 0
and their log-sum-exp -inf. Two different packings are run and compared with the float64 reference, and
attngen is timed against SDPA with the equivalent dense mask. Without a GPU it shows the plan and the mask of
one sequence, and exits 0."""

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import attngen
from attngen import reference

PATTERN = attngen.documents() & attngen.causal() & attngen.key_padding()
TOLERANCE = 2e-3  # ||out - ref|| / ||ref|| for fp16


def packing(batch: int, seq: int, mean_doc: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids [batch, seq] (documents start at random places) and key lengths [batch] (the rest is padding).
    Padding gets an id of its own, so that it is padding, not documents(), that hides it."""
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    ids = (torch.rand(batch, seq, generator=gen) < 1 / mean_doc).cumsum(-1)
    pad = torch.arange(seq) >= lengths[:, None]
    return torch.where(pad, ids.max() + 1, ids).to(torch.int32), lengths.to(torch.int32)


def median_ms(fn, warmup: int = 10, reps: int = 30) -> float:
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
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mean-doc", type=int, default=300, help="mean document length")
    args = parser.parse_args()
    B, H, Hkv, S, D = args.batch, args.heads, args.kv_heads, args.seq, 64
    gen = torch.Generator().manual_seed(0)
    print(f"pattern  {PATTERN!r}  (needs {', '.join(sorted(PATTERN.runtime_inputs))} at call time)")

    if not torch.cuda.is_available():
        print("no CUDA GPU here: running the kernel needs one. The plan, compiled for sm_90:")
        print(attngen.compile(PATTERN, head_dim=D, dtype=torch.float16, arch="sm_90").plan)
        ids, lengths = packing(1, S, args.mean_doc, gen)
        print(f"\nmask of one packed sequence ({lengths[0]} tokens, then padding; █ kept, ▒ partly, · masked):")
        print(PATTERN.draw(S, S, document_ids=ids, key_lengths=lengths))
        return 0

    print(attngen.compile(PATTERN, head_dim=D, dtype=torch.float16).plan)
    ok = True
    for run in (1, 2):
        ids, lengths = (t.cuda() for t in packing(B, S, args.mean_doc, gen))
        q = torch.randn(B, H, S, D, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.float16) for _ in range(2))
        runtime = dict(document_ids=ids, key_lengths=lengths)
        out, lse = attngen.attention(q, k, v, PATTERN, return_lse=True, **runtime)
        ref, ref_lse = reference.attention(q, k, v, PATTERN, **runtime)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        empty = torch.isinf(ref_lse)
        same_empty = torch.equal(torch.isinf(lse), empty) and not out[empty].any()
        lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
        ok &= rel <= TOLERANCE and same_empty and lse_err < 1e-2
        docs = [len(row[:n].unique()) for row, n in zip(ids, lengths.tolist())]
        print(f"\npacking {run}: documents per sequence {docs}, key lengths {lengths.tolist()}")
        print(
            f"  vs reference: max abs error {(out.double() - ref).abs().max().item():.2e}, relative error "
            f"{rel:.2e} (tolerance {TOLERANCE:.0e}); LSE max abs error {lse_err:.2e}"
        )
        print(
            f"  {int(empty.sum())} padded query rows see no key: output 0 and LSE -inf as in the reference: "
            f"{same_empty}"
        )

    # SDPA needs the dense [B, 1, S, S] mask; its rows with no key come out NaN, so only the time is compared.
    dense = PATTERN.mask(S, S, device="cuda", **runtime)
    kr, vr = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    ours = median_ms(lambda: attngen.attention(q, k, v, PATTERN, **runtime))
    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=dense))
    print(f"\nforward, fp16, B={B} H={H} (KV heads {Hkv}) S={S} D={D}, {torch.cuda.get_device_name()}:")
    print(f"  attngen (schedule built per call)  {ours:8.3f} ms")
    print(f"  SDPA, dense [B,1,S,S] bool mask    {sdpa:8.3f} ms  ({sdpa / ours:.2f}x attngen's time)")
    print("\nall checks passed" if ok else "\nCHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
