"""Top-k by token scoring (`topk(k, scorer=...)`), shared by the reference (float64, `pattern.dense_mask`) and the
call-time selection (float32, `attngen.tokenselect`): the checked scorer inputs, the scores of a range of query rows,
and a choice as key-index lists.

Scores per (batch, query head, row): the exact q·k (the softmax scale is positive: it orders keys alike), or DSA's
(q P)·(k P) with P [D, r] or one per query head [Hq, D, r] (a key projected with its query head's P). The indexer's
per (batch, row), for every head: Σₕ w[b, i, h] · ReLU(q̃[b, i, h] · k̃[b, j]). Products are accumulated in `dtype`
from inputs converted to it."""

from __future__ import annotations

import math

import torch

from .errors import InputError


def check(scorer, inputs: dict, B: int, Hq: int, Sq: int, Sk: int, D: int) -> dict:
    """The scorer's call-time tensors after checking their types and shapes (the leaf's `_inputs`)."""
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name}= must be a floating-point tensor, got {got}")
        if t.is_meta:
            raise InputError(f"{name}= must hold data (a CPU or CUDA tensor), got a meta tensor")
    shape = {n: tuple(t.shape) for n, t in inputs.items()}
    if "proj" in inputs:
        p = shape["proj"]
        if not ((len(p) == 2 and p[0] == D) or (len(p) == 3 and p[:2] == (Hq, D))) or p[-1] < 1:
            raise InputError(f"proj= must be [D={D}, r] or [Hq={Hq}, D={D}, r], got {p}")
    if "index_q" in inputs:
        iq, ik, iw = shape["index_q"], shape["index_k"], shape["index_w"]
        if len(iq) != 4 or iq[:2] != (B, Sq) or iq[2] < 1 or iq[3] < 1:
            raise InputError(f"index_q= must be [B={B}, Sq={Sq}, Hi, Di], got {iq}")
        if ik != (B, Sk, iq[3]):
            raise InputError(f"index_k= must be [B={B}, Sk={Sk}, Di={iq[3]}] (index_q's Di), got {ik}")
        if iw != (B, Sq, iq[2]):
            raise InputError(f"index_w= must be [B={B}, Sq={Sq}, Hi={iq[2]}] (index_q's Hi), got {iw}")
    return inputs


def keys_of(scorer, k: torch.Tensor, inputs: dict, Hq: int, dtype: torch.dtype) -> torch.Tensor:
    """What every row's scores contract with, made once per call: k [B, Hkv, Sk, D] (exact) and index_k [B, Sk, Di]
    (indexer) as given (`product` converts them), k P per query head [B, Hq, Sk, r] (lowrank) in `dtype`."""
    if scorer is None:
        return k
    if type(scorer).__name__ == "LowRank":
        p = inputs["proj"].to(k.device, dtype)
        kq = k.to(dtype).repeat_interleave(Hq // k.shape[1], dim=1)  # [B, Hq, Sk, D]: each query head's keys
        return kq @ p if p.dim() == 2 else torch.einsum("bhkd,hdr->bhkr", kq, p)
    return inputs["index_k"].to(k.device)


def product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a [N, M, K] @ b [N, K, L] in `dtype`. fp32 from CUDA fp16 or bf16 inputs of one dtype: on tensor cores with
    fp32 accumulation and output (every product exact, as converting first would make it); otherwise converted."""
    if dtype == torch.float32 and a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.to(dtype), b.to(dtype))


def scores(scorer, q: torch.Tensor, keys: torch.Tensor, inputs: dict, rows: slice, cols: slice, dtype) -> torch.Tensor:
    """[B, Hq, R, C] (per query head) or [B, 1, R, C] (indexer) in `dtype`: the scores of query rows `rows` with keys
    `cols` (slices with steps of 1), with `keys` from `keys_of`."""
    B, Hq = q.shape[:2]
    if type(scorer).__name__ == "Indexer":
        iq = inputs["index_q"][:, rows].to(q.device)  # [B, R, Hi, Di]
        w = inputs["index_w"][:, rows].to(q.device, dtype)  # [B, R, Hi]
        R, Hi, Di = iq.shape[1:]
        kc = keys[:, cols]
        logits = product(iq.reshape(B, R * Hi, Di), kc.transpose(1, 2), dtype).relu_()  # [B, R Hi, C]
        return (w.view(B, R, 1, Hi) @ logits.view(B, R, Hi, -1)).view(B, 1, R, -1)
    sel = q[:, :, rows]
    R = sel.shape[2]
    if scorer is not None:  # lowrank: q P, then against each query head's projected keys
        p = inputs["proj"].to(q.device, dtype)
        qp = sel.to(dtype) @ p if p.dim() == 2 else torch.einsum("bhqd,hdr->bhqr", sel.to(dtype), p)
        return qp @ keys[:, :, cols].transpose(-1, -2)
    Hkv = keys.shape[1]
    a = sel.reshape(B * Hkv, (Hq // Hkv) * R, -1)  # a group's query heads share one GEMM
    s = product(a, keys[:, :, cols].reshape(B * Hkv, -1, a.shape[-1]).transpose(1, 2), dtype)
    return s.view(B, Hq, R, -1)


def lists_of(keep: torch.Tensor, k: int, first: int = 0) -> torch.Tensor:
    """int32 [..., min(k, C)]: the kept keys of each row of bool [..., C] (at most k; column c is key first + c),
    increasing, then -1."""
    C = keep.shape[-1]
    pos = torch.where(keep, torch.arange(C, device=keep.device), C)
    least = pos.topk(min(k, C), dim=-1, largest=False, sorted=True).values
    return torch.where(least < C, least + first, -1).to(torch.int32)


def above_threshold(scores: torch.Tensor, cand: torch.Tensor, t: float) -> torch.Tensor:
    """bool [..., C]: the candidates (`cand`, broadcasting) whose softmax probability over the row's candidates is
    at least t, or where none is, the row's maximum (the lowest column among equal maxima); rows without a
    candidate keep nothing. `scores` as the rule ranks them (the exact ones scaled)."""
    return kept_by_threshold(scores.masked_fill(~cand, float("-inf")), t)


def kept_by_threshold(s: torch.Tensor, t: float) -> torch.Tensor:
    """`above_threshold` of scores whose non-candidates are -inf already: s >= LSE + ln t (p >= t), or the first
    maximum of a row where nothing passes."""
    kept = (s >= torch.logsumexp(s, -1, keepdim=True) + math.log(t)) & (s > float("-inf"))
    none = ~kept.any(-1, keepdim=True) & (s > float("-inf")).any(-1, keepdim=True)
    first = torch.zeros_like(kept).scatter_(-1, s.argmax(-1, keepdim=True), True)  # argmax: the first maximum
    return kept | (none & first)
