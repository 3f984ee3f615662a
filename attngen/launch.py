"""The public entry points: `attention` (validate, prepare, run the custom op) and `compile` (a `Kernel`: the
compiled kernels of a pattern, with its plan, emitted CUDA and resource reports)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch

from . import scoremod
from .errors import InputError
from .kernel import Compiled, compiled
from .nvrtc import Binary, device_arch
from .op import attention as attention_fn
from .op import to_original, to_sorted
from .pattern import Pattern, full, token_leaf, topk_leaf
from .plan import KernelPlan, normalize_dtype
from .prepare import prepare
from .render import KernelSource
from .schedule import explain
from .select import split_selection
from .tiling import HEAD_DIMS


@dataclass(frozen=True)
class PlanReport:
    """A plan together with its tile schedule for example lengths: what `Kernel.plan` prints."""

    plan: KernelPlan
    pattern: Pattern
    seq_lens: tuple[int, int]

    def __str__(self) -> str:
        t = self.plan.fwd
        first, *rest = str(self.plan).splitlines()
        if self.pattern != self.plan.pattern:  # name the user's pattern; the plan is of its structure
            first = f"KernelPlan for {self.pattern!r}\n  structure {self.plan.pattern!r} (compiled once for any data)"
        positions = split_selection(self.pattern)[0]
        return "\n".join([first, *rest, explain(positions, t.block_m, t.block_n, *self.seq_lens)])


class Kernel:
    """The compiled kernels of one pattern for one dtype, head dim and arch. Patterns of one structure (the same
    expression with other layout grids) share the compiled kernels."""

    def __init__(self, pattern: Pattern, kernels: Compiled, score_mod: tuple = ()):
        self.pattern = pattern
        self.compiled = kernels
        self.score_mod = score_mod  # the modifications it was compiled with (scoremod.normalize)

    @property
    def kernel_plan(self) -> KernelPlan:
        return self.compiled.plan

    @property
    def plan(self) -> PlanReport:
        """The plan, with the tile schedule for example lengths 1024 x 1024 (see `explain`)."""
        return self.explain(1024, 1024)

    def explain(self, q_len: int, kv_len: int) -> PlanReport:
        """The plan with the tile schedule (full / partial / empty tiles, and why) for these lengths."""
        return PlanReport(self.compiled.plan, self.pattern, (q_len, kv_len))

    @property
    def forward_kernel(self) -> KernelSource:
        return self.compiled.forward_source

    @property
    def forward_binary(self) -> Binary:
        return self.compiled.forward_binary

    @property
    def source(self) -> str:
        return self.compiled.forward_source.code

    @property
    def resources(self):
        return self.compiled.forward_binary.resources

    @property
    def backward_kernel(self) -> KernelSource:
        return self.compiled.backward_source

    @property
    def backward_binary(self) -> Binary:
        """Compiled on first use: inference never pays for the backward."""
        return self.compiled.backward_binary

    @property
    def backward_source(self) -> str:
        return self.backward_kernel.code

    @property
    def backward_resources(self):
        return self.backward_binary.resources

    def __call__(self, q, k, v, *, scale=None, return_lse=False, bias=None, rel_table=None, **inputs):
        """Same as `attngen.attention(q, k, v, <this kernel's pattern>, score_mod=<its modifications>, ...)`."""
        plan = self.compiled.plan
        _check(q, k, v)
        if q.shape[-1] != plan.head_dim or _dtype_name(q.dtype) != plan.dtype:
            raise InputError(
                f"{self!r} was compiled for head_dim {plan.head_dim}, {plan.dtype}; got {q.shape[-1]}, {q.dtype}"
            )
        tensors = {"bias": bias, "rel_table": rel_table}
        return _call(self.pattern, q, k, v, scale, return_lse, inputs, self.score_mod, tensors)

    def __repr__(self) -> str:
        p = self.compiled.plan
        return f"Kernel({self.pattern!r}, {p.dtype}, head_dim={p.head_dim}, {p.arch})"


def _dtype_name(dtype: torch.dtype) -> str:
    return "fp16" if dtype == torch.float16 else "bf16"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must be 4-d [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise InputError(f"{name} has dtype {t.dtype}; supported: torch.float16, torch.bfloat16")
        if t.stride(-1) != 1:
            raise InputError(f"{name} must be contiguous in its last (head_dim) dimension, stride is {t.stride(-1)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise InputError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, _Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise InputError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise InputError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    _require_cuda(q)


def _require_cuda(q: torch.Tensor) -> None:
    """The last of `_check`'s checks (tests without a GPU lift only this one)."""
    if q.device.type != "cuda":
        raise InputError(f"q, k, v are on {q.device}; attngen kernels run on CUDA tensors")


def _scale(scale, D: int) -> float:
    """The softmax scale as a float: 1/sqrt(D) for None, else a positive finite real number."""
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise InputError(f"scale must be a positive finite real number, got {type(scale).__name__} {scale!r:.60}")
    try:
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    except OverflowError:
        raise InputError("scale must be a positive finite number, got an integer too large for a float") from None
    if not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"scale must be a positive finite number, got {scale}")
    return scale


def _call(pattern: Pattern, q, k, v, scale, return_lse, inputs: dict, mods: tuple, tensors: dict):
    """`mods` the score modifications (scoremod.normalize), `tensors` their call-time tensors (bias=, rel_table=)."""
    scale = _scale(scale, q.shape[-1])
    # Under torch.compile this runs at trace time: only tensor work and constants (the pattern's key); planning
    # and compiling happen inside the custom op, on its first call.
    scoremod.check_reordered(mods, pattern)
    given = q
    q, mods, tensors = scoremod.fold(mods, q, tensors)  # head scales: into q and the additive terms before them
    mods = scoremod.bind(mods, q, k.shape[2], **tensors)
    # lsh hashes the caller's q; top-k by token ranks the modified scores (which a reordering pattern never has)
    prep = prepare(pattern, given if pattern.reorders else q, k, inputs, scale, mods)
    mods_key = ""
    if mods:
        prep = replace(prep, score_mod=tuple(scoremod.kernel_tensors(mods)))
        mods_key = scoremod.key(scoremod.structures(mods))
    if prep.permutation is None:
        out, lse = attention_fn(q, k, v, pattern.key, scale, prep.tensors(), mods_key)
        return (out, lse) if return_lse else out
    # Buckets / keep masks: the kernels run on the tokens sorted by bucket (attngen.reorder), then back.
    perm = prep.permutation
    qs = to_sorted(q, perm.q_rows, perm.q_back)
    ks, vs = (to_sorted(t, perm.k_rows, perm.k_back) for t in (k, v))
    out, lse = attention_fn(qs, ks, vs, pattern.key, scale, prep.tensors(), mods_key)
    out, lse = (to_original(t, perm.q_rows, perm.q_back) for t in (out, lse))
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    document_ids=None,
    key_lengths: torch.Tensor | None = None,
    score_mod=None,
    bias: torch.Tensor | None = None,
    rel_table: torch.Tensor | None = None,
    **inputs,
):
    """softmax(scale · Q Kᵀ restricted to `pattern`) · V for q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D] -> [B,Hq,Sq,D].

    `pattern` defaults to `full()`. `scale` defaults to 1/sqrt(D). With `return_lse`, also the fp32 log-sum-exp
    [B,Hq,Sq] (-inf for rows with no allowed key, whose output is 0). `document_ids` ([B,S] / [S], or a
    (query, key) pair when Sq != Sk) and `key_lengths` ([B]) feed `documents()` and `key_padding()`;
    `query_buckets` / `key_buckets` ([B, Hq, Sq] / [B, Hkv, Sk] integers) feed `buckets()`, `query_keep` /
    `key_keep` (bool, same shapes) feed `keep()`; a selection rule's call-time tensors are passed by the names it
    documents. `score_mod`: `softcap(c)`, `alibi(slopes)`, `bias()`, `rel_bias(...)`, `head_scale(scales)` or a
    tuple of them, applied in order to s = scale · q·k before the pattern and any selection rule (attngen.scoremod);
    `bias` (broadcastable to [B, Hq, Sq, Sk]) and `rel_table` ([Hq, num_buckets]) are the tensors `bias()` and
    `rel_bias()` add. Differentiable in q, k, v, bias, rel_table and head scales."""
    _check(q, k, v)
    pattern = full() if pattern is None else pattern
    if not isinstance(pattern, Pattern):
        raise InputError(f"pattern must be an attngen pattern, got {type(pattern).__name__}")
    if q.shape[-1] not in HEAD_DIMS:
        raise InputError(f"head_dim {q.shape[-1]} is not supported; supported: {HEAD_DIMS}")
    mods = scoremod.normalize(score_mod)
    inputs = {"document_ids": document_ids, "key_lengths": key_lengths, **inputs}
    return _call(pattern, q, k, v, scale, return_lse, inputs, mods, {"bias": bias, "rel_table": rel_table})


def selected_blocks(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, **inputs) -> torch.Tensor:
    """bool [B, Hq, nbq, nbk]: the key blocks each query block keeps under `pattern`'s `topk_blocks` leaf for these
    q, k and call-time inputs, computed as `attention` computes it (fp32 block scores on the GPU), before the rest
    of the pattern masks elements inside the kept blocks. `reference.attention(..., selected_blocks=)` takes it."""
    if not isinstance(pattern, Pattern) or topk_leaf(pattern) is None:
        raise InputError(f"selected_blocks needs a pattern with a topk_blocks leaf, got {pattern!r:.80}")
    _check(q, k, k)
    inputs = {"document_ids": None, "key_lengths": None, **inputs}
    return prepare(pattern, q, k, inputs).blocks.bool()


def selected_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: Pattern,
    *,
    scale=None,
    score_mod=None,
    bias: torch.Tensor | None = None,
    rel_table: torch.Tensor | None = None,
    **inputs,
) -> torch.Tensor:
    """int32 [B, H, Sq, n]: the keys each row keeps under `pattern`'s `topk` leaf for these q, k and call-time
    inputs, computed as `attention` computes them (fp32 scores), increasing, -1 after them; H is the query heads, or
    the KV heads where the indexer's one selection per token serves every head. The rest of the pattern still
    applies: `reference.attention(q, k, v, pattern.structure(), key_indices=lists)` attends as the call does. The
    exact scores are ranked at the call's `scale` (default 1/sqrt(D)) with its `score_mod` (and `bias`,
    `rel_table`): pass them as the call does."""
    if not isinstance(pattern, Pattern) or token_leaf(pattern) is None:
        raise InputError(f"selected_keys needs a pattern with a topk or threshold leaf, got {pattern!r:.80}")
    _check(q, k, k)
    scale = _scale(scale, q.shape[-1])
    q, mods, tensors = scoremod.fold(scoremod.normalize(score_mod), q, {"bias": bias, "rel_table": rel_table})
    mods = scoremod.bind(mods, q, k.shape[2], **tensors)
    inputs = {"document_ids": None, "key_lengths": None, **inputs}
    return prepare(pattern, q, k, inputs, scale, mods).key_lists


def compile(
    pattern: Pattern,
    *,
    head_dim: int,
    dtype: torch.dtype = torch.float16,
    arch: str | None = None,
    score_mod=None,
) -> Kernel:
    """Plan, render and compile `pattern`'s kernels (with `score_mod`'s modifications, as `attention` takes them);
    `arch` defaults to the current GPU's (give it without one)."""
    if not isinstance(pattern, Pattern):
        raise InputError(f"pattern must be an attngen pattern, got {type(pattern).__name__}")
    if type(head_dim) is not int or head_dim not in HEAD_DIMS:
        raise InputError(f"head_dim {head_dim!r} is not supported; supported: {HEAD_DIMS} (an int)")
    if arch is None:
        if not torch.cuda.is_available():
            raise InputError("no CUDA GPU here: pass arch= (e.g. 'sm_90') to compile without one")
        arch = device_arch(torch.cuda.current_device())
    mods = scoremod.normalize(score_mod)
    structures = scoremod.structures(mods)
    return Kernel(pattern, compiled(pattern.structure(), head_dim, normalize_dtype(dtype), arch, structures), mods)
