"""The torch.library custom ops `attngen::attention` and `attngen::attention_backward`, with fake implementations
and registered autograd, so attention traces under torch.compile(fullgraph=True) and differentiates with respect
to q, k, v and the LSE output. A pattern reaches the ops as the name of its structure (a plain string, which Dynamo
passes through without tracing into the pattern) and its run-time tensors as one list in ABI order."""

from __future__ import annotations

import torch

from .bind import backward, forward
from .compile import device_arch
from .kernel import Compiled, compiled
from .pattern import Pattern
from .prepare import Prepared

# Structure <-> name. Structures carry no tensor data (layouts are slots), so this grows with the number of
# distinct pattern shapes a program uses, never with the data it feeds them.
_NAMES: dict[Pattern, str] = {}
_STRUCTURES: dict[str, Pattern] = {}


def structure_name(structure: Pattern) -> str:
    """A short string naming `structure` in the custom ops' arguments."""
    name = _NAMES.get(structure)
    if name is None:
        name = _NAMES.setdefault(structure, f"s{len(_NAMES)}")
        _STRUCTURES[name] = structure
    return name


def _compiled_for(name: str, q: torch.Tensor) -> Compiled:
    dtype = "fp16" if q.dtype == torch.float16 else "bf16"
    return compiled(_STRUCTURES[name], q.shape[-1], dtype, device_arch(q.device.index))


@torch.library.custom_op("attngen::attention", mutates_args=())
def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, structure: str, scale: float, tensors: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _compiled_for(structure, q)
    with torch.cuda.device(q.device):
        return forward(kern, q, k, v, scale, Prepared.from_tensors(kern.plan, tensors))


@attention_op.register_fake
def _(q, k, v, structure, scale, tensors):
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
    scale: float,
    tensors: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _compiled_for(structure, q)
    with torch.cuda.device(q.device):
        return backward(kern, dout, q, k, v, out, lse, dlse, scale, Prepared.from_tensors(kern.plan, tensors))


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, structure, scale, tensors):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, structure, scale, tensors = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.structure, ctx.scale = structure, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, dlse, q, k, v, out, lse, ctx.structure, ctx.scale, tensors)
    return dq, dk, dv, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)
