"""N:M on the scores (DFSS): in every group of M consecutive keys, keep the N with the largest scores.

Semantics (`reference_keep` implements exactly this; the kernels' hook is `templates/select/nm.cuh.j2`):
- s(i, j) = scale · qᵢ·kⱼ in fp32;
- keys are grouped by ⌊j / M⌋ of their absolute index (groups aligned at 0; the last one may be cut at Sk);
- in each group, among the keys the rest of the pattern allows for row i, the N with the largest signed s are kept,
  ties going to the lower key index; forbidden keys are never kept, and a group with fewer than N allowed keys
  keeps all of them;
- the softmax runs over the kept keys; a row with none gives 0 (LSE -inf). Gradients flow through the kept
  entries with the choice held fixed.

Every group of 4 aligned keys then holds at most 2 kept ones (2:4, and 1:2 twice), so the forward kernels run
P·V on sparse tensor cores (`Selection.sparse_pv`): `mma.sp` m16n8k32 in the mma.sync family, `wgmma.sp` with P
from registers on Hopper. The backward kernels recompute the raw scores with the same operands in the same order
and call the same hook, so they make the forward's choice without storing it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..pattern import Selector
from ..tracing import built_when_traced
from . import Selection

SUPPORTED_NM = ((2, 4), (1, 2))


@dataclass(frozen=True, repr=False)
class NM(Selector):
    """Keep the `n` largest scores of every `m` consecutive keys (see the module's docstring)."""

    n: int
    m: int

    def __repr__(self) -> str:
        return f"nm({self.n}, {self.m})"

    def selection(self) -> Selection:
        return Selection(rule="nm", params=(("n", self.n), ("m", self.m)), template="select/nm.cuh.j2", sparse_pv=True)

    def reference_keep(self, scores: torch.Tensor, allowed: torch.Tensor, **runtime) -> torch.Tensor:
        return nm_keep(scores, allowed, self.n, self.m)


@built_when_traced
def nm(n: int, m: int) -> NM:
    """Keep the n largest scores (signed; ties to the lower key index) of every m consecutive keys among the keys
    the rest of the pattern allows: `causal() & nm(2, 4)`. Supported: (2, 4) and (1, 2)."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"nm({n!r}, {m!r}): {name} must be an integer; supported (n, m): 2:4 and 1:2")
    if (n, m) not in SUPPORTED_NM:
        raise InputError(
            f"nm({n}, {m}) is not supported: the kernels run P·V on sparse tensor cores, which take 2:4 and 1:2 "
            "(nm(2, 4), nm(1, 2))"
        )
    return NM(n, m)


def nm_keep(scores: torch.Tensor, allowed: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool [..., Sq, Sk]: in each group of m keys (by ⌊j / m⌋), the allowed keys that fewer than n allowed keys of
    the group beat, where key j' beats key j when s(j') > s(j), or s(j') == s(j) and j' < j."""
    Sk = scores.shape[-1]
    allowed = allowed.expand(scores.shape)
    pad = -Sk % m  # the last group, cut at Sk, is padded with keys that are not allowed
    s = F.pad(scores, (0, pad)).unflatten(-1, (-1, m))  # [..., groups, m]
    ok = F.pad(allowed, (0, pad), value=False).unflatten(-1, (-1, m))
    other, this = s.unsqueeze(-1), s.unsqueeze(-2)  # [..., groups, m (other j'), m (this j)]
    idx = torch.arange(m, device=scores.device)
    lower = idx.view(m, 1) < idx.view(1, m)  # j' < j
    beats = ok.unsqueeze(-1) & ((other > this) | ((other == this) & lower))
    keep = ok & (beats.sum(dim=-2) < n)
    return keep.flatten(-2)[..., :Sk]
