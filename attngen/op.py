"""Attention as an autograd function in two forms: the torch.library custom ops `attngen::attention` and
`attngen::attention_backward` (fake implementations, registered autograd), which torch.compile(fullgraph=True)
traces, and for eager calls a plain `torch.autograd.Function` over the same forward and backward, which skips the
dispatcher's per-call work. Both differentiate with respect to q, k, v, the LSE output, and a score modification's
bias or T5 table. A pattern reaches them as the name of its structure (`Pattern.key`, a plain string that Dynamo
passes through without tracing into the pattern) and its run-time tensors as one list in ABI order
(`prepare.Prepared`)."""

from __future__ import annotations

import contextlib
import functools

import torch

from . import scoremod
from .bind import backward, forward
from .device import gather_rows
from .kernel import Compiled, compiled
from .nvrtc import device_arch
from .pattern import by_key
from .prepare import Prepared


def _device_of(q: torch.Tensor):
    """Launch on q's device (the caller's current device may be another one)."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _compiled_for(name: str, q: torch.Tensor, mods: str = "") -> Compiled:
    dtype = "fp16" if q.dtype == torch.float16 else "bf16"
    return _compiled_by_name(name, q.shape[-1], dtype, _arch(q.device.index), mods)


@functools.cache
def _compiled_by_name(name: str, head_dim: int, dtype: str, arch: str, mods: str) -> Compiled:
    """`kernel.compiled` looked up by the structures' names: a call hashes short strings, not pattern trees."""
    return compiled(by_key(name), head_dim, dtype, arch, scoremod.by_key(mods))


@functools.cache
def _arch(device_index: int | None) -> str:
    return device_arch(device_index)


@torch.library.custom_op("attngen::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: str,
    mods: str,
    scale: float,
    tensors: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _compiled_for(structure, q, mods)
    with _device_of(q):
        return forward(kern, q, k, v, scale, Prepared.from_tensors(kern.plan, tensors))


@attention_op.register_fake
def _(q, k, v, structure, mods, scale, tensors):
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
    structure: str,
    mods: str,
    scale: float,
    tensors: list[torch.Tensor],
    score_grad: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _compiled_for(structure, q, mods)
    ds = _score_grad_buffer(q, k, score_grad)
    with _device_of(q):
        prep = Prepared.from_tensors(kern.plan, tensors)
        dq, dk, dv = backward(kern, dout, q, k, v, out, lse, dlse, scale, prep, ds if score_grad else None)
    return dq, dk, dv, ds


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, structure, mods, scale, tensors, score_grad):
    grads = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    return *grads, _score_grad_buffer(q, k, score_grad)


def _score_grad_buffer(q: torch.Tensor, k: torch.Tensor, kind: str) -> torch.Tensor:
    """Zeros for dL/ds at a bias's or a T5 table's step, [B, Hq, Sq, Sk] in q's dtype (`kind` "input") or fp32
    ("float32"); empty where not wanted (""). A plain string: the fake implementation needs no registry."""
    shape = (*q.shape[:3], k.shape[2]) if kind else (0,)
    return q.new_zeros(shape, dtype=q.dtype if kind == "input" else torch.float32)


def _score_grad_kind(mods: str, tensors) -> str:
    """How dL/ds is written where a bias or a T5 table among the modifications' tensors (the last of `tensors`)
    needs a gradient (scoremod.score_grad_kind), else ""."""
    structure = scoremod.by_key(mods)
    n = len(scoremod.with_tensors(structure))
    wanted = any(t.requires_grad for t in tensors[len(tensors) - n :])
    return scoremod.score_grad_kind(structure) if wanted else ""


def _grads_of_tensors(mods: str, tensors, ds: torch.Tensor) -> list:
    """The gradients of `tensors`: None but for a bias or a T5 table (from dL/ds at their step)."""
    structure = scoremod.by_key(mods)
    n = len(scoremod.with_tensors(structure))
    rest = [None] * (len(tensors) - n)
    if ds.numel() == 0:
        return rest + [None] * n
    return rest + scoremod.tensor_grads(structure, tensors[len(tensors) - n :], ds)


def _setup_context(ctx, inputs, output):
    q, k, v, structure, mods, scale, tensors = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.structure, ctx.mods, ctx.scale = structure, mods, scale
    ctx.score_grad = _score_grad_kind(mods, tensors)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    dq, dk, dv, ds = attention_backward_op(
        dout, dlse, q, k, v, out, lse, ctx.structure, ctx.mods, ctx.scale, tensors, ctx.score_grad
    )
    # Layouts, ids, a rule's tensors and alibi slopes get no gradient; a bias and a T5 table get theirs from dL/ds.
    return dq, dk, dv, None, None, None, _grads_of_tensors(ctx.mods, tensors, ds)


attention_op.register_autograd(_backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """The eager form: the same kernels and saved tensors as the custom op, without the dispatcher."""

    @staticmethod
    def forward(ctx, q, k, v, structure, mods, scale, *tensors):
        kern = _compiled_for(structure, q, mods)
        with _device_of(q):
            out, lse = forward(kern, q, k, v, scale, Prepared.from_tensors(kern.plan, list(tensors)))
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        ctx.structure, ctx.mods, ctx.scale = structure, mods, scale
        ctx.score_grad = _score_grad_kind(mods, tensors)
        ctx.set_materialize_grads(False)  # an unused LSE (or output) needs no zero-filled gradient
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        if dout is None:  # only the LSE was used
            dout = torch.zeros_like(out)
        kern = _compiled_for(ctx.structure, q, ctx.mods)
        ds = _score_grad_buffer(q, k, ctx.score_grad)
        with _device_of(q):
            prep = Prepared.from_tensors(kern.plan, tensors)
            dq, dk, dv = backward(kern, dout, q, k, v, out, lse, dlse, ctx.scale, prep, ds if ctx.score_grad else None)
        return dq, dk, dv, None, None, None, *_grads_of_tensors(ctx.mods, tensors, ds)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: str,
    scale: float,
    tensors: list[torch.Tensor],
    mods: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): the custom op while torch.compile traces, the autograd function otherwise. `structure` names the
    pattern's structure (`Pattern.key`), `mods` the score modifications' (`scoremod.key`)."""
    if torch.compiler.is_compiling():
        return attention_op(q, k, v, structure, mods, scale, tensors)
    return _Attention.apply(q, k, v, structure, mods, scale, *tensors)


# ------------------------------------------------------------------------------------------- reordered calls


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, H, S] or [B, H, S, D] with its rows (flattened over B, H, S) gathered by `rows`."""
    if rows.numel() == 0:  # no rows: nothing to move (and no width to infer)
        return x.clone()
    flat = x.reshape(rows.shape[0], -1)
    if flat.is_cuda and (flat.shape[1] * flat.element_size()) % 16 == 0 and not torch.compiler.is_compiling():
        with _device_of(flat):
            return gather_rows(flat.contiguous(), rows).view(x.shape)
    return flat.index_select(0, rows).view(x.shape)


class _Gather(torch.autograd.Function):
    """y = x with its rows gathered by a permutation; its gradient is gathered by the inverse permutation (a gather,
    so nothing is accumulated: deterministic)."""

    @staticmethod
    def forward(ctx, x, rows, back):
        ctx.save_for_backward(back)
        ctx.set_materialize_grads(False)  # an unused output (the LSE, usually) needs no zero-filled gradient
        return _take(x, rows)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        return (None if grad is None else _take(grad, back)), None, None


def to_sorted(x: torch.Tensor, rows: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """x [B, H, S(, D)] in the sorted order of a reordered call (`reorder.Permutation`), differentiably."""
    return _Gather.apply(x, rows, back)


def to_original(x: torch.Tensor, rows: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """x [B, H, S(, D)] back in the original order, differentiably."""
    return _Gather.apply(x, back, rows)
