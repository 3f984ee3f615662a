"""Score modifications: functions of each score s = scale · q·k, applied in the order given, before the pattern's
mask, the selection rules and the softmax (so N:M ranks the modified scores).

    ag.attention(q, k, v, ag.causal(), score_mod=ag.softcap(50.0))
    ag.attention(q, k, v, ag.causal(), score_mod=(ag.alibi(slopes), ag.softcap(30.0)))

- `softcap(c)`: s -> c · tanh(s / c) (Gemma 2, Grok). A constant of the kernel: one compile per value.
- `alibi(slopes, align="top_left")`: s -> s + slopes[h] · (k - q'), slopes fp32 [Hq] given with the call (a run-time
  argument: new slopes never mean a new kernel); q' is the query's position under the alignment (top-left: q,
  bottom-right: q + Sk - Sq, as for causal()).
- `bias()`: s -> s + bias[b, h, q, k], the call's `bias=` tensor, broadcastable to [B, Hq, Sq, Sk] (broadcast batch,
  head and query dims are read with stride 0, never copied), read in q's dtype or fp32. The kernels read two
  adjacent keys at once: a bias whose keys are not contiguous at an even pitch (an odd Sk, keys broadcast, a
  transposed view) is copied once per call into that layout. Differentiable.
- `rel_bias(num_buckets, max_distance, bidirectional=True)`: s -> s + rel_table[h, bucket(k - q)], T5's relative
  position buckets, the call's `rel_table=` [Hq, num_buckets]. Differentiable.
- `head_scale(scales)`: s -> scales[h] · s, a float tensor [Hq] (per-head temperatures). It needs no kernel of its
  own: `fold` moves it into q (scales[h] · scale · q·k) and into the additive terms before it (alibi's slopes, the
  bias, the T5 table, each times scales[h]), where torch's autograd carries its gradient. Not after a softcap.

A modification's *structure* (`structure()`) is what the kernels are compiled for: softcap's c, alibi's alignment,
the bias's dtype, rel_bias's buckets; `key()` names a tuple of them as a plain string, which the custom op carries
(like `Pattern.key`). `bias()` and `rel_bias()` are their own structures; `bind` attaches the call's tensors. Kernels
keep raw scores (q·k, unscaled) and fold the scale into the exponential, so the C code works on raw scores: softcap
with c / scale, the additive terms divided by the scale. The backward multiplies dS by the modifications'
derivative at the modified score: 1 - tanh² for softcap, 1 for the additive ones. Where `bias` or `rel_table` needs a
gradient, the dK/dV kernel also writes dL/ds at their step (once per pair: deterministic) into a [B, Hq, Sq, Sk]
buffer (the bias's dtype, or fp32 with a T5 table); torch sums it to the bias's shape and, over T5's buckets, to the
table's."""

from __future__ import annotations

import ast
import functools
import math
import numbers
from dataclasses import dataclass

import torch

from .errors import InputError

ALIGNS = ("top_left", "bottom_right")


@dataclass(frozen=True)
class Window:
    """Where scores handed to `reference` sit in the whole [B, Hq, Sq, Sk]: query rows `rows`, keys `cols` (slices
    of step 1 with explicit bounds; a bias is read there). The rows' positions start at `q0` (rows of a longer
    sequence, which a bias does not cover: context parallelism)."""

    Sq: int
    Sk: int
    rows: slice
    cols: slice
    q0: int = 0


@dataclass(frozen=True)
class Softcap:
    cap: float

    def structure(self) -> Softcap:
        return self

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    def __repr__(self) -> str:
        return f"softcap({self.cap!r})"

    def reference(self, s: torch.Tensor, h: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, at: Window):
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

    def reference(self, s: torch.Tensor, h: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, at: Window):
        shift = at.Sk - at.Sq if self.align == "bottom_right" else 0
        slopes = self.slopes.to(s.device, s.dtype)[h]  # [Hq, 1, 1]
        return s + slopes * (kpos - qpos - shift).to(s.dtype)


@dataclass(frozen=True)
class Bias:
    """`bias()`: adds the call's `bias=` tensor; the structure, with the dtype the kernels read it in ("input":
    q's dtype, or "float32")."""

    dtype: str = "input"

    def structure(self) -> Bias:
        return self

    def __repr__(self) -> str:
        return "bias()" if self.dtype == "input" else f"bias(dtype={self.dtype!r})"


@dataclass(frozen=True, eq=False)
class BoundBias:
    """`bias()` with its call's tensor, as the kernels read it: [B, Hq, Sq, Sk], broadcast dims of stride 0."""

    tensor: torch.Tensor
    dtype: str

    def structure(self) -> Bias:
        return Bias(self.dtype)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.tensor,)

    def __repr__(self) -> str:
        return repr(self.structure())

    def reference(self, s: torch.Tensor, h: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, at: Window):
        return s + self.tensor[..., at.rows, at.cols].to(s.device, s.dtype)


@dataclass(frozen=True)
class RelBias:
    """`rel_bias(num_buckets, max_distance, bidirectional)`: T5's relative-position buckets (a structure: the
    kernels are compiled for the buckets; the table is call-time data)."""

    num_buckets: int
    max_distance: int
    bidirectional: bool = True

    def structure(self) -> RelBias:
        return self

    def __repr__(self) -> str:
        tail = "" if self.bidirectional else ", bidirectional=False"
        return f"rel_bias({self.num_buckets}, {self.max_distance}{tail})"

    @property
    def per_direction(self) -> int:
        """Buckets of one direction: half of them when bidirectional."""
        return self.num_buckets // 2 if self.bidirectional else self.num_buckets

    @property
    def exact(self) -> int:
        """Distances below this have a bucket each; the rest share log-spaced buckets up to max_distance."""
        return self.per_direction // 2

    def distance_bucket(self, n: torch.Tensor) -> torch.Tensor:
        """The bucket of distances n >= 0 within one direction, with T5's float32 arithmetic (int64)."""
        exact, top = self.exact, self.per_direction
        ratio = torch.log(n.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
        return torch.where(n < exact, n, (exact + (ratio * (top - exact)).long()).clamp(max=top - 1))

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        """The bucket of each relative position rel = k - q (int64); unidirectional: later keys share bucket 0."""
        if self.bidirectional:
            return (rel > 0).long() * self.per_direction + self.distance_bucket(rel.abs())
        return self.distance_bucket((-rel).clamp(min=0))

    def thresholds(self) -> tuple[int, ...]:
        """The first distance of each bucket past the exact ones: a distance n >= exact has bucket exact + the
        number of thresholds <= n (the kernels' form of `distance_bucket`, equal to it by construction)."""
        top = self.per_direction - 1
        b = self.distance_bucket(torch.arange(self.max_distance + 1))
        if (b.diff() < 0).any() or b[-1] != top:  # T5's never are
            raise AssertionError(f"{self!r}: buckets not increasing in the distance up to max_distance")
        return tuple(int(torch.nonzero(b >= j)[0]) for j in range(self.exact + 1, top + 1))


@dataclass(frozen=True, eq=False)
class BoundRelBias:
    """`rel_bias(...)` with its call's table, fp32 [Hq, num_buckets]."""

    spec: RelBias
    table: torch.Tensor

    def structure(self) -> RelBias:
        return self.spec

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.table,)

    def __repr__(self) -> str:
        return repr(self.spec)

    def reference(self, s: torch.Tensor, h: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, at: Window):
        buckets = self.spec.bucket(kpos - qpos)  # [Sq, Sk]
        return s + self.table.to(s.device, s.dtype)[:, buckets]  # [Hq, Sq, Sk]


@dataclass(frozen=True, eq=False)
class HeadScale:
    """`head_scale(scales)`: s -> scales[h] · s. Folded away before the kernels (`fold`); the reference applies it."""

    scales: torch.Tensor

    def structure(self) -> HeadScale:
        return self

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    def __repr__(self) -> str:
        return "head_scale()"

    def reference(self, s: torch.Tensor, h: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, at: Window):
        return s * self.scales.to(s.device, s.dtype)[h]


ScoreMod = Softcap | Alibi | Bias | RelBias | BoundBias | BoundRelBias | HeadScale
Structure = tuple  # of Softcap | AlibiSlot | Bias | RelBias
ADDITIVE = (Bias, RelBias)  # structures whose tensors take a gradient (through dL/ds at their step)


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


def bias() -> Bias:
    """s -> s + bias[b, h, q, k], the call's `bias=` tensor (broadcastable to [B, Hq, Sq, Sk]; differentiable)."""
    return Bias()


def rel_bias(num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True) -> RelBias:
    """s -> s + rel_table[h, bucket(k - q)]: T5's relative-position buckets, `bidirectional` for an encoder (later
    keys get their own buckets) or not (a decoder: every later key shares bucket 0). The call's `rel_table=` is a
    float tensor [Hq, num_buckets] (differentiable)."""
    for name, value in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if type(value) is not int:
            raise InputError(f"rel_bias: {name} must be an int, got {value!r:.60}")
    if not isinstance(bidirectional, bool):
        raise InputError(f"rel_bias: bidirectional must be a bool, got {bidirectional!r:.60}")
    least = 4 if bidirectional else 2
    if not least <= num_buckets <= 1024 or (bidirectional and num_buckets % 2):
        raise InputError(
            f"rel_bias: num_buckets must be {'an even number ' if bidirectional else ''}in [{least}, 1024], "
            f"got {num_buckets}"
        )
    spec = RelBias(num_buckets, max_distance, bidirectional)
    if not spec.exact < max_distance <= 1 << 20:
        raise InputError(
            f"rel_bias: max_distance must be in ({spec.exact}, 2**20] for {num_buckets} buckets, got {max_distance}"
        )
    return spec


def head_scale(scales: torch.Tensor) -> HeadScale:
    """s -> scales[h] · s: `scales` a float tensor [Hq], one per query head (differentiable)."""
    if not isinstance(scales, torch.Tensor) or scales.dim() != 1 or not scales.is_floating_point():
        shape = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise InputError(f"head_scale takes a 1-d float tensor of scales, one per query head, got {shape}")
    return HeadScale(scales)


def fold(mods: tuple, q: torch.Tensor, tensors: dict) -> tuple[torch.Tensor, tuple, dict]:
    """`mods` (normalized) without head scales, for q [B, Hq, Sq, D] and the call's `bias=`/`rel_table=`: a head scale
    multiplies q's head h (so every score), and the additive terms before it (alibi's slopes, the bias, the T5 table),
    by scales[h]. The same scores, differentiably (in q, the scales, the bias and the table); kernels never see it."""
    if not any(isinstance(m, HeadScale) for m in mods):
        return q, mods, tensors
    Hq = q.shape[1]
    kept, tensors, factor = [], dict(tensors), None
    for m in mods:
        if not isinstance(m, HeadScale):
            kept.append(m)
            continue
        c = _checked_scales(m, q).float()
        if any(isinstance(p, Softcap) for p in kept):
            raise InputError("score_mod: head_scale after a softcap is not supported; put it before the softcap")
        for i, p in enumerate(kept):  # tensors `bind` would refuse are left as they are, for it to name
            if isinstance(p, Alibi) and p.slopes.device == q.device and p.slopes.shape == c.shape:
                if c.requires_grad:
                    raise InputError("score_mod: a head_scale after alibi takes no gradient (alibi's slopes take none)")
                kept[i] = Alibi(p.slopes.float() * c, p.align)
            elif isinstance(p, (Bias, RelBias)):
                name = "bias" if isinstance(p, Bias) else "rel_table"
                t = tensors.get(name)
                if _per_head(name, t, q):
                    per_head = c.view(Hq, 1, 1) if name == "bias" else c.view(Hq, 1)  # a bias's batch dim stays
                    tensors[name] = (t.to(_wide(t)) * per_head).to(t.dtype)
        factor = c if factor is None else factor * c
    return (q.to(_wide(q)) * factor.view(1, Hq, 1, 1)).to(q.dtype), tuple(kept), tensors


def _wide(t: torch.Tensor) -> torch.dtype:
    """fp32, or t's dtype where wider (a float64 reference's)."""
    return torch.promote_types(t.dtype, torch.float32)


def _per_head(name: str, t, q: torch.Tensor) -> bool:
    """Whether the call's `bias=` or `rel_table=` `t` is one `bind` takes, so that scaling its heads keeps it so: a
    float tensor on q's device, a bias of at most 4 dims with Hq or 1 heads, a table [Hq, n]."""
    Hq = q.shape[1]
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device != q.device:
        return False
    if name == "rel_table":
        return t.dim() == 2 and t.shape[0] == Hq
    return t.dim() <= 4 and (t.dim() < 3 or t.shape[-3] in (1, Hq))


def _checked_scales(m: HeadScale, q: torch.Tensor) -> torch.Tensor:
    Hq = q.shape[1]
    if tuple(m.scales.shape) != (Hq,) or m.scales.device != q.device:
        raise InputError(
            f"head_scale: one scale per query head on q's device expected ([{Hq}] on {q.device}), got "
            f"{list(m.scales.shape)} on {m.scales.device}"
        )
    return m.scales


_KINDS = (Softcap, Alibi, Bias, RelBias, HeadScale)


def normalize(score_mod) -> tuple[ScoreMod, ...]:
    """None, one modification or a sequence of them -> a tuple, checked."""
    if score_mod is None:
        return ()
    mods = tuple(score_mod) if isinstance(score_mod, (tuple, list)) else (score_mod,)
    for m in mods:
        if not isinstance(m, (*_KINDS, BoundBias, BoundRelBias)):
            raise InputError(
                "score_mod takes ag.softcap(c), ag.alibi(slopes), ag.bias(), ag.rel_bias(...), ag.head_scale(scales) "
                f"or a tuple of them, got {type(m).__name__}"
            )
    for kind in _KINDS[:-1]:  # head scales (the last) multiply: any number of them
        if sum(isinstance(m, kind) or isinstance(m.structure(), kind) for m in mods) > 1:
            raise InputError(f"score_mod: at most one {kind.__name__.lower()} (got {mods!r:.100})")
    kinds = [type(m.structure()) for m in mods]
    if Bias in kinds and RelBias in kinds and Softcap in kinds:
        a, b, c = (kinds.index(k) for k in (Bias, RelBias, Softcap))
        if min(a, b) < c < max(a, b):
            raise InputError("score_mod: a softcap between bias() and rel_bias() is not supported; put them together")
    return mods


def check_reordered(mods: tuple, pattern) -> None:
    """Refuse what a reordering `pattern` (buckets, lsh, keep masks) cannot take among the (normalized) `mods`: its
    kernels run on sorted tokens, whose positions alibi, a bias and T5's buckets would read."""
    if pattern.reorders and any(not isinstance(m, (Softcap, HeadScale)) for m in mods):
        raise InputError(
            f"score_mod with {pattern!r}: with buckets, lsh and keep masks only softcap and head_scale are supported "
            "yet (alibi, bias() and rel_bias() read positions, which the sorted tokens' kernels do not give them)"
        )


def bind(mods: tuple, q: torch.Tensor, Sk: int, bias=None, rel_table=None) -> tuple[ScoreMod, ...]:
    """The modifications with the call's tensors attached (`bias()` -> BoundBias, `rel_bias()` -> BoundRelBias) and
    checked against q [B, Hq, Sq, D] and Sk keys. Differentiable in `bias` and `rel_table`."""
    Hq = q.shape[1]
    wants = {type(m.structure()) for m in mods}
    for name, value, kind in (("bias", bias, Bias), ("rel_table", rel_table, RelBias)):
        maker = "ag.bias()" if kind is Bias else "ag.rel_bias(...)"
        if value is not None and kind not in wants:
            raise InputError(f"{name}= is given but score_mod has no {maker}")
        if value is not None and (not isinstance(value, torch.Tensor) or not value.is_floating_point()):
            got = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{name}= must be a float tensor, got a {got}")
        if isinstance(value, torch.Tensor) and value.device != q.device:
            raise InputError(f"{name}= is on {value.device}, q on {q.device}: put them on one device")
    bound = []
    for m in mods:
        if isinstance(m, Alibi):
            if m.slopes.shape[0] != Hq:
                raise InputError(f"alibi slopes: one per query head expected ({Hq}), got {m.slopes.shape[0]}")
            if m.slopes.device != q.device:
                raise InputError(f"alibi slopes are on {m.slopes.device}, q on {q.device}: put them on one device")
        elif isinstance(m, Bias):
            if bias is None:
                raise InputError("score_mod ag.bias() needs the call's bias= tensor, broadcastable to [B, Hq, Sq, Sk]")
            m = _bind_bias(bias, q, Sk)
        elif isinstance(m, HeadScale):
            _checked_scales(m, q)
        elif isinstance(m, RelBias):
            if rel_table is None:
                raise InputError(f"score_mod {m!r} needs the call's rel_table= tensor [Hq, {m.num_buckets}]")
            if tuple(rel_table.shape) != (Hq, m.num_buckets):
                got = tuple(rel_table.shape)
                raise InputError(f"rel_table= must be [Hq, num_buckets] = [{Hq}, {m.num_buckets}], got {got}")
            m = BoundRelBias(m, rel_table.float().contiguous())
        bound.append(m)
    return tuple(bound)


def _bind_bias(bias: torch.Tensor, q: torch.Tensor, Sk: int) -> BoundBias:
    B, Hq, Sq, _ = q.shape
    full = (B, Hq, Sq, Sk)
    if bias.dim() > 4 or any(n not in (1, want) for n, want in zip(bias.shape[::-1], full[::-1])):
        raise InputError(
            f"bias= of shape {tuple(bias.shape)} does not broadcast to [B, Hq, Sq, Sk] = {list(full)} "
            "(each dim must match or be 1)"
        )
    dtype = "input" if bias.dtype == q.dtype else "float32"
    x = bias.to(q.dtype if dtype == "input" else torch.float32)
    view = x.expand(full)
    if not pairable(view):
        view = paired(view)
    if view.stride(2) >= 1 << 22:  # the kernels' offsets within a tile are 32-bit
        raise InputError(f"bias= over {Sk} keys: at most {(1 << 22) - 2} keys are supported")
    return BoundBias(view, dtype)


def pairable(view: torch.Tensor) -> bool:
    """Whether the kernels can read bias view [B, Hq, Sq, Sk] as it is: elements (q, 2j) and (q, 2j + 1) of every
    (b, h) adjacent and starting an aligned pair. With Sk odd, a row's last pair also reads the element after its
    last key (its score is masked): that element must be in the tensor's storage. Traced by torch.compile, a tensor
    has neither address nor storage: the strides decide (rows padded), and `Prepared.from_tensors` checks again
    at launch."""
    b, h, q, k = view.stride()
    if k != 1 or b % 2 or h % 2 or q % 2:
        return False
    if torch.compiler.is_compiling():
        return view.shape[3] % 2 == 0 or max(b, h, q) > view.shape[3]
    if view.data_ptr() % (2 * view.element_size()):
        return False
    last = view.storage_offset() + sum((n - 1) * st for n, st in zip(view.shape, view.stride()))
    return view.shape[3] % 2 == 0 or last + 1 < view.untyped_storage().nbytes() // view.element_size()


def paired(view: torch.Tensor) -> torch.Tensor:
    """A copy of bias view [B, Hq, Sq, Sk] that the kernels can read in pairs, as a view of the same shape:
    row-major, rows padded to an even length, keys made real, its broadcast batch, head and query dims (stride 0)
    left broadcast."""
    Sk = view.shape[3]
    x = view[tuple(slice(0, 1) if st == 0 else slice(None) for st in view.stride()[:3])]
    return torch.nn.functional.pad(x, (0, Sk % 2)).contiguous()[..., :Sk].expand(view.shape)


def structures(mods) -> Structure:
    """What kernels are compiled for: the structures of modifications (or of structures, unchanged); head scales
    are folded into q before the kernels (`fold`) and have none."""
    return tuple(m.structure() for m in mods if not isinstance(m, HeadScale))


def key(structure: Structure) -> str:
    """A plain-string name of a tuple of structures (the custom op's argument): their reprs, which `by_key` parses
    back (no registry: a traced call's fake and autograd steps read it before the call has run)."""
    return ", ".join(map(repr, structure))


_BY_NAME = {
    "softcap": lambda cap: Softcap(float(cap)),
    "alibi": lambda align="top_left": AlibiSlot(align),
    "bias": lambda dtype="input": Bias(dtype),
    "rel_bias": lambda n, d, bidirectional=True: RelBias(n, d, bidirectional),
}


@functools.cache
def by_key(name: str) -> Structure:
    """The structures `key` named."""
    if not name:
        return ()
    calls = ast.parse(f"({name},)", mode="eval").body.elts
    return tuple(
        _BY_NAME[c.func.id](*map(ast.literal_eval, c.args), **{a.arg: ast.literal_eval(a.value) for a in c.keywords})
        for c in calls
    )


def with_tensors(structure: Structure) -> tuple:
    """The structures that take one run-time tensor each (alibi, bias, rel_bias), in argument order."""
    return tuple(m for m in structure if not isinstance(m, Softcap))


def kernel_tensors(mods: tuple[ScoreMod, ...]) -> list[torch.Tensor]:
    """The modifications' run-time tensors as the kernels read them, one per `with_tensors` structure: alibi slopes
    (contiguous fp32, no gradient), the bias and the T5 table (differentiable)."""
    return [t.detach().float().contiguous() if isinstance(m, Alibi) else t for m in mods for t in m.tensors()]


def takes_grad(structure: Structure) -> bool:
    """A bias or a T5 table: the backward can write dL/ds at their step for their gradients."""
    return any(isinstance(m, ADDITIVE) for m in structure)


def score_grad_kind(structure: Structure) -> str:
    """How the dK/dV kernel writes dL/ds: "input" (the bias's dtype, q's) for a bias alone, else "float32" (a T5
    table's gradient sums it in fp32, as does an fp32 bias's)."""
    biases = [m for m in structure if isinstance(m, Bias)]
    if any(isinstance(m, RelBias) for m in structure) or not biases:
        return "float32"
    return biases[0].dtype


def score_grad_dtype(structure: Structure, input_dtype: torch.dtype) -> torch.dtype:
    """`score_grad_kind` as a torch dtype, for inputs of `input_dtype`."""
    return input_dtype if score_grad_kind(structure) == "input" else torch.float32


def grad_after_softcap(structure: Structure) -> bool:
    """The additive tensors' step precedes a softcap: their gradient carries the softcap's derivative."""
    kinds = [type(m) for m in structure]
    firsts = [kinds.index(k) for k in ADDITIVE if k in kinds]
    return bool(firsts) and Softcap in kinds and min(firsts) < kinds.index(Softcap)


def tensor_grads(structure: Structure, tensors: list, score_grad: torch.Tensor) -> list:
    """The gradients of the modifications' tensors (`kernel_tensors`, in order) from dL/ds at the additive step,
    `score_grad` [B, Hq, Sq, Sk] (`score_grad_dtype`): the bias's is it (its broadcast is summed by autograd), the
    T5 table's its sums over each bucket's diagonals. Deterministic: plain torch reductions, no atomics."""
    grads = []
    for m, t in zip(with_tensors(structure), tensors):
        if isinstance(m, Bias):
            grads.append(score_grad.to(t.dtype))
        elif isinstance(m, RelBias):
            grads.append(_table_grad(m, score_grad.float()))
        else:
            grads.append(None)
    return grads


def _table_grad(spec: RelBias, g: torch.Tensor) -> torch.Tensor:
    """d rel_table [Hq, num_buckets] from g [B, Hq, Sq, Sk]: sums over each diagonal k - q, then over each bucket's
    diagonals (a matrix product with the diagonals' one-hot buckets)."""
    _B, Hq, Sq, Sk = g.shape
    g = g.sum(0)  # [Hq, Sq, Sk]
    # Row q shifted right by Sq - 1 - q: column j then holds diagonal k - q = j - (Sq - 1) of every row.
    padded = torch.nn.functional.pad(g, (Sq - 1, Sq - 1)).contiguous()  # [Hq, Sq, W]
    W = padded.shape[-1]
    skewed = padded.as_strided((Hq, Sq, Sk + Sq - 1), (Sq * W, W + 1, 1))
    diagonals = skewed.sum(1)  # [Hq, Sk + Sq - 1]
    rel = torch.arange(-(Sq - 1), Sk, device=g.device)
    onehot = torch.nn.functional.one_hot(spec.bucket(rel), spec.num_buckets).to(g.dtype)
    return diagonals @ onehot


def reference(mods, s: torch.Tensor, at: Window | None = None) -> torch.Tensor:
    """The (bound) modifications applied to scores s [B, Hq, Sq, Sk] (any float dtype), differentiably; or to the
    block of them `at` says, s [B, Hq, R, C] (what a selection pass scores a chunk at a time)."""
    if not mods:
        return s
    Hq, R, C = s.shape[1:]
    at = Window(R, C, slice(0, R), slice(0, C)) if at is None else at
    h = torch.arange(Hq, device=s.device).view(Hq, 1, 1)
    qpos = torch.arange(at.q0 + at.rows.start, at.q0 + at.rows.stop, device=s.device).view(R, 1)
    kpos = torch.arange(at.cols.start, at.cols.stop, device=s.device).view(1, C)
    for m in mods:
        if isinstance(m, (Bias, RelBias)):
            raise InputError(f"{m!r} needs its call-time tensor (scoremod.bind)")
        s = m.reference(s, h, qpos, kpos, at)
    return s
