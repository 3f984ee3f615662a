"""The cost of a process's first attention call, each in a fresh interpreter with torch already imported and the
inputs already on the GPU: SDPA's first call, then `import attngen` + the first `attngen.attention` with a cold
kernel cache (a never-seen pattern: planning, rendering, NVRTC), then the same with the cache warm.

    python bench/first_call.py [--profile]     # on a GPU; --profile also prints the warm call's top functions

The newcomer target: warm, import + first call <= SDPA's first call + 0.25 s. Python's bytecode is cached first, by
one discarded run, under PYTHONPYCACHEPREFIX: an installed package has its .pyc files, but a read-only
site-packages without them (as on some GPU images) recompiles sympy's source in every process (~2 s)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
q, k, v = (torch.randn(2, 16, 1024, 64, device="cuda", dtype=torch.float16) for _ in range(3))
torch.cuda.synchronize()
which, profile = sys.argv[1], sys.argv[2] == "1"
if profile:
    import cProfile, pstats
    prof = cProfile.Profile()
    prof.enable()
t0 = time.perf_counter()
if which == "sdpa":
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    t1 = t0
else:
    import attngen as ag
    pattern = ag.causal() & ag.sliding_window(300)  # the first public name binds them all: the imports are here
    t1 = time.perf_counter()
    out = ag.attention(q, k, v, pattern)
torch.cuda.synchronize()
t2 = time.perf_counter()
if profile:
    prof.disable()
    pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
dynamo = "torch._dynamo" in sys.modules
print(json.dumps({"import": t1 - t0, "call": t2 - t1, "total": t2 - t0, "dynamo_imported": dynamo}))
"""


def child(which: str, cache: str, pycache: str, profile: bool = False) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, ATTNGEN_CACHE_DIR=cache, PYTHONPATH=path, PYTHONPYCACHEPREFIX=pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    p = subprocess.run([sys.executable, "-c", CHILD, which, "1" if profile else "0"], capture_output=True, text=True,
                       env=env, cwd=ROOT)  # fmt: skip
    if p.returncode:
        raise SystemExit(f"{which} child failed:\n{p.stderr[-3000:]}")
    if profile:
        print(p.stderr[-6000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="print the warm attngen call's profile")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as warmup:
        pycache = str(Path(warmup) / "pycache")
        child("attngen", warmup, pycache)  # bytecode for every module both children import
        child("sdpa", warmup, pycache)
        rows = {
            "sdpa": child("sdpa", cache, pycache),
            "attngen, cold cache": child("attngen", cache, pycache),
            "attngen, warm cache": child("attngen", cache, pycache),
        }
        if args.profile:
            child("attngen", cache, pycache, profile=True)
    print(f"{'first call':22} {'import':>8} {'call':>8} {'total':>8}  torch._dynamo imported")
    print("(import: `import attngen` and building the pattern, which loads the package; call: the attention call)")
    for name, r in rows.items():
        print(f"{name:22} {r['import']:8.3f} {r['call']:8.3f} {r['total']:8.3f}  {r['dynamo_imported']}")
    over = rows["attngen, warm cache"]["total"] - rows["sdpa"]["total"]
    print(f"warm attngen over SDPA: {over:+.3f} s (target <= +0.25 s)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
