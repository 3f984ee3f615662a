"""Stage 3: KernelPlan -> KernelSource, one self-contained CUDA file rendered from templates/ with Jinja.

StrictUndefined everywhere: a misspelt template variable is an error, never an empty string. The rendered
text compiles on its own: it includes no header at all. Templates see the plan (`plan`), the tilings of its three
kernels (`fwd`, `dkdv`, `dq`) and the row statistics' launch shape (`pre_rows`, `pre_threads`); a plan's selection
rule is the template `plan.select.template`, which the kernel templates import."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jinja2

from ._resources import cache_dir, templates_dir
from .plan import KernelPlan

PREPROCESS_THREADS = 128
PREPROCESS_ROWS = 64  # rows of O / dO per preprocess block


@dataclass(frozen=True)
class KernelSource:
    """Exact CUDA text of one compilation unit plus what is needed to compile it."""

    name: str  # readable prefix of the cache key, e.g. "fwd_causal_bf16_hd64"
    code: str
    entries: tuple[str, ...]  # extern "C" kernel names defined in `code`
    arch: str  # "sm_80", "sm_90", "sm_90a", ...
    options: tuple[str, ...] = ()  # extra NVRTC options

    def __str__(self) -> str:
        return self.code


@functools.cache
def _env() -> jinja2.Environment:
    # Jinja's own bytecode cache keeps the compiled templates beside the kernels (keyed by template source), so a
    # new process that finds its kernels cached does not parse the templates either.
    directory = cache_dir()
    bytecode = jinja2.FileSystemBytecodeCache(str(directory), "jinja-%s.cache") if directory else None
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        bytecode_cache=bytecode,
    )


def _render(template: str, plan: KernelPlan, name: str, entries: tuple[str, ...], arch: str) -> KernelSource:
    code = (
        _env()
        .get_template(template)
        .render(
            plan=plan,
            fwd=plan.fwd,
            dkdv=plan.dkdv,
            dq=plan.dq,
            pre_rows=PREPROCESS_ROWS,
            pre_threads=PREPROCESS_THREADS,
        )
    )
    return KernelSource(name=f"{name}_{plan.name}", code=code, entries=entries, arch=arch)


def render_forward(plan: KernelPlan) -> KernelSource:
    """The forward kernel `attngen_fwd` of `plan`: the key-index gather kernel where the plan has one, else TMA +
    wgmma (sm_90a) or mma.sync, as its tiling says."""
    if plan.gather is not None:
        return _render("attn_gather_fwd.cu.j2", plan, "gather_fwd", ("attngen_fwd",), plan.arch)
    if plan.fwd.wgmma:
        return _render("attn_fwd_sm90.cu.j2", plan, "fwd", ("attngen_fwd",), "sm_90a")
    return _render("attn_fwd.cu.j2", plan, "fwd", ("attngen_fwd",), plan.arch)


def render_backward(plan: KernelPlan) -> KernelSource:
    """The backward kernels of `plan`: row statistics, dK/dV, dQ; key-index gathers, TMA + wgmma (sm_90a) or
    mma.sync."""
    if plan.gather is not None:
        return _render("attn_gather_bwd.cu.j2", plan, "gather_bwd", BACKWARD_ENTRIES, plan.arch)
    if plan.dkdv.wgmma:
        return _render("attn_bwd_sm90.cu.j2", plan, "bwd", BACKWARD_ENTRIES, "sm_90a")
    return _render("attn_bwd.cu.j2", plan, "bwd", BACKWARD_ENTRIES, plan.arch)


BACKWARD_ENTRIES = ("attngen_bwd_preprocess", "attngen_bwd_dkdv", "attngen_bwd_dq")


def render_gather_rows(arch: str) -> KernelSource:
    """`attngen_gather_rows`: whole rows of 16-byte vectors gathered by a row index (device.gather_rows)."""
    code = _env().get_template("gather_rows.cu.j2").render()
    return KernelSource(name="gather_rows", code=code, entries=("attngen_gather_rows",), arch=arch)


def render_range_classes(arch: str) -> KernelSource:
    """`attngen_range_classes`: a reordered call's tile classes from per-query key ranges (device.range_classes)."""
    code = _env().get_template("range_classes.cu.j2").render()
    return KernelSource(name="range_classes", code=code, entries=("attngen_range_classes",), arch=arch)


KEY_TILE_CHUNK = 256  # list rows one thread of attngen_tile_count / attngen_tile_fill scans


def render_key_lists(arch: str, tile: int) -> KernelSource:
    """`attngen_key_lists` (sorted lists and bits of a call's key_indices) and `attngen_tile_count` /
    `attngen_tile_fill` (their inverse at the granularity of `tile` keys): keyindex.sorted_lists, keyindex.tile_rows."""
    code = _env().get_template("key_lists.cu.j2").render(tile=tile, chunk=KEY_TILE_CHUNK)
    entries = ("attngen_key_lists", "attngen_tile_count", "attngen_tile_fill")
    return KernelSource(name=f"key_lists_t{tile}", code=code, entries=entries, arch=arch)


TOPK_CACHED = 8192  # per-row top-k: rows this long or shorter are held in shared memory (32 KiB of keys)


def render_topk_rows(arch: str) -> KernelSource:
    """`attngen_topk_rows`: each row's k largest fp32 scores, ties to the lower column (tokenselect's choice)."""
    code = _env().get_template("topk_rows.cu.j2").render(cached=TOPK_CACHED)
    return KernelSource(name="topk_rows", code=code, entries=("attngen_topk_rows",), arch=arch)


def indexer_smem(di: int) -> int:
    """Dynamic shared memory of `attngen_indexer_scores`: 64 keys' rows and two heads' 64 query rows, padded."""
    return (64 + 2 * 64) * (di + 8) * 2


def render_indexer_scores(arch: str, dtype: str, di: int) -> KernelSource:
    """`attngen_indexer_scores`: the lightning indexer's fp32 scores of a block of rows (tokenselect's scorer)."""
    code = _env().get_template("indexer_scores.cu.j2").render(dtype=dtype, di=di, smem=indexer_smem(di))
    return KernelSource(name=f"indexer_scores_{dtype}_d{di}", code=code, entries=("attngen_indexer_scores",), arch=arch)
