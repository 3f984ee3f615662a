"""Run NVIDIA compute-sanitizer over every kernel family on small shapes.

    python bench/sanitize.py [--tools memcheck racecheck synccheck initcheck] [--out DIR] [--jobs N] [--cases ID ...]
    python bench/sanitize.py --dry-run          # no GPU: list the cases
    python bench/sanitize.py --child CASE_ID    # one case, run by the parent under compute-sanitizer

The parent compiles every case's kernels first (into $ATTNGEN_CACHE_DIR, which the children inherit, so a child
only loads cubins), then for each tool and case runs

    compute-sanitizer --tool TOOL [--racecheck-report all] --error-exitcode 99 python bench/sanitize.py --child ID

A child runs ONE tiny case (B <= 2, H <= 4, S <= 300: the sanitizer slows kernels ~100x): the forward and the
backward of a pattern, with its score modifications if any, on CUDA through attngen.attention (for the mma.sync
family on Hopper with the planner's choice replaced by those kernels, as bench/fuzz_gpu.py does), compares against
attngen.reference (float32, computed on the CPU so that the sanitizer sees few other kernels) loosely and exits 0.

ATTNGEN_POISON_OUTPUTS=1 in the children: outputs start as NaN, and a child checks every element of every output
(O finite, LSE finite except -inf exactly on empty rows, gradients finite), so an element a kernel leaves unwritten
fails the case. initcheck cannot be the check for those: it records no write made by a bulk or TMA store
(bench/probe_initcheck.py shows it on a minimal kernel), and the sm_90a kernels write O, dQ, dK and dV that way.
The fill makes those outputs initialised memory, so initcheck stays clean and checks every other read (inputs,
LSE, the backward's row statistics, schedules, lists, a bias and the score-gradient buffer) as before. cuBLAS
writes its GEMM outputs on Hopper the same way: torch reading top-k scores made by `torch.bmm` shows as reads of
uninitialised memory (the probe's `cublas` way) in the `threshold` case. Such reports, made in a kernel that is
not attngen's, are counted apart (a cell "clean +Nf"): the case is clean when every report is one of them and the
child's own checks passed.
PYTORCH_NO_CUDA_MEMORY_CACHING=1 in the children: every tensor is its own cudaMalloc, so memcheck sees an access
past a tensor's end (torch's caching allocator would hide it inside a larger block) and initcheck sees fresh memory.

Full logs go to DIR/<tool>__<case>.log; the last thing printed is a tool x case table (clean / N errors /
crash / wrong). Exit status 1 if anything is not clean."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
WRONG_RESULT = 3  # a child's exit status when the result differs from the reference
TOL = 5e-2  # loose: the point is the sanitizer, correctness is the GPU tests' and the fuzzer's job


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    pattern: str  # a key of _patterns()
    D: int
    Sq: int
    Sk: int
    B: int = 2
    Hq: int = 4
    Hkv: int = 4
    dtype: str = "fp16"
    mma_sync: bool = False  # force the mma.sync kernels (only differs from "auto" on Hopper)
    backward: bool = True
    runtime: dict = field(default_factory=dict, hash=False)
    mods: str = ""  # a key of _mods(): score modifications and their tensors (which then need gradients too)


CASES = [
    # Hopper wgmma forward (persistent, TMA) + wgmma dK/dV and dQ, head dims 64 and 128
    Case("wgmma_d64_causal", "wgmma fwd/dkdv/dq, D=64, whole tiles", "causal", 64, 256, 256),
    Case("wgmma_d128_full", "wgmma fwd/dkdv/dq, D=128, bf16", "full", 128, 192, 256, dtype="bf16"),
    Case("wgmma_d64_partial", "wgmma, partial tiles Sq=77 Sk=131", "sliding_window", 64, 77, 131),
    Case("wgmma_d128_partial", "wgmma, partial tiles, D=128", "local", 128, 77, 131, dtype="bf16"),
    # the mma.sync family on the same GPU (what non-Hopper GPUs run)
    Case("mma_d64_causal", "mma.sync fwd/dkdv/dq, D=64", "causal", 64, 256, 256, mma_sync=True),
    Case("mma_d128_partial", "mma.sync, D=128, partial tiles", "prefix_lm", 128, 77, 131, mma_sync=True),
    Case("mma_d64_empty_rows", "mma.sync, ~causal (empty last row)", "not_causal", 64, 77, 77, mma_sync=True),
    Case(
        "mma_d64_gqa_padding",
        "mma.sync, GQA 4/2 + key_padding with a 0 length",
        "key_padding",
        64,
        77,
        131,
        Hkv=2,
        mma_sync=True,
        runtime={"key_lengths": [0, 100]},
    ),
    # head dim 256: wgmma forward, mma.sync backward
    Case("d256_causal", "D=256: wgmma fwd + mma.sync bwd", "causal", 256, 130, 130, B=1, Hq=2, Hkv=2),
    Case("d256_partial_gqa", "D=256, partial tiles, GQA", "causal_bottom_right", 256, 77, 131, B=1, Hq=2, Hkv=1),
    # empty rows, GQA, layouts, documents (planner's choice: wgmma on Hopper)
    Case("empty_not_causal", "~causal(): the last row has no key", "not_causal", 64, 77, 77),
    Case(
        "empty_key_padding",
        "key_padding, one batch of length 0",
        "key_padding",
        64,
        77,
        131,
        runtime={"key_lengths": [0, 57]},
    ),
    Case("gqa_bottom_right", "GQA Hq=4 Hkv=2, bottom-right causal", "causal_bottom_right", 64, 77, 131, Hkv=2),
    Case("layout_causal", "per-head block layout & causal", "layout", 64, 300, 300, B=1),
    Case("layout_mma", "per-head block layout & causal, mma.sync", "layout", 128, 300, 300, B=1, mma_sync=True),
    Case("layout_per_batch", "a grid per batch element | window", "layout_per_batch", 64, 300, 300),
    Case("documents_causal", "documents & causal", "documents", 64, 200, 200, runtime={"documents": 4}),
    Case(
        "documents_mma",
        "documents & causal, mma.sync",
        "documents",
        64,
        200,
        200,
        mma_sync=True,
        runtime={"documents": 4},
    ),
    Case("window_global", "causal & window | global tokens, D=128", "window_global", 128, 300, 300, B=1),
    # reordered calls (tokens sorted by bucket): key ranges, and the pattern at original positions; GQA
    Case(
        "buckets_ranges",
        "causal & buckets & keep: key ranges, row gathers, range classes",
        "buckets_keep",
        64,
        333,
        333,
        Hkv=2,
        runtime={"buckets": 3, "keep": 0.6},
    ),
    Case(
        "buckets_positions",
        "documents & causal & buckets, D=128: the mask at original positions",
        "documents_buckets",
        128,
        300,
        300,
        runtime={"buckets": 3, "documents": 4},
    ),
    # selection rules. N:M: the choice in registers, P·V on sparse tensor cores (wgmma.sp, mma.sp)
    Case("nm_wgmma_d64", "causal & nm(2, 4): wgmma.sp forward, partial tiles", "causal_nm24", 64, 77, 131),
    Case("nm_wgmma_d128", "nm(1, 2), D=128, bf16", "nm12", 128, 192, 256, dtype="bf16"),
    Case("nm_mma_d64", "causal & nm(2, 4), mma.sp forward, mma.sync", "causal_nm24", 64, 77, 131, mma_sync=True),
    # top-k by blocks: the block scores and choice on the GPU, then the grid as a mask
    Case("topk_blocks", "causal & topk_blocks(2, 64)", "topk_blocks", 64, 300, 300, Hkv=2),
    Case("topk_blocks_mma", "causal & topk_blocks(2, 64), mma.sync", "topk_blocks", 128, 300, 300, mma_sync=True),
    # key-index lists: list preparation, gather forward, dQ, inverse lists and dK/dV; and as bits under |
    Case(
        "key_indices_gather",
        "causal & key_indices(): gather kernels, GQA",
        "key_indices",
        64,
        300,
        300,
        Hkv=2,
        runtime={"key_indices": 24},
    ),
    Case(
        "key_indices_gather_d128",
        "key_indices(), D=128, bf16, Sq != Sk",
        "key_indices_alone",
        128,
        77,
        131,
        dtype="bf16",
        runtime={"key_indices": 40},
    ),
    Case(
        "key_indices_bits",
        "key_indices() | sliding_window: lists as bits",
        "key_indices_or_window",
        64,
        200,
        200,
        runtime={"key_indices": 16},
    ),
    # top-k by token: scores (bmm or the indexer kernel), radix select, lists, then the kernels above
    Case("topk_exact", "causal & topk(16): per-head lists, bits", "topk_exact", 64, 300, 300),
    Case(
        "topk_indexer",
        "causal & topk(24, indexer()): indexer scores, gather",
        "topk_indexer",
        64,
        300,
        300,
        Hkv=2,
        runtime={"indexer": 4},
    ),
    Case("threshold", "causal & threshold(0.05)", "threshold", 64, 200, 200),
    # score modifications: a bias read per pair, a T5 table by bucket, and dL/ds written once per pair for their
    # gradients (the score-gradient buffer)
    Case("bias_wgmma", "causal & bias [1,H,Sq,Sk], its gradient", "causal", 64, 77, 131, mods="bias"),
    Case("rel_bias_wgmma", "softcap then rel_bias(32, 64), D=128", "full", 128, 130, 130, dtype="bf16", mods="rel"),
    Case("bias_mma", "window & bias, mma.sync", "sliding_window", 128, 77, 131, mma_sync=True, mods="bias"),
    # a softcap, a T5 table and a bias together: the backward's leanest tilings (query steps of 32 rows)
    Case("mods3_wgmma_d128", "softcap, rel_bias, bias: dK/dV of 32-row steps", "causal", 128, 77, 131, mods="three"),
    Case("mods3_mma_d64", "softcap, rel_bias, bias, mma.sync", "causal", 64, 77, 131, mma_sync=True, mods="three"),
    # long query ranges over few keys: the blocks of a key tile share its dK/dV list and write fp32 partials
    Case("split_dkdv_wgmma", "split dK/dV, GQA 4:1, bias", "sliding_window", 64, 2100, 77, B=1, Hkv=1, mods="bias"),
    Case("split_dkdv_mma", "split dK/dV, mma.sync", "causal_bottom_right", 128, 2100, 77, B=1, Hkv=1, mma_sync=True),
]
BY_ID = {c.id: c for c in CASES}


def _patterns() -> dict:
    import torch

    import attngen as ag

    g = torch.Generator().manual_seed(0)
    layout = torch.rand(4, 5, 5, generator=g) < 0.5  # 4 heads, 64-token blocks covering 300 tokens
    layout[:, :, 0] = True
    return {
        "full": ag.full(),
        "causal": ag.causal(),
        "causal_bottom_right": ag.causal(align="bottom_right"),
        "sliding_window": ag.sliding_window(40),
        "local": ag.local(30, 20),
        "prefix_lm": ag.prefix_lm(20),
        "not_causal": ~ag.causal(),
        "key_padding": ag.key_padding(),
        "layout": ag.block_layout(layout, 64) & ag.causal(),
        "layout_per_batch": ag.block_layout(torch.rand(2, 4, 5, 5, generator=g) < 0.5, 64) | ag.sliding_window(64),
        "documents": ag.documents() & ag.causal(),
        "window_global": ag.causal() & ag.sliding_window(64) | ag.global_tokens(8),
        "buckets_keep": ag.causal() & ag.buckets() & ag.keep(),
        "documents_buckets": ag.documents() & ag.causal() & ag.buckets(),
        "causal_nm24": ag.causal() & ag.nm(2, 4),
        "nm12": ag.nm(1, 2),
        "topk_blocks": ag.causal() & ag.topk_blocks(2, block=64),
        "key_indices": ag.causal() & ag.key_indices(),
        "key_indices_alone": ag.key_indices(),
        "key_indices_or_window": ag.key_indices() | ag.sliding_window(32),
        "topk_exact": ag.causal() & ag.topk(16),
        "topk_indexer": ag.causal() & ag.topk(24, scorer=ag.indexer()),
        "threshold": ag.causal() & ag.threshold(0.05),
    }


def _mods(c: Case) -> tuple:
    """The case's `score_mod=`."""
    import attngen as ag

    three = (ag.softcap(20.0), ag.rel_bias(32, 64), ag.bias())
    return {"": (), "bias": (ag.bias(),), "rel": (ag.softcap(20.0), ag.rel_bias(32, 64)), "three": three}[c.mods]


def _mod_tensors(c: Case, g) -> dict:
    """The tensors of the case's score modifications (CPU, random from `g`)."""
    import torch

    out = {}
    if c.mods in ("bias", "three"):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[c.dtype]
        out["bias"] = torch.randn(1, c.Hq, c.Sq, c.Sk, generator=g).to(dtype)
    if c.mods in ("rel", "three"):
        out["rel_table"] = torch.randn(c.Hq, 32, generator=g)
    return out


def _compiled(c: Case, arch: str):
    """The kernel.Compiled the case runs: forced mma.sync tilings, or the one attngen.attention picks."""
    from dataclasses import replace

    from attngen import kernel, plan, scoremod, tiling

    pat = _patterns()[c.pattern]
    mods = scoremod.structures(_mods(c))
    if not c.mma_sync:
        return kernel.compiled(pat.structure(), c.D, c.dtype, arch, mods)
    p = plan.make_plan(pat.structure(), head_dim=c.D, dtype=c.dtype, arch=arch, score_mods=mods)
    p = replace(p, fwd=tiling.forward_tiles(c.D), dkdv=tiling.dkdv_tiles(c.D), dq=tiling.dq_tiles(c.D))
    return kernel.Compiled(p)


def _compile_job(job: tuple[str, str]) -> str | None:
    case_id, arch = job
    try:
        kern = _compiled(BY_ID[case_id], arch)
        kern.forward_binary  # noqa: B018 - compiles and caches
        kern.backward_binary  # noqa: B018
    except Exception as e:  # reported again when the child runs
        return f"{case_id}: {type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------------------------------- child


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def run_child(case_id: str) -> int:
    import torch

    import attngen as ag
    from attngen import op, reference
    from attngen import pattern as P
    from attngen.nvrtc import device_arch

    c = BY_ID[case_id]
    dev = torch.device("cuda")
    arch = device_arch(0)
    pat = _patterns()[c.pattern]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[c.dtype]
    g = torch.Generator().manual_seed(len(c.id))
    cpu = [torch.randn(c.B, h, s, c.D, generator=g).to(dtype) for h, s in ((c.Hq, c.Sq), (c.Hkv, c.Sk), (c.Hkv, c.Sk))]
    dout_cpu = torch.randn(c.B, c.Hq, c.Sq, c.D, generator=g).to(dtype)
    rt_cpu = {}
    if "key_lengths" in c.runtime:
        rt_cpu["key_lengths"] = torch.tensor(c.runtime["key_lengths"][: c.B], dtype=torch.int32)
    if "documents" in c.runtime:
        cuts = torch.rand(c.B, c.Sq, generator=g) < c.runtime["documents"] / c.Sq
        rt_cpu["document_ids"] = cuts.cumsum(-1).to(torch.int32)
    if "buckets" in c.runtime:  # reordered calls run through attngen.attention (they sort their tokens first)
        n = c.runtime["buckets"]
        rt_cpu["query_buckets"] = torch.randint(0, n, (c.B, c.Hq, c.Sq), generator=g, dtype=torch.int32)
        rt_cpu["key_buckets"] = torch.randint(0, n, (c.B, c.Hkv, c.Sk), generator=g, dtype=torch.int32)
    if "keep" in c.runtime:
        rt_cpu["query_keep"] = torch.rand(c.B, c.Hq, c.Sq, generator=g) < c.runtime["keep"]
        rt_cpu["key_keep"] = torch.rand(c.B, c.Hkv, c.Sk, generator=g) < c.runtime["keep"]
    if "key_indices" in c.runtime:  # lists with repeats and -1 pads
        n = c.runtime["key_indices"]
        rt_cpu["key_indices"] = torch.randint(-1, c.Sk, (c.B, c.Hkv, c.Sq, n), generator=g, dtype=torch.int32)
    if "indexer" in c.runtime:
        n = c.runtime["indexer"]
        rt_cpu["index_q"] = torch.randn(c.B, c.Sq, n, 32, generator=g).to(torch.bfloat16)
        rt_cpu["index_k"] = torch.randn(c.B, c.Sk, 32, generator=g).to(torch.bfloat16)
        rt_cpu["index_w"] = torch.rand(c.B, c.Sq, n, generator=g)
    mods, mt_cpu = _mods(c), _mod_tensors(c, g)
    q, k, v = (t.to(dev).requires_grad_(c.backward) for t in cpu)
    dout = dout_cpu.to(dev)
    rt = {name: t.to(dev) for name, t in rt_cpu.items()}
    mt = {name: t.to(dev).requires_grad_(c.backward) for name, t in mt_cpu.items()}
    scale = c.D**-0.5
    # What the reference is given for a rule whose choice the GPU makes: the choice itself.
    ref_pat, ref_rt = pat, dict(rt_cpu)
    if P.topk_leaf(pat) is not None:
        ref_rt["selected_blocks"] = ag.selected_blocks(q.detach(), k.detach(), pat, **rt).cpu()
    if P.token_leaf(pat) is not None:
        lists = ag.selected_keys(q.detach(), k.detach(), pat, scale=scale, **rt).cpu()
        ref_pat = pat.structure()
        ref_rt = {"key_indices": lists} | {n: t for n, t in rt_cpu.items() if n == "document_ids"}

    kernels = contextlib.nullcontext()
    if c.mma_sync and arch.startswith("sm_90"):  # the mma.sync kernels, which the planner would not pick here
        kern = _compiled(c, arch)
        kernels = mock.patch.object(op, "_compiled_for", lambda structure, q, mods="": kern)
    with kernels:
        out, lse = ag.attention(q, k, v, pat, return_lse=True, score_mod=mods, **mt, **rt)
        got = torch.autograd.grad(out, (q, k, v, *mt.values()), dout) if c.backward else None
    torch.cuda.synchronize()
    out, lse = out.detach().cpu(), lse.detach().cpu()
    got = [x.cpu() for x in got] if got is not None else None

    qc, kc, vc = (t.requires_grad_(c.backward) for t in cpu)
    mtc = {name: t.requires_grad_(c.backward) for name, t in mt_cpu.items()}
    ref, ref_lse = reference.attention(qc, kc, vc, ref_pat, dtype=torch.float32, score_mod=mods, **mtc, **ref_rt)
    errors = []
    empty = torch.isinf(ref_lse)
    if not torch.isfinite(out).all():
        errors.append("non-finite output")
    elif not (out[empty] == 0).all():
        errors.append("rows with no allowed key are not 0")
    elif not empty.all() and _rel(out, ref) > TOL:
        errors.append(f"output error {_rel(out, ref):.2e}")
    if not torch.equal(torch.isinf(lse), empty) or lse.isnan().any():
        errors.append("LSE not finite, or not -inf exactly on empty rows")
    if c.backward:
        want = torch.autograd.grad(ref, (qc, kc, vc, *mtc.values()), dout_cpu.float())
        for name, a, b in zip(("dq", "dk", "dv", *mtc), got, want):
            if not torch.isfinite(a).all():
                errors.append(f"{name} not finite")
            elif b.abs().max() > 1e-6 and _rel(a, b) > TOL:
                errors.append(f"{name} error {_rel(a, b):.2e}")
            elif b.abs().max() <= 1e-6 and a.abs().max() > 1e-3:
                errors.append(f"{name} must vanish")
    print(f"case {c.id} ({c.what}) on {arch}: " + ("ok" if not errors else "WRONG: " + "; ".join(errors)))
    return WRONG_RESULT if errors else 0


# ---------------------------------------------------------------------------------------------------- parent


SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error")
HAZARDS = re.compile(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


UNINITIALIZED_READ = re.compile(r"^=+ +Uninitialized __global__ memory read.*\n=+ +at (.*)$", re.MULTILINE)


def foreign_reads(log: str) -> int:
    """initcheck reports of reads made by kernels that are not attngen's (torch's, cuBLAS's): torch reading a GEMM
    output that cuBLAS wrote with bulk stores, which initcheck does not record (bench/probe_initcheck.py, `cublas`).
    They say nothing of attngen's kernels, whose outputs the child poisons and checks element by element."""
    return sum("attngen_" not in where for where in UNINITIALIZED_READ.findall(log))


def verdict(rc: int, log: str) -> tuple[bool, str]:
    """(clean, cell text) from a child's exit status and the sanitizer's output."""
    m = SUMMARY.findall(log)
    hz = HAZARDS.findall(log)
    # memcheck, synccheck and initcheck end with an ERROR SUMMARY; racecheck with a RACECHECK SUMMARY instead
    errors = int(m[-1]) if m else int(hz[-1][1]) if hz else None
    warn = f" +{hz[-1][2]}w" if hz and int(hz[-1][2]) else ""  # racecheck warnings (--racecheck-report all)
    foreign = foreign_reads(log)
    child_ok = re.search(r"^case \S+ .*: ok$", log, re.MULTILINE) is not None
    if errors and errors == foreign and child_ok:  # every report is another library's read (see above)
        return True, f"clean +{foreign}f"
    if errors:
        return False, f"{errors} errors{warn}"
    if rc == 0 and errors == 0:
        return True, "clean" + warn
    if rc == WRONG_RESULT and errors == 0:
        return False, "wrong"
    if rc in (124, -9) or rc is None:
        return False, "timeout"
    return False, f"crash({rc})"


REPORT_START = re.compile(r"^=+ +(Error|Warning|Invalid|Uninitialized|Barrier|Race|Program hit)")


def first_reports(log: str, limit: int = 3, lines: int = 8) -> str:
    """The first `limit` distinct reports of a sanitizer log (their first lines, host backtraces left out): the
    part worth reading when the full logs are too many to bring back."""
    out, seen, block = [], set(), None
    for line in log.splitlines():
        if REPORT_START.match(line):
            block = [line]
        elif block is not None and len(block) < lines and "Host Frame" not in line:
            block.append(line)
        if (block is not None and len(block) == lines) or (block and line.strip("= ") == ""):
            key = "\n".join(b.split(" by thread")[0] for b in block[:3])
            if key not in seen and len(seen) < limit:
                seen.add(key)
                out.append("\n".join(block))
            block = None
    return "\n".join(out) + ("\n" if out else "(no report found; see the log)\n")


def sanitizer_command(tool: str, case_id: str, extra: list[str]) -> list[str]:
    cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "99"]
    if tool == "racecheck":
        cmd += ["--racecheck-report", "all"]
    if tool == "initcheck":  # every report printed, so that each can be told attngen's or another library's
        cmd += ["--print-limit", "0", "--show-backtrace", "device"]
    return [*cmd, *extra, sys.executable, str(Path(__file__).resolve()), "--child", case_id]


def child_env() -> dict:
    env = dict(os.environ)
    env["ATTNGEN_POISON_OUTPUTS"] = "1"  # the child checks every output element (see the top of this file)
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("ATTNGEN_CACHE_DIR", "/tmp/attngen-cache")
    return env


def run_one(tool: str, case_id: str, out: Path, extra: list[str], timeout: float) -> tuple[bool, str, float]:
    cmd = sanitizer_command(tool, case_id, extra)
    start = time.time()
    try:
        p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, log = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        log += "\n[timed out]\n"
    (out / f"{tool}__{case_id}.log").write_text(" ".join(cmd) + f"\n[exit {rc}]\n" + log)
    clean, cell = verdict(rc, log)
    return clean, cell, time.time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--cases", nargs="+", default=[c.id for c in CASES], choices=list(BY_ID), metavar="ID")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/attngen-out") + "/sanitize")
    ap.add_argument("--jobs", type=int, default=4, help="children under the sanitizer at once (default 4)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child (default 900)")
    ap.add_argument("--only-attngen", action="store_true",
                    help="check only attngen's kernels (--kernel-name kns=attngen); faster, but initcheck may then "
                         "not see torch's writes")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="list the cases and the commands; run nothing")
    ap.add_argument("--child", metavar="ID", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args.child)

    extra = ["--kernel-name", "kns=attngen"] if args.only_attngen else []
    cases = [BY_ID[i] for i in args.cases]
    if args.dry_run:
        for c in cases:
            shape = f"B={c.B} Hq={c.Hq} Hkv={c.Hkv} Sq={c.Sq} Sk={c.Sk} D={c.D} {c.dtype}"
            kind = "mma.sync forced" if c.mma_sync else "auto"
            print(f"{c.id:22} {kind:15} {shape:42} {c.pattern:20} {c.what}")
        example = " ".join(sanitizer_command(args.tools[0], cases[0].id, extra))
        print(f"{len(cases)} cases x {len(args.tools)} tools; e.g.: {example}")
        return 0

    import torch

    from attngen.nvrtc import device_arch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to sanitize (--dry-run lists the cases)")
        return 1
    os.environ.setdefault("ATTNGEN_CACHE_DIR", "/tmp/attngen-cache")  # children inherit it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = device_arch(0)
    print(subprocess.run(["compute-sanitizer", "--version"], capture_output=True, text=True).stdout.strip())

    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    start = time.time()
    with ProcessPoolExecutor(max_workers=8, mp_context=get_context("spawn")) as pool:
        failed = [e for e in pool.map(_compile_job, [(c.id, arch) for c in cases]) if e]
    print(f"compiled {len(cases)} kernel sets for {arch} in {time.time() - start:.0f}s; failed: {failed or 'none'}")

    jobs = [(tool, c.id) for tool in args.tools for c in cases]
    results: dict = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futs = {job: pool.submit(run_one, *job, out, extra, args.timeout) for job in jobs}
        for (tool, cid), fut in futs.items():
            results[tool, cid] = fut.result()
            _clean, cell, secs = results[tool, cid]
            print(f"{tool:10} {cid:22} {cell:14} {secs:6.0f}s", flush=True)

    width = max(len(c.id) for c in cases)
    cols = [max(len(t), 12) for t in args.tools]
    print("\n" + " " * width + "  " + "  ".join(t.ljust(w) for t, w in zip(args.tools, cols)))
    for c in cases:
        print(c.id.ljust(width) + "  " + "  ".join(results[t, c.id][1].ljust(w) for t, w in zip(args.tools, cols)))
    bad = sum(not results[j][0] for j in jobs)
    findings = [
        f"== {tool} {cid}: {results[tool, cid][1]}\n{first_reports((out / f'{tool}__{cid}.log').read_text())}"
        for tool, cid in jobs
        if not results[tool, cid][0]
    ]
    (out / "findings.txt").write_text("\n".join(findings) or "all clean\n")
    print(f"{'all clean' if not bad else f'{bad} of {len(jobs)} not clean'}; logs in {out} "
          f"({time.time() - start:.0f}s)")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
