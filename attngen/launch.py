"""Stage 5: validate torch tensors, bind kernel arguments, launch on torch's current stream; autograd.

`Kernel` holds one plan's forward and backward kernels (compiled through the cache). `attention` is a
torch.library custom op (`attngen::attention`) with a fake implementation and registered autograd, so it
traces under torch.compile(fullgraph=True) and differentiates with respect to q, k, v (and the LSE output)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import schedule, tensormap
from .compile import Binary, compile_cached, device_arch, ensure_dynamic_shared, load_function
from .errors import InputError
from .pattern import Pattern, by_key
from .plan import (
    BACKWARD_ROW_PAD,
    HEAD_DIMS,
    PREPROCESS_ROWS,
    PREPROCESS_THREADS,
    KernelPlan,
    leaner,
    make_plan,
    normalize_dtype,
)
from .reference import document_ids_pair
from .render import KernelSource, render_backward, render_forward
from .schedule import explain

_u64, _i64, _i32, _f32 = np.uint64, np.int64, np.int32, np.float32
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PlanReport:
    """A plan together with its tile schedule for example lengths: what `Kernel.plan` prints."""

    plan: KernelPlan
    seq_lens: tuple[int, int]

    def __str__(self) -> str:
        t = self.plan.fwd
        return f"{self.plan}\n{explain(self.plan.pattern, t.block_m, t.block_n, *self.seq_lens)}"


class Kernel:
    """The compiled kernels of one pattern for one dtype, head dim and arch."""

    def __init__(self, plan: KernelPlan):
        self.kernel_plan = plan
        self.forward_kernel: KernelSource = render_forward(plan)
        self.forward_binary: Binary = compile_cached(self.forward_kernel)

    @property
    def plan(self) -> PlanReport:
        """The plan, with the tile schedule for example lengths 1024 x 1024 (see `explain`)."""
        return self.explain(1024, 1024)

    def explain(self, q_len: int, kv_len: int) -> PlanReport:
        """The plan with the tile schedule (full / partial / empty tiles, and why) for these lengths."""
        return PlanReport(self.kernel_plan, (q_len, kv_len))

    @property
    def source(self) -> str:
        return self.forward_kernel.code

    @property
    def resources(self):
        return self.forward_binary.resources

    @functools.cached_property
    def backward_kernel(self) -> KernelSource:
        return render_backward(self.kernel_plan)

    @property
    def backward_source(self) -> str:
        return self.backward_kernel.code

    @functools.cached_property
    def backward_binary(self) -> Binary:
        """Compiled on first use: inference never pays for the backward."""
        return compile_cached(self.backward_kernel)

    @property
    def backward_resources(self):
        return self.backward_binary.resources

    def __call__(self, q, k, v, *, scale=None, return_lse=False, document_ids=None, key_lengths=None):
        """Same as `attngen.attention(q, k, v, <this kernel's pattern>, ...)`."""
        plan = self.kernel_plan
        _check(q, k, v)
        if q.shape[-1] != plan.head_dim or _dtype_name(q.dtype) != plan.dtype:
            raise InputError(
                f"{self!r} was compiled for head_dim {plan.head_dim}, {plan.dtype}; got {q.shape[-1]}, {q.dtype}"
            )
        return _call(plan.pattern, q, k, v, scale, return_lse, document_ids, key_lengths)

    def __repr__(self) -> str:
        p = self.kernel_plan
        return f"Kernel({p.pattern!r}, {p.dtype}, head_dim={p.head_dim}, {p.arch})"


@functools.cache
def get_kernel(pattern: Pattern, head_dim: int, dtype: str, arch: str) -> Kernel:
    kern = Kernel(make_plan(pattern, head_dim=head_dim, dtype=dtype, arch=arch))
    # A mask with much per-element code can push the fastest tiling past 255 registers: step down until the
    # compiler's report shows no spills.
    while any(r.spill_stores or r.spill_loads for _, r in kern.resources) and (plan := leaner(kern.kernel_plan)):
        kern = Kernel(plan)
    return kern


@functools.cache
def _kernel_for(pattern_key: str, head_dim: int, dtype: str, device_index: int) -> Kernel:
    return get_kernel(by_key(pattern_key), head_dim, dtype, device_arch(device_index))


def _dtype_name(dtype: torch.dtype) -> str:
    return "fp16" if dtype == torch.float16 else "bf16"


# ---------------------------------------------------------------------------------------------- checks


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
    if q.device.type != "cuda":
        raise InputError(f"q, k, v are on {q.device}; attngen kernels run on CUDA tensors")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """16-byte aligned rows are what cp.async and TMA need; any such strides are used as they are, others copied
    (as are broadcast dimensions, stride 0, which a tensor map cannot describe)."""
    ok = t.data_ptr() % 16 == 0 and all(s % 8 == 0 and (s or n == 1) for s, n in zip(t.stride()[:-1], t.shape))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _runtime(pattern: Pattern, B: int, Sq: int, Sk: int, device, document_ids, key_lengths) -> dict:
    """Check and normalise the call-time tensors the pattern needs (int32 on the kernel's device)."""
    need, out = pattern.runtime_inputs, {}
    given = {"document_ids": document_ids, "key_lengths": key_lengths}
    for name, value in given.items():
        if name in need and value is None:
            raise InputError(f"pattern {pattern!r} needs {name}=")
        if name not in need and value is not None:
            raise InputError(f"{name}= was given but pattern {pattern!r} does not use it")
    if document_ids is not None:
        qd, kd = document_ids_pair(document_ids, Sq, Sk)
        for t in (qd, kd):
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.shape[0] not in (1, B):
                raise InputError(
                    f"document ids must be integer tensors [{B}, S] or [S], got {t.dtype} {tuple(t.shape)}"
                )
        out["document_ids"] = (qd.to(device, torch.int32).contiguous(), kd.to(device, torch.int32).contiguous())
    if key_lengths is not None:
        if key_lengths.dtype.is_floating_point or tuple(key_lengths.shape) != (B,):
            raise InputError(
                f"key_lengths must be an integer tensor of shape [{B}], "
                f"got {key_lengths.dtype} {tuple(key_lengths.shape)}"
            )
        out["key_lengths"] = key_lengths.to(device, torch.int32).contiguous()
    return out


# --------------------------------------------------------------------------------------------- binding


@functools.lru_cache(maxsize=16)
def _stream(ptr: int, device_index: int):
    import cupy

    return cupy.cuda.ExternalStream(ptr, device_index)


def _launch(binary: Binary, entry: str, grid, threads: int, smem: int, args: list, device: torch.device) -> None:
    fn = load_function(binary, entry, device.index)
    ensure_dynamic_shared(fn, smem)
    stream = _stream(torch.cuda.current_stream(device).cuda_stream, device.index)
    fn(grid, (threads,), args, shared_mem=smem, stream=stream)


def _strides(t: torch.Tensor) -> list:
    return [_i64(s) for s in t.stride()[:3]]


def _runtime_args(plan: KernelPlan, rt: dict, Hq: int, device) -> list:
    values = {}
    for n, leaf in enumerate(plan.layouts):
        lay = schedule.layout_on(leaf, device)
        if lay.shape[0] not in (1, Hq):
            raise InputError(f"a per-head block layout has {lay.shape[0]} heads; the query has {Hq}")
        values[f"layout{n}"] = _u64(lay.data_ptr())
        values[f"layout{n}_sh"] = _i64(lay.shape[1] * lay.shape[2] if lay.shape[0] > 1 else 0)
        values[f"layout{n}_nk"] = _i32(lay.shape[2])
    if "document_ids" in rt:
        qd, kd = rt["document_ids"]
        values.update(qdoc=_u64(qd.data_ptr()), qdoc_sb=_i64(qd.shape[1] if qd.shape[0] > 1 else 0))
        values.update(kdoc=_u64(kd.data_ptr()), kdoc_sb=_i64(kd.shape[1] if kd.shape[0] > 1 else 0))
    if "key_lengths" in rt:
        values["key_len"] = _u64(rt["key_lengths"].data_ptr())
    return [values[a.name] for a in plan.runtime_args]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _maps(boxes) -> list:
    """TMA tensor-map arguments for (tensor, box rows) pairs."""
    return [tensormap.tensor_map(tensormap.spec(t, rows)).arg for t, rows in boxes]


def _sched_args(s: schedule.Schedule) -> list:
    sb, sh = s.strides
    return [_u64(s.tiles.data_ptr()), _u64(s.counts.data_ptr()), _i64(sb), _i64(sh), _i32(s.cap)]


def forward(kern: Kernel, q, k, v, scale: float, rt: dict) -> tuple[torch.Tensor, torch.Tensor]:
    plan, t = kern.kernel_plan, kern.kernel_plan.fwd
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = q.new_empty(B, Hq, Sq, D)
    lse = q.new_empty(B, Hq, Sq, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if Sk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = map(_aligned, (q, k, v))
    sched = schedule.build(plan.pattern, t.block_m, t.block_n, Sq, Sk, q.device, rt)
    if t.wgmma:  # tensor maps: Q tiles of BLOCK_M rows, K/V of BLOCK_N, O stored 64 rows per warpgroup
        # Persistent blocks, one per SM, claim (query tile, head, batch) items from a counter past the first.
        grid = (min(math.ceil(Sq / t.block_m) * Hq * B, _sm_count(q.device.index)), 1, 1)
        next_item = torch.zeros(1, dtype=torch.int32, device=q.device)
        args = [*_maps(((q, t.block_m), (k, t.block_n), (v, t.block_n), (out, 64))), _u64(lse.data_ptr())]
        args += [_u64(next_item.data_ptr()), _i32(B)]
    else:
        args = [_u64(x.data_ptr()) for x in (q, k, v, out, lse)]
        args += _strides(q) + _strides(k) + _strides(v) + _strides(out)
        grid = (math.ceil(Sq / t.block_m), Hq, B)
    args += [_i32(Hq), _i32(Hq // Hkv), _i32(Sq), _i32(Sk), _f32(scale * LOG2E)]
    args += _sched_args(sched) + _runtime_args(plan, rt, Hq, q.device)
    _launch(kern.forward_binary, "attngen_fwd", grid, 32 * t.warps, t.smem_bytes, args, q.device)
    return out, lse


def backward(kern: Kernel, dout, q, k, v, out, lse, dlse, scale: float, rt: dict):
    plan = kern.kernel_plan
    B, Hq, Sq, _D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, q, k, v, out = map(_aligned, (dout, q, k, v, out))
    binary, dev, wgmma = kern.backward_binary, q.device, plan.bwd.wgmma
    # Row statistics: Δ, and for the sm_90a kernels the LSE in the log2 domain, rows padded to whole tiles.
    Sq_pad = -(-Sq // BACKWARD_ROW_PAD) * BACKWARD_ROW_PAD if wgmma else Sq
    delta = q.new_empty(B, Hq, Sq_pad, dtype=torch.float32)
    lse2 = torch.empty_like(delta) if wgmma else None
    pre = [_u64(x.data_ptr() if x is not None else 0) for x in (out, dout, lse, delta, lse2)]
    pre += _strides(out) + _strides(dout) + [_i32(Hq), _i32(Sq), _i32(Sq_pad)]
    grid = (math.ceil(Sq_pad / PREPROCESS_ROWS), Hq, B)
    _launch(binary, "attngen_bwd_preprocess", grid, PREPROCESS_THREADS, 0, pre, dev)
    if dlse is not None:  # d lse / d s = P, which folds into dS = P * (dP - (delta - dlse))
        delta[..., :Sq] -= dlse
    scalars = [_i32(Hq), _i32(Hq // Hkv), _i32(Sq), _i32(Sk)]
    scalars += [_i32(Sq_pad)] if wgmma else []
    scalars += [_f32(scale), _f32(scale * LOG2E)]
    extra = _runtime_args(plan, rt, Hq, dev)

    t = plan.bwd
    sched_t = schedule.build(plan.pattern, t.block_m, t.block_n, Sq, Sk, dev, rt, transpose=True)
    if wgmma:
        boxes = ((q, t.block_m), (k, t.block_n), (v, t.block_n), (dout, t.block_m), (dk, 64), (dv, 64))
        args = [*_maps(boxes), _u64(lse2.data_ptr()), _u64(delta.data_ptr())]
    else:
        args = [_u64(x.data_ptr()) for x in (q, k, v, dout, lse, delta, dk, dv)]
        args += [s for x in (q, k, v, dout, dk, dv) for s in _strides(x)]
    args += scalars + _sched_args(sched_t) + extra
    _launch(binary, "attngen_bwd_dkdv", (math.ceil(Sk / t.block_n), Hkv, B), 32 * t.warps, t.smem_bytes, args, dev)

    t = plan.dq
    sched_q = schedule.build(plan.pattern, t.block_m, t.block_n, Sq, Sk, dev, rt)
    if wgmma:
        boxes = ((q, t.block_m), (k, t.block_n), (v, t.block_n), (dout, t.block_m), (dq, 64))
        args = [*_maps(boxes), _u64(lse2.data_ptr()), _u64(delta.data_ptr())]
    else:
        args = [_u64(x.data_ptr()) for x in (q, k, v, dout, lse, delta, dq)]
        args += [s for x in (q, k, v, dout, dq) for s in _strides(x)]
    args += scalars + _sched_args(sched_q) + extra
    _launch(binary, "attngen_bwd_dq", (math.ceil(Sq / t.block_m), Hq, B), 32 * t.warps, t.smem_bytes, args, dev)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ custom op


def _unpack_rt(qdoc, kdoc, key_len) -> dict:
    rt = {}
    if qdoc is not None:
        rt["document_ids"] = (qdoc, kdoc)
    if key_len is not None:
        rt["key_lengths"] = key_len
    return rt


@torch.library.custom_op("attngen::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    scale: float,
    qdoc: torch.Tensor | None,
    kdoc: torch.Tensor | None,
    key_len: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _kernel_for(pattern, q.shape[-1], _dtype_name(q.dtype), q.device.index)
    with torch.cuda.device(q.device):
        return forward(kern, q, k, v, scale, _unpack_rt(qdoc, kdoc, key_len))


@attention_op.register_fake
def _(q, k, v, pattern, scale, qdoc, kdoc, key_len):
    B, Hq, Sq, D = q.shape
    return q.new_empty(B, Hq, Sq, D), q.new_empty(B, Hq, Sq, dtype=torch.float32)


@torch.library.custom_op("attngen::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern: str,
    scale: float,
    qdoc: torch.Tensor | None,
    kdoc: torch.Tensor | None,
    key_len: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _kernel_for(pattern, q.shape[-1], _dtype_name(q.dtype), q.device.index)
    with torch.cuda.device(q.device):
        return backward(kern, dout, q, k, v, out, lse, dlse, scale, _unpack_rt(qdoc, kdoc, key_len))


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, pattern, scale, qdoc, kdoc, key_len):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern, scale, qdoc, kdoc, key_len = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, qdoc, kdoc, key_len)
    ctx.pattern, ctx.scale = pattern, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, qdoc, kdoc, key_len = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, dlse, q, k, v, out, lse, ctx.pattern, ctx.scale, qdoc, kdoc, key_len)
    return dq, dk, dv, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- public


def _call(pattern: Pattern, q, k, v, scale, return_lse, document_ids, key_lengths):
    B, _Hq, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"scale must be a positive finite number, got {scale}")
    rt = _runtime(pattern, B, Sq, k.shape[2], q.device, document_ids, key_lengths)
    qdoc, kdoc = rt.get("document_ids", (None, None))
    out, lse = attention_op(q, k, v, pattern.key, scale, qdoc, kdoc, rt.get("key_lengths"))
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    document_ids=None,
    key_lengths: torch.Tensor | None = None,
):
    """softmax(scale · Q Kᵀ restricted to `pattern`) · V for q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D] -> [B,Hq,Sq,D].

    `scale` defaults to 1/sqrt(D). With `return_lse`, also the fp32 log-sum-exp [B,Hq,Sq] (-inf for rows with
    no allowed key, whose output is 0). `document_ids` ([B,S] / [S], or a (query, key) pair when Sq != Sk)
    and `key_lengths` ([B]) feed `documents()` and `key_padding()`. Differentiable in q, k, v."""
    _check(q, k, v)
    if not isinstance(pattern, Pattern):
        raise InputError(f"pattern must be an attngen pattern, got {type(pattern).__name__}")
    if q.shape[-1] not in HEAD_DIMS:
        raise InputError(f"head_dim {q.shape[-1]} is not supported; supported: {HEAD_DIMS}")
    return _call(pattern, q, k, v, scale, return_lse, document_ids, key_lengths)


def compile(
    pattern: Pattern,
    *,
    head_dim: int,
    dtype: torch.dtype = torch.float16,
    arch: str | None = None,
) -> Kernel:
    """Plan, render and compile `pattern`'s kernels; `arch` defaults to the current GPU's (give it without one)."""
    if arch is None:
        if not torch.cuda.is_available():
            raise InputError("no CUDA GPU here: pass arch= (e.g. 'sm_90') to compile without one")
        arch = device_arch(torch.cuda.current_device())
    return get_kernel(pattern, head_dim, normalize_dtype(dtype), arch)
