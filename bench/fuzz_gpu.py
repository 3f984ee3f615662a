"""Fuzz the kernels on a GPU: random cases (tests/fuzzing.py) against attngen.reference, forward and backward.

    python bench/fuzz_gpu.py --cases 1000 --seed 0 [--out DIR]   # cases 0..999
    python bench/fuzz_gpu.py --seed 1234 --cases 1               # one case again (each failure prints this line)
    python bench/fuzz_gpu.py --cases 20 --dry-run                # no GPU: the cases' repro lines and shapes
    python bench/fuzz_gpu.py --seeds 280 454 776                 # chosen cases (earlier failures, say)

Per case: the output (finite, 0 on rows with no allowed key, relative error below FWD_TOL), the LSE when the case
asks for it (-inf exactly on empty rows, close elsewhere) and, for cases flagged backward, dq, dk, dv (with an LSE
gradient when the case returns the LSE) below BWD_TOL; tolerances are tests/test_kernels_gpu.py's. The reference
runs in float64 when small, float32 otherwise. Outputs are poisoned (ATTNGEN_POISON_OUTPUTS=1: NaN before the
kernels run), so an element a kernel never writes shows. Cases of variant "mma_sync" run the mma.sync kernels on
a Hopper GPU too (the plan's tilings replaced, launched through attngen.bind). Cases with a selection rule
(`A & nm(2, 4)`, ...) draw q and k from the generator's grid, where the kernels' fp32 scores and the reference's
order the keys alike, so they are compared exactly as the others are. Cases whose pattern reorders (`buckets()`,
`lsh(n, seed)`, `keep()`, on top of the pattern or nested in it) pass their bucket ids and keep masks to
attngen.attention, which sorts the tokens by bucket, and to the reference, which works on the original positions
(an lsh leaf is seeded: both hash q and k alike); the mma_sync ones run through attngen.attention too, with the
forced kernels swapped in (launched through attngen.bind directly, the kernels would see unsorted tokens). Cases with
a top-k-by-token leaf (`topk(k, scorer)`) pass the scorer's tensors (`proj=`, or `index_q=`, `index_k=`, `index_w=`)
to both attngen.attention, which chooses the keys in fp32, and the reference, which chooses them in float64: their q,
k and scorer inputs make every score exact, so both choose the same keys and are compared exactly as the others are.
Every exception is a failure: the generator makes valid input only.

Kernels are compiled first, in parallel (--jobs processes, into the disk cache), so the run itself only loads
cubins. Prints a progress line every 100 cases and a summary table; failures go to DIR/fuzz_failures.jsonl, one
JSON object a line, each with its repro line. Exit status 1 on any failure."""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

os.environ["ATTNGEN_POISON_OUTPUTS"] = "1"  # before attngen reads it: every output starts as NaN
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import fuzzing  # noqa: E402
import torch  # noqa: E402

# Float64 reference up to this many scores (B * Hq * Sq * Sk), float32 above.
FLOAT64_SCORES = 1 << 23
ZERO_GRAD = 1e-6  # a reference gradient this small everywhere is zero up to rounding: the kernel's must vanish too
ZERO_GRAD_TOL = 1e-4


def tolerances() -> tuple[dict, dict]:
    """FWD_TOL and BWD_TOL of tests/test_kernels_gpu.py (one source of truth)."""
    from test_kernels_gpu import BWD_TOL, FWD_TOL

    return FWD_TOL, BWD_TOL


# ------------------------------------------------------------------------------------------------ compiling


def kernel_variant(c: fuzzing.Case, arch: str) -> str:
    """Which kernels the case runs: "mma_sync" forced, or the planner's choice ("auto")."""
    from attngen import tiling

    forced = c.variant == "mma_sync" and arch in tiling.WGMMA_ARCHS
    return "mma_sync" if forced else "auto"


_FORCED: dict = {}


def kernel_set(c: fuzzing.Case, arch: str) -> tuple:
    """What one compile serves: cases equal in it run the same kernels (score modifications included)."""
    return (c.pattern.structure(), c.mod_structures(), c.head_dim, c.dtype, kernel_variant(c, arch))


def compiled_for(c: fuzzing.Case, arch: str):
    """The `kernel.Compiled` the case runs (for "auto", the one attngen.attention uses)."""
    from dataclasses import replace

    from attngen import kernel, plan, tiling

    structure, mods = c.pattern.structure(), c.mod_structures()
    if kernel_variant(c, arch) == "auto":
        return kernel.compiled(structure, c.head_dim, c.dtype, arch, mods)
    key = (structure, mods, c.head_dim, c.dtype, arch)
    if key not in _FORCED:
        p = plan.make_plan(structure, head_dim=c.head_dim, dtype=c.dtype, arch=arch, score_mods=mods)
        d = c.head_dim
        p = replace(p, fwd=tiling.forward_tiles(d), dkdv=tiling.dkdv_tiles(d), dq=tiling.dq_tiles(d))
        _FORCED[key] = kernel.Compiled(p)
    return _FORCED[key]


def _compile_job(job: tuple[int, str, bool]) -> str | None:
    """Worker: compile the kernels of case `seed` (the backward too when asked); an error is returned, not raised
    (the case itself then fails with it)."""
    seed, arch, backward = job
    try:
        kern = compiled_for(fuzzing.case(seed), arch)
        if backward:
            kern.backward_binary  # noqa: B018 - compiles the backward kernels
    except Exception as e:  # reported by the run of the case
        return f"seed {seed}: {type(e).__name__}: {e}"
    return None


def prewarm(todo: list[fuzzing.Case], arch: str, jobs: int) -> None:
    """Compile each distinct kernel set (`kernel_set`) once, in `jobs` processes (spawned: CUDA is
    never touched there), into the disk cache that the run then loads from."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    first: dict = {}
    for c in todo:
        key = kernel_set(c, arch)
        seed, backward = first.get(key, (c.seed, False))
        first[key] = (seed, backward or c.backward)
    work = [(seed, arch, backward) for seed, backward in first.values()]
    start = time.time()
    errors = 0
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=get_context("spawn")) as pool:
        for err in pool.map(_compile_job, work, chunksize=4):
            errors += err is not None
    print(f"compiled {len(work)} kernel sets for {arch} in {time.time() - start:.0f}s ({errors} failed to compile)")


# ------------------------------------------------------------------------------------------------- checking


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def check_forward(c: fuzzing.Case, out, lse, ref, ref_lse, fwd_tol: float) -> list[str]:
    """What is wrong with (out, lse); lse None when the case does not return it."""
    errors = []
    empty = torch.isinf(ref_lse)
    if not torch.isfinite(out).all():
        errors.append(f"non-finite output ({int((~torch.isfinite(out)).sum())} elements)")
    if not (out[empty] == 0).all():
        errors.append("rows with no allowed key must be 0")
    if lse is not None:
        if lse.dtype != torch.float32 or tuple(lse.shape) != (c.B, c.Hq, c.Sq):
            errors.append(f"LSE is {lse.dtype} {tuple(lse.shape)}, expected float32 {(c.B, c.Hq, c.Sq)}")
        elif not torch.equal(lse == float("-inf"), empty):
            errors.append(f"LSE must be -inf exactly on the {int(empty.sum())} empty rows")
        elif not torch.allclose(lse[~empty], ref_lse[~empty].float(), atol=2e-3, rtol=1e-4):
            worst = (lse[~empty] - ref_lse[~empty].float()).abs().max().item()
            errors.append(f"LSE differs by up to {worst:.3e}")
    if not empty.all() and torch.isfinite(out).all():
        err = rel(out, ref)
        if not err < fwd_tol:
            errors.append(f"output error {err:.2e} >= {fwd_tol}")
    return errors


def check_grads(got, ref, bwd_tol: float) -> list[str]:
    errors = []
    for label, g, r in zip("qkv", got, ref):
        if g is None or not torch.isfinite(g).all():
            errors.append(f"d{label} not finite")
        elif r.abs().max() <= ZERO_GRAD:  # e.g. one key per row: dS = P (dP - delta) is 0 up to rounding
            if not g.abs().max() < ZERO_GRAD_TOL:
                errors.append(f"d{label} must vanish, max |d{label}| = {g.abs().max().item():.2e}")
        elif not (err := rel(g, r)) < bwd_tol:
            errors.append(f"d{label} error {err:.2e} >= {bwd_tol}")
    return errors


@contextlib.contextmanager
def _kernels_of_attention(kern):
    """attngen.attention with `kern` in place of the kernels the planner would choose (as tests/test_buckets_gpu.py
    ::test_mma_sync_family_on_hopper does), forward and backward: for the mma_sync variant of a reordering pattern,
    whose call sorts the tokens by bucket before the kernels run and moves the results back."""
    from attngen import op

    planner = op._compiled_for
    op._compiled_for = lambda structure, q, mods="": kern
    try:
        yield
    finally:
        op._compiled_for = planner


def run_case(c: fuzzing.Case, device: torch.device, arch: str, tol: tuple[dict, dict]) -> list[str]:
    """Run one case; the list of what is wrong (empty: passed)."""
    if kernel_variant(c, arch) != "mma_sync":
        return _run(c, device, tol, None, forced=False)
    kern = compiled_for(c, arch)
    if c.reorders:  # bind.forward would run the kernels on unsorted tokens: through attngen.attention instead
        with _kernels_of_attention(kern):
            return _run(c, device, tol, None, forced=True)
    return _run(c, device, tol, kern, forced=True)


def _run(c: fuzzing.Case, device: torch.device, tol: tuple[dict, dict], direct, forced: bool) -> list[str]:
    """The case through attngen.attention, or with `direct` (a `kernel.Compiled`: the mma.sync kernels, which
    attngen.attention would not take on Hopper) launched through attngen.bind. `forced` (the mma_sync variant)
    checks the LSE even where the case does not return it."""
    from dataclasses import replace

    import attngen as ag
    from attngen import bind, prepare, reference, scoremod
    from attngen import pattern as P

    q, k, v, dout, dlse = c.inputs(device, requires_grad=c.backward)
    rt, mods, mt = c.runtime(device), c.mods(device), c.mod_tensors(device)
    scale = 1.0 / math.sqrt(c.head_dim) if c.scale is None else c.scale
    if direct is not None:  # the mma.sync kernels, launched directly (attngen.attention would take the wgmma ones)
        bound = scoremod.bind(mods, q, c.Sk, **mt)  # top-k by token ranks the modified scores, as a call does
        prep = prepare.prepare(c.pattern, q, k, {"document_ids": None, "key_lengths": None, **rt}, scale, bound)
        prep = replace(prep, score_mod=tuple(t.detach() for t in scoremod.kernel_tensors(bound)))
        out, lse = bind.forward(direct, q.detach(), k.detach(), v.detach(), scale, prep)
    elif c.return_lse or forced:
        out, lse = ag.attention(q, k, v, c.pattern, scale=c.scale, return_lse=True, score_mod=mods, **mt, **rt)
    else:
        out, lse = ag.attention(q, k, v, c.pattern, scale=c.scale, score_mod=mods, **mt, **rt), None
    torch.cuda.synchronize(device)
    ref_dtype = torch.float64 if c.scores <= FLOAT64_SCORES else torch.float32
    selection = []
    if P.topk_leaf(c.pattern) is not None:  # the call's block choice, checked; then the reference makes the same
        grid = ag.selected_blocks(q.detach(), k.detach(), c.pattern, **rt)
        selection = fuzzing.selection_errors(grid, q, k, c.pattern, rt)
        rt = {**rt, "selected_blocks": grid}
    ref, ref_lse = reference.attention(q, k, v, c.pattern, scale=c.scale, dtype=ref_dtype, score_mod=mods, **mt, **rt)
    errors = selection + check_forward(c, out, lse if (c.return_lse or forced) else None, ref, ref_lse, tol[0][c.dtype])
    if not c.backward:
        return errors
    with_lse = c.return_lse
    dlse = torch.where(torch.isinf(ref_lse), 0.0, dlse.to(ref_lse.dtype)).detach()  # no gradient into empty rows
    if direct is not None:
        got = bind.backward(direct, dout, q.detach(), k.detach(), v.detach(), out, lse,
                            dlse.float() if with_lse else None, scale, prep)  # fmt: skip
    else:
        outs, grads = ((out, lse), (dout, dlse.float())) if with_lse else ((out,), (dout,))
        got = torch.autograd.grad(outs, (q, k, v), grads, allow_unused=True)
    torch.cuda.synchronize(device)
    outs, grads = ((ref, ref_lse), (dout.to(ref.dtype), dlse)) if with_lse else ((ref,), (dout.to(ref.dtype),))
    want = torch.autograd.grad(outs, (q, k, v), grads)
    return errors + [f"backward: {e}" for e in check_grads(got, want, tol[1][c.dtype])]


# ---------------------------------------------------------------------------------------------------- report


def _reordering(c: fuzzing.Case) -> str:
    """Which of buckets / lsh / keep the pattern has, and what its kernels read: key ranges, or the mask at the
    sorted tokens' original positions."""
    from attngen import pattern as P

    if not c.reorders:
        return "none"
    kinds = [kind for kind in ("buckets", "lsh", "keep") if kind in c.family.split("+")]
    return "+".join(kinds) + (", key ranges" if P.keeps_key_ranges(c.pattern) else ", sorted mask")


def _labels(c: fuzzing.Case, arch: str) -> dict[str, str]:
    from attngen.select import split_selection

    try:
        p = compiled_for(c, arch).plan
        kernels = f"fwd {'wgmma' if p.fwd.wgmma else 'mma.sync'}"
        kernels += f", bwd {'wgmma' if p.dkdv.wgmma else 'mma.sync'}" if c.backward else ""
    except Exception:
        kernels = "(no kernel)"
    return {
        "head_dim": str(c.head_dim),
        "dtype": c.dtype,
        "pattern family": c.family,
        "kernel family": kernels,
        "selection rule": repr(rule) if (rule := split_selection(c.pattern)[1]) else "none",
        "reordering": _reordering(c),
    }


def summary(rows: list[tuple[dict, bool]]) -> str:
    lines = [f"{'':32} {'cases':>7} {'passed':>7} {'failed':>7}"]
    total = len(rows)
    failed = sum(not ok for _, ok in rows)
    lines.append(f"{'all':32} {total:>7} {total - failed:>7} {failed:>7}")
    for key in ("head_dim", "dtype", "kernel family", "selection rule", "reordering", "pattern family"):
        lines.append(f"by {key}:")
        counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for labels, ok in rows:
            counts[labels[key]][0] += 1
            counts[labels[key]][1] += not ok
        for name, (n, bad) in sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0])):
            lines.append(f"  {name:30} {n:>7} {n - bad:>7} {bad:>7}")
    return "\n".join(lines)


def dry_run(todo: list[fuzzing.Case], arch: str) -> int:
    """No GPU: each case's repro line and shapes, and what a run would compile."""
    from attngen.plan import make_plan

    structures = set()
    for c in todo:
        p = make_plan(c.pattern, head_dim=c.head_dim, dtype=c.dtype, arch=arch, score_mods=c.mod_structures())
        family = "mma.sync" if kernel_variant(c, arch) == "mma_sync" or not p.fwd.wgmma else "wgmma"
        structures.add(kernel_set(c, arch))
        print(f"{c.repro()}  # {c.describe()} [{family} on {arch}]")
    scores = sum(c.scores for c in todo)
    print(f"{len(todo)} cases, {len(structures)} kernel sets to compile for {arch}, {scores / 1e9:.2f} G scores")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--cases", type=int, default=1000, help="number of cases: seeds seed .. seed + cases - 1")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="these seeds instead of a range")
    ap.add_argument("--out", type=Path, default=None, help="folder for fuzz_failures.jsonl (default: $OUT or .)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (0: no prewarm)")
    ap.add_argument("--dry-run", action="store_true", help="generate and print the cases only (no GPU needed)")
    ap.add_argument("--arch", default=None, help="target arch (default: the GPU's; sm_90 for --dry-run)")
    args = ap.parse_args(argv)
    if args.seed < 0 or args.cases < 1 or any(s < 0 for s in args.seeds or ()):
        ap.error("seeds must be >= 0 and --cases >= 1")
    todo = [fuzzing.case(s) for s in args.seeds] if args.seeds else list(fuzzing.cases(args.seed, args.cases))
    if args.dry_run:
        return dry_run(todo, args.arch or "sm_90")

    from attngen.nvrtc import device_arch

    if not torch.cuda.is_available():
        print("no CUDA GPU: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    arch = args.arch or device_arch(device.index)
    out_dir = args.out or Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    failures_path = out_dir / "fuzz_failures.jsonl"
    failures_path.write_text("")
    seeds = " ".join(map(str, args.seeds)) if args.seeds else f"{args.seed}..{args.seed + len(todo) - 1}"
    print(f"{torch.cuda.get_device_name(device)} ({arch}): {len(todo)} cases, seeds {seeds}")
    if args.jobs > 0 and len(todo) > 1:
        prewarm(todo, arch, args.jobs)
    tol = tolerances()
    rows: list[tuple[dict, bool]] = []
    failed: list[fuzzing.Case] = []
    start = time.time()
    for n, c in enumerate(todo, 1):
        t0 = time.time()
        try:
            errors = run_case(c, device, arch, tol)
        except Exception as e:
            errors = [f"{type(e).__name__}: {e}", traceback.format_exc()]
        if errors:
            failed.append(c)
            record = {"seed": c.seed, "repro": c.repro(), "case": c.describe(), "errors": errors}
            with failures_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"FAIL {c.repro()}\n  {c.describe()}\n  " + "\n  ".join(e.rstrip() for e in errors[:3]))
        rows.append((_labels(c, arch), not errors))
        if errors:  # a sticky CUDA error (an illegal address, say) fails every later case: stop there
            try:
                torch.cuda.synchronize(device)
            except Exception as e:
                print(f"CUDA context unusable after seed {c.seed} ({type(e).__name__}: {e}); stopping")
                break
        if n % 100 == 0 or n == len(todo):
            elapsed = time.time() - start
            print(f"[{n}/{len(todo)}] {n - len(failed)} passed, {len(failed)} failed, {elapsed:.0f}s "
                  f"(last case {time.time() - t0:.2f}s)", flush=True)  # fmt: skip
    print(summary(rows))
    if len(rows) < len(todo):
        print(f"{len(todo) - len(rows)} cases not run")
    if failed:
        print(f"{len(failed)} failures (details in {failures_path}); reproduce each with:")
        for c in failed:
            print(f"  {c.repro()}")
    return 1 if failed or len(rows) < len(todo) else 0


if __name__ == "__main__":
    sys.exit(main())
