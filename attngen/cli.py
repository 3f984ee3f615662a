"""`attngen emit` prints the CUDA source, plan or resource report of a pattern; `attngen draw` draws its mask (as
text, or as a picture with --out); `attngen prewarm` compiles patterns' kernels into the cache ahead of time;
`attngen cache` lists or clears the kernel cache. Exit status: 0 ok, 1 compile failure, 2 bad input, 130
interrupted, 141 output pipe closed early (as if killed by SIGPIPE: `attngen emit ... | head -1` prints no
traceback).

Pattern expressions are evaluated by walking Python's AST against a whitelist (constructor calls, constants,
& | ~), never by eval(), so a command-line argument cannot run code.

This module imports nothing heavy at module level: attngen.cache, attngen.nvrtc, torch, the pattern DSL, tqdm
and matplotlib are imported by the commands that use them, so `attngen --help` and `attngen cache ...` cost little
more than importing the attngen package (while attngen/__init__.py imports torch eagerly, that import is most of it)."""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from attngen.errors import AttngenError, InputError

_HELP_ALLOWED = "constructor calls, int/float/str constants, keyword arguments, & | ~, unary - and parentheses"
# What a user may reach for that the grammar leaves out, named the way they would think of it.
_NAMES = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambda",
    ast.JoinedStr: "f-strings",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.BoolOp: "'and'/'or' (combine patterns with & and |)",
    ast.Compare: "comparisons",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignment expressions",
    ast.Starred: "*arguments",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
}

_OPERATORS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.MatMult: "@",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitXor: "^",
    ast.UAdd: "unary +",
}


def parse_pattern(text: str, constructors: Mapping[str, Callable[..., Any]] | None = None) -> Any:
    """Build the pattern that `text` spells, e.g. "causal() & sliding_window(1024) | global_tokens(16)".

    Only names in `constructors` (default: attngen.pattern.CONSTRUCTORS) may be called; anything else raises
    InputError naming the construct that is not allowed."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise InputError(f"pattern expression {text!r} is not valid: {exc}") from None
    except (RecursionError, MemoryError):  # CPython's parser reports deep nesting as either
        raise InputError("pattern expression is nested too deeply") from None
    if constructors is None:
        from attngen.pattern import CONSTRUCTORS
        from attngen.select.nm import nm

        constructors = {**CONSTRUCTORS, "nm": nm}
    try:
        return _Evaluator(text, constructors).pattern(tree.body)
    except RecursionError:
        raise InputError("pattern expression is nested too deeply") from None


class _Evaluator:
    def __init__(self, text: str, constructors: Mapping[str, Callable[..., Any]]) -> None:
        self.text = text
        self.constructors = constructors

    def pattern(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            left, right = self.pattern(node.left), self.pattern(node.right)
            return left & right if isinstance(node.op, ast.BitAnd) else left | right
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
            return ~self.pattern(node.operand)
        raise self.reject(node)

    def call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name):
            raise self.reject(node.func)
        name = node.func.id
        if name not in self.constructors:
            known = ", ".join(sorted(self.constructors))
            raise InputError(f"unknown pattern constructor {name!r} in {self.text!r}; known: {known}")
        args = [self.argument(arg) for arg in node.args]
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise self.reject(keyword.value, "**arguments")
            kwargs[keyword.arg] = self.argument(keyword.value)
        try:
            return self.constructors[name](*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{ast.get_source_segment(self.text, node)}: {exc}") from exc

    def argument(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            if isinstance(node.value, str) and "__" in node.value:
                raise self.reject(node, "strings containing '__'")
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            operand = node.operand
            if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):
                return -operand.value
            raise self.reject(node, "unary - on anything but a number")
        return self.pattern(node)

    def reject(self, node: ast.AST, what: str | None = None) -> InputError:
        if what is None:
            what = self.describe(node)
        segment = ast.get_source_segment(self.text, node) or self.text
        return InputError(f"not allowed in a pattern expression: {what} in {segment!r}; allowed: {_HELP_ALLOWED}")

    def describe(self, node: ast.AST) -> str:
        if isinstance(node, ast.Name) and node.id in self.constructors:
            return f"the uncalled constructor {node.id!r} (write {node.id}())"
        if isinstance(node, ast.Name):
            return f"the unknown name {node.id!r}"
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return f"the constant {node.value!r} where a pattern is expected"
        if isinstance(node, ast.Constant):
            return f"the constant {node.value!r}"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return "unary - on a pattern (its complement is ~)"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return "'not' (the complement of a pattern is ~)"
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            return f"the operator {_OPERATORS.get(type(node.op), type(node.op).__name__)}"
        return _NAMES.get(type(node), type(node).__name__)


def _emit(args: argparse.Namespace) -> int:
    pattern = parse_pattern(args.pattern)
    import torch  # only `emit` needs torch; `attngen cache ...` stays quick without it

    import attngen
    from attngen.nvrtc import check_arch

    arch = check_arch(args.arch) if args.arch else _local_arch(torch)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    kern = attngen.compile(pattern, head_dim=args.head_dim, dtype=dtype, arch=arch, score_mod=_score_mods(args))
    if args.plan:
        print(kern.plan)
    elif args.resources:
        print(resource_report(kern, backward=args.backward))
    else:
        print(kern.backward_source if args.backward else kern.source)
    return 0


def _score_mods(args: argparse.Namespace) -> tuple:
    """`--score-mod` values, in order: "softcap(c)", "alibi()" or "alibi(align='bottom_right')", "bias()" or
    "bias(dtype='float32')", "rel_bias(32, 128)" (the kernels do not depend on alibi's slopes, the bias or the T5
    table, which are call-time data)."""
    import torch

    from attngen import scoremod

    made = {
        "softcap": scoremod.softcap,
        "alibi": lambda align="top_left": scoremod.alibi(torch.ones(1), align),
        "bias": lambda dtype="input": scoremod.Bias(_bias_dtype(dtype)),
        "rel_bias": scoremod.rel_bias,
    }
    return tuple(parse_pattern(text, made) for text in args.score_mod)


def _bias_dtype(dtype: str) -> str:
    if dtype not in ("input", "float32"):
        raise InputError(f"bias(dtype=...) is 'input' (the kernels' dtype) or 'float32', got {dtype!r}")
    return dtype


def resource_report(kern: Any, *, backward: bool = False) -> str:
    """What `emit --resources` prints: per entry ptxas's registers, static shared memory, spills and stack, the
    dynamic shared memory the plan launches it with, then ptxas's performance notes on the binary."""
    binary = kern.backward_binary if backward else kern.forward_binary
    lines = []
    for entry, resources in binary.resources:
        lines.append(f"# {entry}")
        for line in str(resources).splitlines():
            lines.append(line)
            if line.startswith("shared_bytes:"):  # ptxas counts static shared memory only
                lines.append(f"dynamic_shared_bytes: {dynamic_shared_bytes(kern.kernel_plan, entry)}")
    notes = binary.performance_notes
    lines += [f"performance notes: {'' if notes else 'none'}".rstrip(), *(f"  {note}" for note in notes)]
    return "\n".join(lines)


# The plan's tiles each kernel entry launches with (their `smem_bytes` is its dynamic shared memory, as launched);
# the first attribute the plan has is used: the dK/dV tiles are `plan.dkdv`, `plan.bwd` in plans from before that
# name. The backward preprocess kernel uses no dynamic shared memory.
_ENTRY_TILES = {
    "attngen_fwd": ("fwd",),
    "attngen_bwd_preprocess": (),
    "attngen_bwd_dkdv": ("dkdv", "bwd"),
    "attngen_bwd_dq": ("dq",),
}


def dynamic_shared_bytes(plan: Any, entry: str) -> int | str:
    """Bytes of dynamic shared memory kernel `entry` of `plan` launches with; "unknown" for an entry not above."""
    if entry not in _ENTRY_TILES:
        return "unknown"
    for name in _ENTRY_TILES[entry]:
        tiles = getattr(plan, name, None)
        if tiles is not None:
            return tiles.smem_bytes
    return 0


def _draw(args: argparse.Namespace) -> int:
    pattern = parse_pattern(args.pattern)
    sq, sk = args.sq, args.sq if args.sk is None else args.sk
    runtime = _draw_inputs(pattern, sq, sk, args)
    cells = {} if args.cells is None else {"cells": args.cells}
    if args.out is None:
        print(pattern.draw(sq, sk, **cells, **runtime))
        return 0
    pattern.plot(sq, sk, args.out, **cells, **runtime)
    print(f"wrote {args.out}: the {sq} x {sk} mask of {pattern!r}")
    return 0


def _draw_inputs(pattern: Any, sq: int, sk: int, args: argparse.Namespace) -> dict[str, Any]:
    """The call-time tensors `draw` passes to the pattern, from --documents, --key-length, --buckets, --keep and
    --key-indices (random bucket ids, keep masks and key lists from --seed; lsh(n, seed=...) hashes random q and k,
    topk_blocks scores them)."""
    import torch

    from attngen import pattern as P

    needed = pattern.runtime_inputs
    runtime: dict[str, Any] = {}
    if "document_ids" in needed:
        if not args.documents:
            raise InputError("the pattern uses documents(): give the document lengths, e.g. --documents 300 200 524")
        if sq != sk or sum(args.documents) != sk or min(args.documents) < 1:
            raise InputError(
                f"--documents takes positive lengths adding up to the sequence length (with --sq equal to --sk); "
                f"got {args.documents} for {sq} x {sk}"
            )
        runtime["document_ids"] = torch.repeat_interleave(
            torch.arange(len(args.documents)), torch.tensor(args.documents)
        )
    if "key_lengths" in needed:
        if args.key_length is None:
            raise InputError("the pattern uses key_padding(): give the number of real keys, e.g. --key-length 700")
        runtime["key_lengths"] = torch.tensor([args.key_length])
    gen = torch.Generator().manual_seed(args.seed)
    if "query_buckets" in needed:
        if args.buckets is None or args.buckets < 1:
            raise InputError("the pattern uses buckets(): give a number of random buckets, e.g. --buckets 4")
        runtime["query_buckets"] = torch.randint(0, args.buckets, (1, 1, sq), generator=gen)
        runtime["key_buckets"] = torch.randint(0, args.buckets, (1, 1, sk), generator=gen)
    if "query_keep" in needed:
        if args.keep is None or not 0 <= args.keep <= 1:
            raise InputError("the pattern uses keep(): give the share of tokens kept at random, e.g. --keep 0.5")
        runtime["query_keep"] = torch.rand(1, 1, sq, generator=gen) < args.keep
        runtime["key_keep"] = torch.rand(1, 1, sk, generator=gen) < args.keep
    if "key_indices" in needed:
        if args.key_indices is None or args.key_indices < 0:
            raise InputError(
                "the pattern uses key_indices(): give a number of random keys per query, e.g. --key-indices 8"
            )
        runtime["key_indices"] = torch.randint(0, max(sk, 1), (1, 1, sq, args.key_indices), generator=gen)
    if any(isinstance(leaf, (P.LSH, P.TopkBlocks, P.TopkTokens)) for leaf in pattern.leaves()):  # random q, k (D 64)
        runtime["q"], runtime["k"] = (torch.randn(1, 1, n, 64, generator=gen) for n in (sq, sk))
    token = P.token_leaf(pattern)
    if token is not None and isinstance(token.scorer, P.LowRank):  # DSA's projection, rank 16
        runtime["proj"] = P.random_projection(64, 16, seed=args.seed)
    if token is not None and isinstance(token.scorer, P.Indexer):  # 4 random index heads of dim 32
        runtime["index_q"] = torch.randn(1, sq, 4, 32, generator=gen)
        runtime["index_k"] = torch.randn(1, sk, 32, generator=gen)
        runtime["index_w"] = torch.rand(1, sq, 4, generator=gen)
    given = {"--documents": ("document_ids", args.documents), "--key-length": ("key_lengths", args.key_length)}
    given |= {"--buckets": ("query_buckets", args.buckets), "--keep": ("query_keep", args.keep)}
    given |= {"--key-indices": ("key_indices", args.key_indices)}
    unused = [flag for flag, (name, value) in given.items() if value is not None and name not in needed]
    if unused:
        raise InputError(f"{' and '.join(unused)} given, but {pattern!r} does not use it")
    return runtime


def _prewarm(args: argparse.Namespace) -> int:
    """Compile every combination of the given patterns, head dims, dtypes and archs into the kernel cache."""
    for text in args.patterns:
        parse_pattern(text)  # a bad expression stops everything before any process starts
    from attngen.nvrtc import check_arch
    from attngen.tiling import HEAD_DIMS

    for head_dim in args.head_dim:
        if head_dim not in HEAD_DIMS:
            raise InputError(f"head dim {head_dim} is not supported; supported: {', '.join(map(str, HEAD_DIMS))}")
    if args.arch:
        archs = [check_arch(arch) for arch in args.arch]
    else:
        import torch

        archs = [_local_arch(torch)]
    if args.jobs is not None and args.jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {args.jobs}")
    todo = [
        PrewarmJob(text, head_dim, dtype, arch, args.backward)
        for text in dict.fromkeys(args.patterns)
        for head_dim in dict.fromkeys(args.head_dim)
        for dtype in dict.fromkeys(args.dtype)
        for arch in dict.fromkeys(archs)
    ]
    workers = min(args.jobs or os.cpu_count() or 1, len(todo))
    from tqdm import tqdm

    start = time.perf_counter()
    compiled, failures = 0, []
    with tqdm(total=len(todo), desc="prewarm", unit="set", file=sys.stderr, disable=None) as bar:
        for job, compiles, error in _run_jobs(todo, workers):
            compiled += compiles > 0 and error is None
            if error is not None:
                failures.append((job, error))
                bar.write(f"attngen: error: {job}: {error}", file=sys.stderr)
            bar.update()
    seconds = time.perf_counter() - start
    from attngen import cache

    what = "forward + backward" if args.backward else "forward"
    cached = len(todo) - compiled - len(failures)
    failed = f", {len(failures)} failed" if failures else ""
    where = cache.cache_dir() or "memory only"
    print(
        f"prewarm: {len(todo)} kernel set{'s' if len(todo) != 1 else ''} ({what}): {compiled} compiled, "
        f"{cached} already cached{failed}, in {seconds:.1f} s (cache: {where})"
    )
    return 1 if failures else 0


class PrewarmJob(NamedTuple):
    """One combination `prewarm` compiles (sent to a worker process as is: plain values, the pattern as text)."""

    pattern: str
    head_dim: int
    dtype: str
    arch: str
    backward: bool

    def __str__(self) -> str:
        backward = ", backward" if self.backward else ""
        return f"{self.pattern} (head dim {self.head_dim}, {self.dtype}, {self.arch}{backward})"


def _run_jobs(todo: list[PrewarmJob], workers: int):
    """(job, NVRTC compiles it made, error message or None) per job as each finishes: in this process when one
    worker is asked for, else in a pool of `workers` spawned processes (NVRTC compiles one file per process)."""
    if workers <= 1:
        for job in todo:
            yield (job, *_prewarm_one(job))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_prewarm_one, job): job for job in todo}
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool as exc:  # a worker killed (out of memory, a signal): no result to report
                raise AttngenError(f"a prewarm process died while compiling {futures[future]}: {exc}") from None
            yield (futures[future], *result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error or Ctrl-C, nothing more starts


def _prewarm_one(job: PrewarmJob) -> tuple[int, str | None]:
    """Compile one combination's kernels through the cache; (NVRTC compiles made, error message or None). Errors
    come back as text: a CompileError does not survive pickling between processes."""
    import importlib

    import torch

    import attngen

    compile_module = importlib.import_module("attngen.nvrtc")
    text, head_dim, dtype, arch, backward = job
    compiles = 0
    nvrtc_compile = compile_module.nvrtc_compile

    def counted(source: Any) -> Any:  # the cache calls NVRTC only on a miss: counting calls counts misses
        nonlocal compiles
        compiles += 1
        return nvrtc_compile(source)

    compile_module.nvrtc_compile = counted
    try:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        kern = attngen.compile(parse_pattern(text), head_dim=head_dim, dtype=torch_dtype, arch=arch)
        if backward:
            kern.backward_binary  # noqa: B018 - compiles and caches the backward kernels
    except AttngenError as exc:
        return compiles, str(exc)
    finally:
        compile_module.nvrtc_compile = nvrtc_compile
    return compiles, None


def _local_arch(torch: Any) -> str:
    from attngen.nvrtc import device_arch

    if not torch.cuda.is_available():
        raise InputError("no CUDA GPU found; pass --arch (e.g. --arch sm_90) to build kernels for another machine")
    return device_arch(torch.cuda.current_device())


def _cache_list(args: argparse.Namespace) -> int:
    from attngen import cache

    directory = cache.cache_dir()
    if directory is None:
        print("cache: memory only (no usable cache directory)")
        return 0
    entries = cache.list_entries()
    count = f"{len(entries)} kernel{'s' if len(entries) != 1 else ''}"
    print(f"cache: {directory} ({count}, {_size(sum(e.size for e in entries))})")
    if entries:
        # An entry's name ends in its arch (e.g. fwd_..._sm_90a); its note says what it was compiled for.
        width = max(len("name"), *(len(e.name) for e in entries))
        print(f"{'name':<{width}}  {'size':>9}  {'age':>4}  made for")
        now = time.time()
        for e in entries:
            print(f"{e.name:<{width}}  {_size(e.size):>9}  {_age(now - e.mtime):>4}  {e.note}".rstrip())
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    from attngen import cache

    removed = cache.clear()
    print(f"removed {removed} cached kernel{'s' if removed != 1 else ''} from {cache.cache_dir() or 'memory'}")
    return 0


def _size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    if nbytes < 1024**2:
        return f"{nbytes / 1024:.1f} KB"
    return f"{nbytes / 1024**2:.1f} MB"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attngen", description="Fused attention kernels from attention patterns.")
    commands = parser.add_subparsers(required=True, metavar="command")

    emit = commands.add_parser("emit", help="print the CUDA source, plan or resources of a pattern's kernels")
    emit.add_argument("pattern", help='pattern expression, e.g. "causal() & sliding_window(1024)"')
    emit.add_argument("--head-dim", type=int, required=True)
    emit.add_argument("--dtype", choices=("bf16", "fp16"), required=True)
    emit.add_argument("--arch", help="target such as sm_80 or sm_90a (default: the local GPU)")
    emit.add_argument("--backward", action="store_true", help="the backward kernels instead of the forward one")
    emit.add_argument(
        "--score-mod",
        action="append",
        default=[],
        metavar="MOD",
        help='a score modification, applied in the order given: "softcap(30.0)", "alibi()", "bias()", '
        '"rel_bias(32, 128)" (repeatable)',
    )
    shown = emit.add_mutually_exclusive_group()
    shown.add_argument(
        "--resources",
        action="store_true",
        help="registers, static and dynamic shared memory, spills per kernel, and ptxas's performance notes",
    )
    shown.add_argument("--plan", action="store_true", help="the kernel plan instead of the source")
    emit.set_defaults(run=_emit)

    draw = commands.add_parser(
        "draw",
        help="draw a pattern's mask: as text (█ kept, ▒ partly kept, · dropped), or as a picture with --out",
        description="Draw a pattern's mask, queries down and keys across: as text (█ kept, ▒ partly kept, · dropped), "
        'or with --out as an image (PNG, SVG, PDF, by the suffix; needs pip install "attngen[plot]").',
    )
    draw.add_argument("pattern", help='pattern expression, e.g. "causal() & sliding_window(256) | global_tokens(16)"')
    draw.add_argument("--sq", type=int, required=True, help="query length")
    draw.add_argument("--sk", type=int, help="key length (default: the query length)")
    draw.add_argument("--out", help="save a picture here (e.g. mask.png) instead of printing text")
    draw.add_argument(
        "--cells", type=int, help="at most this many cells a side (default: 64 as text, 256 as a picture)"
    )
    draw.add_argument(
        "--documents", type=int, nargs="+", metavar="LENGTH", help="document lengths, for patterns using documents()"
    )
    draw.add_argument("--key-length", type=int, help="number of real keys, for patterns using key_padding()")
    draw.add_argument("--buckets", type=int, help="number of random buckets, for patterns using buckets()")
    draw.add_argument("--keep", type=float, help="share of tokens kept at random, for patterns using keep()")
    draw.add_argument("--key-indices", type=int, help="random keys listed per query, for patterns using key_indices()")
    draw.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random buckets, keep masks, key lists, q, k and scorer inputs (lsh, topk_blocks, topk)",
    )
    draw.set_defaults(run=_draw)

    prewarm = commands.add_parser(
        "prewarm",
        help="compile patterns' kernels into the cache ahead of time (every head dim, dtype and arch given)",
        description="Compile every combination of the given patterns, head dims, dtypes and archs into the kernel "
        "cache, in parallel processes, so that programs find their kernels compiled (a container image, a cluster's "
        "shared cache directory).",
    )
    prewarm.add_argument("patterns", nargs="+", metavar="pattern", help='pattern expressions, e.g. "causal()"')
    prewarm.add_argument("--head-dim", type=int, nargs="+", required=True, help="one or more head dims")
    prewarm.add_argument("--dtype", choices=("bf16", "fp16"), nargs="+", required=True, help="one or more dtypes")
    prewarm.add_argument("--arch", nargs="+", help="one or more targets such as sm_80 sm_90 (default: the local GPU)")
    prewarm.add_argument("--backward", action="store_true", help="the backward kernels too (for training)")
    prewarm.add_argument("--jobs", type=int, help="processes compiling at once (default: one per CPU core)")
    prewarm.set_defaults(run=_prewarm)

    cache_parser = commands.add_parser("cache", help="inspect the compiled-kernel cache")
    cache_commands = cache_parser.add_subparsers(required=True, metavar="action")
    cache_commands.add_parser("list", help="list cached kernels").set_defaults(run=_cache_list)
    cache_commands.add_parser("clear", help="delete every cached kernel").set_defaults(run=_cache_clear)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attngen` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
        return status
    except AttngenError as exc:
        print(f"attngen: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1
    except KeyboardInterrupt:
        print("attngen: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped early (`attngen emit ... | head -1`): stop quietly with SIGPIPE's status. Output still
        # buffered would fail again when the interpreter flushes stdout at exit, so stdout goes to devnull (the
        # recipe of Python's signal module documentation).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (a test's capture)
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
