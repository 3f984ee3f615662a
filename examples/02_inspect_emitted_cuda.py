"""Inspect what attngen generates for a pattern: the plan, the ptxas resource report and the CUDA source.

Compiling needs no GPU (NVRTC runs on the CPU), so this works anywhere attngen is installed:

    python examples/02_inspect_emitted_cuda.py
    python examples/02_inspect_emitted_cuda.py --pattern "causal() & sliding_window(256)" --arch sm_80

The full forward and backward sources are written to a temporary directory whose path is printed; the same
views are available from the command line (`attngen emit ...`, printed at the end)."""

import argparse
import tempfile
from pathlib import Path

import torch

import attngen
from attngen.cli import parse_pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="causal() & sliding_window(1024) | global_tokens(16)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--lines", type=int, default=40, help="how much of the source to print")
    args = parser.parse_args()

    pattern = parse_pattern(args.pattern)  # the same safe parser as the CLI; in code, write the pattern itself
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    kernel = attngen.compile(pattern, head_dim=args.head_dim, dtype=dtype, arch=args.arch)

    print(f"== plan ({kernel!r}), schedule for 1024 x 1024")
    print(kernel.plan)

    print("\n== resources (ptxas, per kernel entry)")
    for entry, resources in kernel.resources + kernel.backward_resources:
        print(f"{entry}: " + ", ".join(str(resources).splitlines()))

    print(f"\n== forward CUDA source, first {args.lines} of {len(kernel.source.splitlines())} lines")
    print("\n".join(kernel.source.splitlines()[: args.lines]))

    out = Path(tempfile.mkdtemp(prefix="attngen_example_"))
    (out / "forward.cu").write_text(kernel.source)
    (out / "backward.cu").write_text(kernel.backward_source)
    print(f"\n== full sources written to\n{out / 'forward.cu'}\n{out / 'backward.cu'}")

    emit = f'attngen emit "{args.pattern}" --head-dim {args.head_dim} --dtype {args.dtype} --arch {args.arch}'
    print("\n== the same from the command line")
    print(f"{emit} --plan")
    print(f"{emit} --resources")
    print(f"{emit} > forward.cu")
    print(f"{emit} --backward > backward.cu")
    print(f"{emit} --backward --resources")


if __name__ == "__main__":
    main()
