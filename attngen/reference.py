"""Plain-torch semantics of every pattern: the dense mask and the attention it defines. The test oracle.

`mask` returns a bool tensor broadcastable to [B, H, Sq, Sk]; `attention` computes softmax(scale·QKᵀ)·V over
the allowed keys in float64 (or a given dtype). Rows with no allowed key give output 0 and LSE -inf."""

from __future__ import annotations

import functools
import math
import operator

import sympy as sp
import torch

from . import pattern as P
from .errors import InputError

_REL = {sp.Lt: operator.lt, sp.Le: operator.le, sp.Gt: operator.gt, sp.Ge: operator.ge, sp.Eq: operator.eq}


def _affine(e: sp.Basic, env: dict) -> torch.Tensor | bool | int:
    """Evaluate a sympy affine predicate on integer tensors (q as a column, k as a row)."""
    if e is sp.true or e is sp.false:
        return bool(e)
    if isinstance(e, sp.Symbol):
        return env[e]
    if isinstance(e, sp.Integer):
        return int(e)
    if isinstance(e, sp.Rational):
        return float(e)
    if isinstance(e, sp.Add):
        return sum((_affine(a, env) for a in e.args[1:]), _affine(e.args[0], env))
    if isinstance(e, sp.Mul):
        out = _affine(e.args[0], env)
        for a in e.args[1:]:
            out = out * _affine(a, env)
        return out
    if isinstance(e, sp.Ne):
        return _affine(e.lhs, env) != _affine(e.rhs, env)
    for rel, op in _REL.items():
        if isinstance(e, rel):
            return op(_affine(e.lhs, env), _affine(e.rhs, env))
    if isinstance(e, sp.Not):
        return ~torch.as_tensor(_affine(e.args[0], env))
    if isinstance(e, (sp.And, sp.Or)):
        parts = [torch.as_tensor(_affine(a, env)) for a in e.args]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if isinstance(e, sp.And) else (out | p)
        return out
    raise InputError(f"cannot evaluate {e}")


def document_ids_pair(document_ids, Sq: int, Sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise `document_ids` (one [B, S] / [S] tensor when Sq == Sk, or a (query, key) pair) to [B', S]."""
    if isinstance(document_ids, (tuple, list)):
        qd, kd = document_ids
    else:
        if Sq != Sk:
            raise InputError("with Sq != Sk pass document_ids=(query_ids, key_ids)")
        qd = kd = document_ids
    qd, kd = (d if d.dim() == 2 else d.unsqueeze(0) for d in (qd, kd))
    if qd.shape[-1] != Sq or kd.shape[-1] != Sk:
        raise InputError(f"document ids must have lengths Sq={Sq} and Sk={Sk}, got {qd.shape[-1]} and {kd.shape[-1]}")
    return qd, kd


def mask(
    pat: P.Pattern,
    Sq: int,
    Sk: int,
    *,
    document_ids=None,
    key_lengths: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Dense bool mask [B' , H', Sq, Sk] (B', H' are 1 unless the pattern depends on batch or head)."""
    sub = functools.partial(mask, Sq=Sq, Sk=Sk, document_ids=document_ids, key_lengths=key_lengths, device=device)
    if isinstance(pat, (P.And, P.Or)):
        return functools.reduce(operator.and_ if isinstance(pat, P.And) else operator.or_, map(sub, pat.parts))
    if isinstance(pat, P.Not):
        return ~sub(pat.part)
    qi = torch.arange(Sq, device=device).view(Sq, 1)
    kj = torch.arange(Sk, device=device).view(1, Sk)
    if isinstance(pat, P.Affine):
        m = torch.as_tensor(_affine(pat.expr, {P.q: qi, P.k: kj, P.Sq: Sq, P.Sk: Sk}), device=device)
        return m.expand(Sq, Sk).view(1, 1, Sq, Sk)
    if isinstance(pat, P.BlockLayout):
        lay = pat.tensor().to(device).bool()
        nq, nk = math.ceil(Sq / pat.block_size), math.ceil(Sk / pat.block_size)
        if lay.shape[-2] < nq or lay.shape[-1] < nk:
            raise InputError(f"layout {tuple(lay.shape)} does not cover {nq}x{nk} blocks of {pat.block_size}")
        return lay[:, qi // pat.block_size, kj // pat.block_size].unsqueeze(0)
    if isinstance(pat, P.Documents):
        if document_ids is None:
            raise InputError("the pattern uses documents(): pass document_ids=")
        qd, kd = document_ids_pair(document_ids, Sq, Sk)
        return (qd.to(device)[:, :, None] == kd.to(device)[:, None, :]).unsqueeze(1)
    if isinstance(pat, P.KeyPadding):
        if key_lengths is None:
            raise InputError("the pattern uses key_padding(): pass key_lengths=")
        return (kj < key_lengths.to(device).view(-1, 1, 1)).view(-1, 1, 1, Sk)
    raise InputError(f"unknown pattern node {pat!r}")


def draw(pat: P.Pattern, Sq: int, Sk: int, *, cells: int = 64, **runtime) -> str:
    """Batch 0, head 0 of the mask as text, at most `cells` characters a side: █ all kept, ▒ some, · none."""
    kept = mask(pat, Sq, Sk, **runtime)[0, 0].float()
    kept = torch.nn.functional.adaptive_avg_pool2d(kept[None], (min(cells, Sq), min(cells, Sk)))[0]
    return "\n".join("".join("█" if f == 1 else "·" if f == 0 else "▒" for f in row) for row in kept.tolist())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pat: P.Pattern,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    **runtime,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (out, lse) for q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D]; differentiable; computed in `dtype`."""
    _B, Hq, Sq_, D = q.shape
    Hkv, Sk_ = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf, kf, vf = (t.to(dtype) for t in (q, k, v))
    kf, vf = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (kf, vf))
    s = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale
    allowed = mask(pat, Sq_, Sk_, device=q.device, **runtime)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))  # empty rows: exp(-inf) = 0
    return torch.einsum("bhqk,bhkd->bhqd", p, vf), lse
