"""Compile every kernel the GPU tests and the benchmark use, in parallel, into $ATTNGEN_CACHE_DIR.

    python bench/prewarm.py [arch] [regex: only the patterns whose repr matches it]

NVRTC compiles one file per process at a time; a pool fills the disk cache in seconds so the test and
benchmark processes only load cubins."""

import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(job):
    from attngen import kernel

    pattern, head_dim, dtype, arch, mma_sync, *mods = job
    mods = tuple(mods[0]) if mods else ()
    if mma_sync and mods:  # as tests/test_score_mod_gpu.py plans them
        from test_score_mod_gpu import _mma_sync_kernels as with_mods

        kern = with_mods(pattern, mods, head_dim, dtype)
    elif mma_sync:  # the mma.sync family on a Hopper GPU, as the tests' test_mma_sync_family_on_hopper plan it
        from test_kernels_gpu import _mma_sync_kernels

        kern = _mma_sync_kernels(pattern, head_dim, dtype, arch)
    else:
        kern = kernel.compiled(pattern.structure(), head_dim, dtype, arch, mods)
    kern.backward_binary  # noqa: B018 - compiles and caches the backward kernels
    return repr(pattern), head_dim, dtype


def jobs(arch: str):
    from test_kernels_gpu import PATTERNS, SOME_PATTERNS

    import attngen as ag

    pats = [*list(PATTERNS.values()), ag.sliding_window(1024), ag.causal() & ag.sliding_window(256)]
    dtypes = ("fp16", "bf16")
    out = [(p, d, t, arch, False) for p in pats for d in (64, 128) for t in dtypes]
    some = [PATTERNS[name] for name in SOME_PATTERNS]
    out += [(p, d, t, arch, False) for p in some for d in (32, 96, 256) for t in dtypes]
    out += [(p, d, t, arch, True) for p in some for d in (64, 128) for t in dtypes]
    layout = ag.block_layout(torch.rand(128, 128) < 0.25, 128)  # the benchmark's kind of layout (same code)
    out.append((layout, 64, "fp16", arch, False))
    per_batch = ag.block_layout(torch.rand(2, 1, 4, 4) < 0.5, 64)  # test_kernels_gpu.py::test_per_batch_layouts
    for p in (per_batch, per_batch | ag.sliding_window(100)):
        out += [(p, d, t, arch, mma) for d in (64, 128) for t in dtypes for mma in (False, True)]
    from test_kernels_gpu import IN_DOCUMENT  # test_kernels_gpu.py::test_in_document

    out += [(p, d, t, arch, mma) for p in IN_DOCUMENT for d in (64, 128) for t in dtypes for mma in (False, True)]
    # N:M, as the N:M tests and benchmark use it (bench/nm_check.py compiles its own set in parallel)
    nms = [ag.nm(2, 4), ag.nm(1, 2), ag.causal() & ag.nm(2, 4), ag.full()]
    out += [(p, d, t, arch, False) for p in nms for d in (64, 128) for t in dtypes]
    # buckets and dropping (test_buckets_gpu.py, bench_buckets.py)
    from test_buckets_gpu import MMA_SYNC_PATTERNS
    from test_buckets_gpu import PATTERNS as BUCKETS

    routed = [*BUCKETS.values(), ag.causal() & ag.lsh(16)]
    out += [(p, d, t, arch, False) for p in routed for d in (64, 128) for t in dtypes]
    out += [(BUCKETS[name], d, "bf16", arch, True) for name in MMA_SYNC_PATTERNS for d in (64, 128)]
    # block top-k (test_topk_blocks_gpu.py, bench_topk_blocks.py)
    from test_topk_blocks_gpu import MMA_SYNC_PATTERNS as TOPK_MMA_SYNC
    from test_topk_blocks_gpu import PATTERNS as TOPK

    selected = [*TOPK.values(), ag.causal() & ag.topk_blocks(8, block=128)]
    selected.append(ag.causal() & (ag.topk_blocks(16, block=64) | ag.sliding_window(512)))
    selected.append(ag.causal() & (ag.topk_blocks(4, block=64) | ag.sliding_window(256)))
    out += [(p, d, t, arch, False) for p in selected for d in (64, 128) for t in dtypes]
    out += [(TOPK[name], d, "bf16", arch, True) for name in TOPK_MMA_SYNC for d in (64, 128)]
    # key-index lists (test_key_indices_gpu.py, bench_key_indices.py)
    from test_key_indices_gpu import MMA_SYNC_PATTERNS as INDEX_MMA_SYNC
    from test_key_indices_gpu import PATTERNS as INDEXED

    out += [(p, d, t, arch, False) for p in INDEXED.values() for d in (64, 128) for t in dtypes]
    out += [(INDEXED[name], d, "bf16", arch, True) for name in INDEX_MMA_SYNC for d in (64, 128)]
    # top-k by token (test_topk_tokens_gpu.py, bench_topk_tokens.py): per head and shared structures
    from test_topk_tokens_gpu import PATTERNS as BY_TOKEN

    tokens = [make(scorer, 1) for make in BY_TOKEN.values() for scorer in (None, ag.indexer())]
    tokens.append(ag.key_padding() & ag.topk(1, scorer=ag.indexer()))
    out += [(p, d, t, arch, False) for p in tokens for d in (64, 128) for t in dtypes]
    # score modifications (test_score_mod_gpu.py)
    from test_score_mod_gpu import kernel_sets

    out += [(p, d, t, arch, mma, mods) for p, mods, d, t, mma in kernel_sets()]
    benched = [(ag.causal(), (ag.alibi(torch.ones(16)).structure(),)), (ag.sliding_window(1024), (ag.softcap(50.0),))]
    out += [(p, d, "fp16", arch, False, mods) for p, mods in benched for d in (64, 128)]  # bench_score_mod.py
    return out


if __name__ == "__main__":
    arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
    todo = jobs(arch)
    if len(sys.argv) > 2:  # only the patterns whose repr matches this regular expression
        todo = [job for job in todo if re.search(sys.argv[2], repr(job[0]) + " " + repr(job[5:]))]
    with ProcessPoolExecutor(max_workers=16) as pool:
        for _ in pool.map(build, todo):
            pass
    print(f"prewarmed {len(todo)} forward + backward kernel sets for {arch}")
