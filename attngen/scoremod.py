"""Score modifications: functions of each score s = scale · q·k, applied in the order given, before the pattern's
mask, the selection rules and the softmax (so N:M ranks the modified scores).

    ag.attention(q, k, v, ag.causal(), score_mod=ag.softcap(50.0))
    ag.attention(q, k, v, ag.causal(), score_mod=(ag.alibi(slopes), ag.softcap(30.0)))

- `softcap(c)`: s -> c · tanh(s / c) (Gemma 2, Grok). A constant of the kernel: one compile per value.
- `alibi(slopes, align="top_left")`: s -> s + slopes[h] · (k - q'), slopes fp32 [Hq] given with the call (a run-time
  argument: new slopes never mean a new kernel); q' is the query's position under the alignment (top-left: q,
  bottom-right: q + Sk - Sq, as for causal()).

A modification's *structure* (`structure()`) is what the kernels are compiled for: softcap's c, alibi's alignment;
`key()` names a tuple of them as a plain string, which the custom op carries (like `Pattern.key`). Kernels keep raw
scores (q·k, unscaled) and fold the scale into the exponential, so the C code works on raw scores: softcap with
c / scale, alibi with slopes[h] / scale. The backward multiplies dS by the modification's derivative at the
modified score: 1 - tanh² for softcap, 1 for alibi."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import InputError

ALIGNS = ("top_left", "bottom_right")


@dataclass(frozen=True)
class Softcap:
    cap: float

    def structure(self) -> Softcap:
        return self

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    def __repr__(self) -> str:
        return f"softcap({self.cap!r})"

    def reference(self, s: torch.Tensor, h: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(s / self.cap)


@dataclass(frozen=True)
class AlibiSlot:
    """ALiBi's structure: the slopes are a run-time argument."""

    align: str = "top_left"

    def structure(self) -> AlibiSlot:
        return self

    def __repr__(self) -> str:
        return "alibi()" if self.align == "top_left" else f"alibi(align={self.align!r})"


@dataclass(frozen=True, eq=False)
class Alibi:
    slopes: torch.Tensor
    align: str = "top_left"

    def structure(self) -> AlibiSlot:
        return AlibiSlot(self.align)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.slopes,)

    def __repr__(self) -> str:
        return repr(self.structure())

    def reference(self, s: torch.Tensor, h: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        Sq, Sk = qpos.shape[-2], kpos.shape[-1]
        shift = Sk - Sq if self.align == "bottom_right" else 0
        slopes = self.slopes.to(s.device, s.dtype)[h]  # [Hq, 1, 1]
        return s + slopes * (kpos - qpos - shift).to(s.dtype)


ScoreMod = Softcap | Alibi
Structure = tuple  # of Softcap | AlibiSlot


def softcap(cap: float) -> Softcap:
    """s -> cap · tanh(s / cap), for a positive finite cap."""
    if not isinstance(cap, numbers.Real) or isinstance(cap, bool) or not (math.isfinite(cap) and cap > 0):
        raise InputError(f"softcap takes a positive finite number, got {cap!r:.60}")
    return Softcap(float(cap))


def alibi(slopes: torch.Tensor, align: str = "top_left") -> Alibi:
    """s -> s + slopes[h] · (k - q'): `slopes` a float tensor [Hq], one per query head (q' as in causal(align))."""
    if not isinstance(slopes, torch.Tensor) or slopes.dim() != 1 or not slopes.is_floating_point():
        shape = tuple(slopes.shape) if isinstance(slopes, torch.Tensor) else type(slopes).__name__
        raise InputError(f"alibi takes a 1-d float tensor of slopes, one per query head, got {shape}")
    if align not in ALIGNS:
        raise InputError(f"alibi's align must be one of {ALIGNS}, got {align!r}")
    return Alibi(slopes, align)


def normalize(score_mod) -> tuple[ScoreMod, ...]:
    """None, one modification or a sequence of them -> a tuple, checked."""
    if score_mod is None:
        return ()
    mods = tuple(score_mod) if isinstance(score_mod, (tuple, list)) else (score_mod,)
    for m in mods:
        if not isinstance(m, (Softcap, Alibi)):
            raise InputError(
                f"score_mod takes ag.softcap(c), ag.alibi(slopes) or a tuple of them, got {type(m).__name__}"
            )
    if sum(isinstance(m, Softcap) for m in mods) > 1 or sum(isinstance(m, Alibi) for m in mods) > 1:
        raise InputError("score_mod: at most one softcap and one alibi")
    return mods


def structures(mods) -> Structure:
    """What kernels are compiled for: the structures of modifications (or of structures, unchanged)."""
    return tuple(m.structure() for m in mods)


_STRUCTURES: dict[str, Structure] = {"": ()}


def key(structure: Structure) -> str:
    """A plain-string name of a tuple of structures (the custom op's argument); `by_key` inverts it."""
    name = ", ".join(map(repr, structure))
    _STRUCTURES.setdefault(name, tuple(structure))
    return name


def by_key(name: str) -> Structure:
    return _STRUCTURES[name]


def check_call(mods: tuple[ScoreMod, ...], q: torch.Tensor) -> None:
    """Call-time checks of the modifications' tensors against q [B, Hq, Sq, D]."""
    for m in mods:
        if isinstance(m, Alibi):
            if m.slopes.shape[0] != q.shape[1]:
                raise InputError(f"alibi slopes: one per query head expected ({q.shape[1]}), got {m.slopes.shape[0]}")
            if m.slopes.device != q.device:
                raise InputError(f"alibi slopes are on {m.slopes.device}, q on {q.device}: put them on one device")


def kernel_tensors(mods: tuple[ScoreMod, ...]) -> list[torch.Tensor]:
    """The modifications' run-time tensors as the kernels read them (alibi slopes: contiguous fp32)."""
    return [t.detach().float().contiguous() for m in mods for t in m.tensors()]


def reference(mods, s: torch.Tensor) -> torch.Tensor:
    """The modifications applied to scores s [B, Hq, Sq, Sk] (any float dtype), differentiably."""
    if not mods:
        return s
    Hq, Sq, Sk = s.shape[1:]
    h = torch.arange(Hq, device=s.device).view(Hq, 1, 1)
    qpos = torch.arange(Sq, device=s.device).view(Sq, 1)
    kpos = torch.arange(Sk, device=s.device).view(1, Sk)
    for m in mods:
        s = m.reference(s, h, qpos, kpos)
    return s
