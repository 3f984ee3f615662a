"""Plain-torch semantics of every pattern and the attention it defines: the test oracle.

`mask` is the dense mask of the positions a pattern allows (`pattern.dense_mask`), broadcastable to
[B, H, Sq, Sk]; `attention` computes, in float64 (or a given dtype), the scores s = scale·QKᵀ, the positions the
pattern allows, then the keys its selection rule keeps among them (`attngen.select`), then the softmax over the
kept keys and ·V. Rows with no kept key give output 0 and LSE -inf."""

from __future__ import annotations

import math

import torch

from . import pattern as P
from . import scoremod
from .select import split_selection

mask = P.dense_mask
draw = P.Pattern.draw


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pat: P.Pattern,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    score_mod=None,
    bias: torch.Tensor | None = None,
    rel_table: torch.Tensor | None = None,
    **runtime,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (out, lse) for q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D]; differentiable (in bias and rel_table too);
    computed in `dtype`. `score_mod` (with `bias`, `rel_table`) as `attngen.attention` takes it, applied to the
    scores before the pattern and any selection rule."""
    _B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf, kf, vf = (t.to(dtype) for t in (q, k, v))
    kf, vf = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (kf, vf))
    mods = scoremod.bind(scoremod.normalize(score_mod), q, Sk, bias=bias, rel_table=rel_table)
    s = scoremod.reference(mods, torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale)
    positions, rule = split_selection(pat)
    # lsh hashes q and k; top-k by token ranks the exact scores at this scale, modified
    allowed = mask(
        positions, Sq, Sk, device=q.device, **{"q": q, "k": k, "scale": scale, "score_mods": mods, **runtime}
    )
    if rule is not None:
        # The rule chooses among the allowed keys; it sees the scores but the choice carries no gradient.
        allowed = allowed & rule.reference_keep(s.detach(), allowed, q=q, k=k, **runtime)
    # A score a modification set to -inf (a bias) weighs nothing: masked, so that a row of them has a zero gradient.
    allowed = allowed & (s.detach() > float("-inf"))
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))  # empty rows: exp(-inf) = 0
    return torch.einsum("bhqk,bhkd->bhqd", p, vf), lse
