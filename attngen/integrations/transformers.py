"""attngen inside Hugging Face transformers models (transformers 5.x, from 5.17).

    import attngen
    import attngen.integrations.transformers as agt  # registers attn_implementation="attngen"

    model = AutoModelForCausalLM.from_config(config, attn_implementation="attngen", dtype=torch.bfloat16).cuda()
    agt.set_pattern(model, attngen.nm(2, 4), layers=[0, 2])  # 2:4 attention on layers 0 and 2, on top of the mask

Importing this module registers, under the name "attngen", an attention function with transformers'
`AttentionInterface` and a mask builder with its `AttentionMaskInterface` (`register()` does it again, harmlessly).

**The model's own mask.** Once per forward pass (per mask type: full and sliding layers get one each) the model calls
the mask builder, which returns an `AttngenMask` instead of a dense mask: the model's mask translated into what an
attngen pattern needs, i.e. causal or bidirectional, the sliding window, and per batch either key lengths (right
padding: `key_padding()`) or (query, key) document ids (left padding, padding with holes, packed sequences found
from restarting `position_ids`: `documents()`). With a KV cache (Sq != Sk) the queries are the last Sq positions
of the Sk keys (`align="bottom_right"`). The builder reads the mask function transformers composed (causal,
sliding-window overlay, packed-sequence mask) and refuses any part it does not know (chunked attention, block
overlays of multimodal models, custom `and_mask_function` / `or_mask_function`) with an `attngen.InputError`:
nothing falls back to another attention implementation, and nothing is ignored.

**User patterns.** `set_pattern(model, pattern, layers)` puts an attngen pattern on chosen layers; it is AND-ed
with the model's mask, so pass only the extra rule (`attngen.nm(2, 4)`, `attngen.sliding_window(64)`,
`attngen.global_tokens(4) | attngen.sliding_window(256)`, ...). It is written for the square view (Sq == Sk, q and
k the positions of the row) and holds during decoding too: in a call with Sq != Sk its q is read as the query's
position among the keys, q + Sk - Sq (a query's row in the square Sk x Sk problem). Positions are indices in the
layer's keys: the row of a padded or packed batch (padding counts), and on a sliding-window layer with a full
cache the window's first key is index 0, so position-dependent rules (`nm`'s key groups, `global_tokens`) see the
cache's indices there. Patterns that need call-time tensors of their own (`documents()`, `key_padding()`) are
refused: the model's mask provides those. Block layouts work where Sq == Sk and are refused in decoding calls.

Gemma-2's attention logit soft-capping (`attn_logit_softcapping`) runs as the score modification `softcap`.

**Refused with a clear error** (`attngen.InputError`): attention dropout while training;
`output_attentions=True`; head dims attngen has no kernels for; dtypes other than fp16 / bf16 (outside autocast);
CPU tensors (the kernels run on CUDA).

**Dense 4-D masks.** A 4-D `attention_mask` handed to the model (bool, True keeping a key, or additive float) runs
as a `bias()` score modification on a `full()` pattern: correct for any mask, but it visits every tile (no skipping)
and reads the mask as a bias; a layer with a `set_pattern` pattern refuses it.

**Rows with no key.** A query row that may attend to no key (a left-padded position) gets output 0 from attngen.
transformers' eager path gives such rows the mean of V over all keys (its masked scores are all the dtype's
minimum); what SDPA gives depends on its backend. Those rows are padding: no other position attends to them, so the
logits and gradients of real tokens agree; compare outputs on real tokens only.

**Caches.** Dynamic caches (the default) and static caches (`cache_implementation="static"`, which hand every layer
its whole buffer): with several queries the unfilled slots are cut off the keys; with one query (decoding) the
buffer is kept, so shapes stay static, and its unfilled slots count as padding (cut off after all on layers whose
`set_pattern` pattern reads the query's position, which the buffer's length would shift).

**torch.compile.** The attention function traces without a graph break: shape and dtype checks only, the layer's
pattern is a constant (its name from `torch.compiler.assume_constant_result`, the pattern from a module-level table
that dynamo guards), and `attngen.attention` is a custom op. The mask builder reads the closures of the mask function
transformers composed, which dynamo cannot trace, so it is excluded from tracing (`torch.compiler.disable`):
`torch.compile(model)` breaks the graph where the model builds its masks (once per forward pass and mask type) and
compiles the decoder layers whole; `fullgraph=True` is refused by dynamo. The builder runs eagerly, so its checks
(is there padding at all, is it right padding) and a static cache's tensor query offset cost a host sync per forward
pass. Tested on the CPU with the kernels replaced by the reference: a compiled left-padded training step.

**Cost.** Patterns are built once per (mask kind, user pattern) and looked up afterwards (about 1 µs per layer
call); `set_pattern` keeps every distinct pattern it was given for the life of the process.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from typing import NamedTuple

import torch

from .. import pattern as P
from ..errors import InputError
from ..expr import Sk, Sq, q, substitute
from ..launch import attention as _attention
from ..scoremod import bias as bias_mod
from ..scoremod import softcap as softcap_mod
from ..select import split_selection
from ..tiling import HEAD_DIMS

try:
    import transformers
    from transformers import AttentionInterface, AttentionMaskInterface
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "attngen.integrations.transformers needs Hugging Face transformers >= 5.17: pip install 'transformers>=5.17'"
    ) from e

__all__ = [
    "NAME",
    "AttngenMask",
    "Resolved",
    "attention_layers",
    "attngen_attention",
    "attngen_mask",
    "get_patterns",
    "register",
    "resolve",
    "set_pattern",
]

NAME = "attngen"
MIN_VERSION = (5, 17)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _version(transformers.__version__) < MIN_VERSION:
    raise ImportError(
        f"attngen.integrations.transformers needs transformers >= 5.17 (its attention and mask interfaces pass "
        f"query and key offsets); found {transformers.__version__}"
    )


# ------------------------------------------------------------------------------------------------- the mask


class AttngenMask(NamedTuple):
    """The model's mask as the attention function needs it (what the mask builder returns instead of a dense
    mask). Query row i and key j of a layer call with this mask: i < q_length, j < keys_used (a static cache's
    unfilled tail, keys_used <= j < kv_length, is dropped); the queries are the last q_length of keys_used
    positions when they differ. Decoding into a static cache keeps the whole buffer (keys_used = kv_length) and
    marks the keys from `filled` on as padding."""

    q_length: int
    kv_length: int  # keys the attention layers receive
    keys_used: int  # keys that may be attended: kv_length, or fewer for a static cache not yet full
    causal: bool
    window: int | None  # sliding window (causal: q - w < k <= q; bidirectional: |q - k| <= w)
    document_ids: tuple[torch.Tensor, torch.Tensor] | None  # int32 (query [B' , Sq], key [B, keys_used])
    key_lengths: torch.Tensor | None  # int32 [B]: right padding
    filled: int | None = None  # decoding into a static cache: the keys that hold tokens (the rest is padding here)

    @property
    def ndim(self) -> int:
        """Not a padding mask: generate() with a static cache builds the mask up front and hands it to the model, whose
        mask functions then pass on whatever is not a 2-D tensor (and this builder returns it as it is)."""
        return 0

    @property
    def kind(self) -> tuple:
        """The shape of the model's pattern (no data): the key its attngen pattern is cached under."""
        return (
            self.causal,
            self.window,
            self.document_ids is not None,
            self.key_lengths is not None,
            self.q_length != self.keys_used,
        )


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}


class _Parts:
    """What a transformers mask function is made of, read off its closures."""

    def __init__(self):
        self.base: str | None = None  # "causal" or "bidirectional"
        self.window: int | None = None
        self.bidirectional_window: int | None = None
        self.packed: torch.Tensor | None = None
        self.remapped = False


def _read_mask_function(fn, parts: _Parts) -> None:
    name = getattr(fn, "__qualname__", type(fn).__name__)
    env = _closure(fn)
    if name == "causal_mask_function":
        parts.base = "causal"
    elif name == "bidirectional_mask_function":
        parts.base = "bidirectional"
    elif name == "and_masks.<locals>.and_mask":
        for part in env["mask_functions"]:
            _read_mask_function(part, parts)
    elif name == "sliding_window_overlay.<locals>.inner_mask":
        w = int(env["sliding_window"])
        parts.window = w if parts.window is None else min(parts.window, w)
    elif name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
        w = int(env["sliding_window"])
        parts.bidirectional_window = w if parts.bidirectional_window is None else min(parts.bidirectional_window, w)
    elif name == "packed_sequence_mask_function.<locals>.inner_mask":
        parts.packed = env["packed_sequence_mask"]
    elif name == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        # Positions restart per packed sequence; within one sequence they step by 1 (that is how transformers finds
        # the sequences), so the causal and window rules on them equal the rules on row indices, given the
        # packed-sequence mask that always comes with this remapping.
        parts.remapped = True
        _read_mask_function(env["mask_function"], parts)
    else:
        raise InputError(
            f"attn_implementation='attngen': the model's mask uses {name!r}, which attngen cannot express yet "
            f"(known: causal, bidirectional, sliding windows, packed sequences; transformers "
            f"{transformers.__version__}). Use another attn_implementation for this model"
        )


@torch.compiler.disable  # reads the mask function's closures, which dynamo cannot: a graph break, once per mask
def attngen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=None,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    device=None,
    **kwargs,
) -> AttngenMask:
    """transformers' mask builder for attn_implementation="attngen" (`AttentionMaskInterface`): the model's mask as
    an `AttngenMask` (see the module docstring). `attention_mask` is the 2-D padding mask (True / 1: a real token)
    over the cache's positions; `mask_function` the causal / sliding / packed mask transformers composed."""
    if q_offset is None:
        raise InputError(
            "attn_implementation='attngen' needs transformers >= 5.17, whose mask builders receive q_offset; "
            f"found {transformers.__version__}"
        )
    if isinstance(attention_mask, AttngenMask):  # built up front by generate() (static caches): already this one
        if (attention_mask.q_length, attention_mask.kv_length) != (q_length, kv_length):
            raise InputError(
                f"attn_implementation='attngen': a mask built for {attention_mask.q_length} queries and "
                f"{attention_mask.kv_length} keys was passed to a call with {q_length} and {kv_length}"
            )
        return attention_mask
    parts = _Parts()
    if mask_function is None:
        parts.base = "causal"
    else:
        _read_mask_function(mask_function, parts)
    if parts.base is None:
        raise InputError("attn_implementation='attngen': the model's mask function is neither causal nor bidirectional")
    if parts.remapped and parts.packed is None:
        raise InputError("attn_implementation='attngen': positions remapped without a packed-sequence mask")
    causal = parts.base == "causal"
    if causal and parts.bidirectional_window is not None:
        raise InputError("attn_implementation='attngen': a bidirectional window on a causal mask is not supported")
    window = parts.window if causal else parts.bidirectional_window
    if not causal and parts.window is not None:
        raise InputError("attn_implementation='attngen': a causal window on a bidirectional mask is not supported")

    q_off, kv_off = int(q_offset), int(kv_offset)  # a static cache's query offset is a tensor: one host sync
    shift = q_off - kv_off  # key index of query row 0's own position
    keys_used, filled = kv_length, None
    if causal:
        end = q_length + shift  # keys from here on are a static cache's unfilled slots
        if end > kv_length or shift < 0:
            raise InputError(
                f"attn_implementation='attngen': queries at offset {q_off} and {kv_length} keys at offset {kv_off} "
                "do not end together; attngen aligns the last query with the last key (a dynamic or static cache)"
            )
        if end < kv_length:
            if q_length == 1 and (window is None or kv_length <= window):
                filled = end  # decoding: keep the whole buffer (static shapes), its unfilled slots as padding
            else:
                keys_used = end  # drop them
    elif window is not None and shift != kv_length - q_length:
        raise InputError("attn_implementation='attngen': a bidirectional window with a cache offset is not supported")

    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(torch.bool)
        if valid.dim() != 2:
            raise InputError(f"attn_implementation='attngen': expected a 2-D padding mask, got {tuple(valid.shape)}")
        end = kv_off + keys_used
        if valid.shape[-1] < end:  # a static cache's slots past the mask are not real tokens
            valid = torch.nn.functional.pad(valid, (0, end - valid.shape[-1]), value=False)
        valid = valid[:, kv_off:end]
        if valid.shape[0] != batch_size:
            valid = valid.expand(batch_size, -1)
    if filled is not None:
        tail = torch.arange(keys_used, device=device if valid is None else valid.device) < filled
        valid = tail.expand(batch_size, -1) if valid is None else valid & tail

    document_ids = key_lengths = None
    if parts.packed is not None:
        if q_length != kv_length or shift != 0:
            raise InputError("attn_implementation='attngen': packed sequences with a cache are not supported")
        ids = parts.packed.to(torch.int32)
        ids = ids.expand(batch_size, -1) if ids.shape[0] != batch_size else ids
        document_ids = (ids, ids)
    if valid is not None:
        if document_ids is not None:
            qd, kd = document_ids
            document_ids = (qd, torch.where(valid, kd, -1))  # query ids are >= 0: a padded key matches none
        else:
            lengths = valid.sum(-1, dtype=torch.int32)
            right = torch.arange(keys_used, device=valid.device) < lengths[:, None]
            is_right, is_full = torch.stack([(right == valid).all(), (lengths == keys_used).all()]).tolist()  # 1 sync
            if is_full:
                pass  # no padding (generate() always passes a mask)
            elif is_right:
                key_lengths = lengths
            else:  # left padding or holes: every query row sees only the real keys (padded rows see none)
                query_ids = torch.zeros(1, q_length, dtype=torch.int32, device=valid.device)
                document_ids = (query_ids, (~valid).to(torch.int32))
    return AttngenMask(q_length, kv_length, keys_used, causal, window, document_ids, key_lengths, filled)


# ----------------------------------------------------------------------------------------------- patterns


_USER_PATTERNS: dict[P.Pattern, int] = {}  # a user pattern -> its token (interned: equal patterns share one)
_BY_TOKEN: dict[int, P.Pattern] = {}


_POSITIONAL: dict[int, bool] = {}  # token -> whether the pattern reads the query's position


def _token(pattern: P.Pattern) -> int:
    token = _USER_PATTERNS.get(pattern)
    if token is None:
        token = _USER_PATTERNS.setdefault(pattern, len(_USER_PATTERNS))
        _BY_TOKEN[token] = pattern
        _POSITIONAL[token] = any(
            isinstance(leaf, (P.BlockLayout, P.LayoutSlot))
            or (isinstance(leaf, P.Affine) and bool(leaf.expr.gens() & {"q", "Sq"}))
            for leaf in pattern.leaves()
        )
    return token


@functools.cache
def _model_pattern(causal: bool, window: int | None, documents: bool, lengths: bool, shifted: bool) -> P.Pattern:
    """The model's own mask as an attngen pattern."""
    align = "bottom_right" if shifted else "top_left"
    if causal:
        parts = [P.sliding_window(window, align=align) if window is not None else P.causal(align=align)]
    elif window is not None:
        parts = [_shift(P.local(window, window)) if shifted else P.local(window, window)]
    else:
        parts = [P.full()]
    if documents:
        parts.append(P.documents())
    if lengths:
        parts.append(P.key_padding())
    return functools.reduce(operator.and_, parts)


def _shift(pat: P.Pattern) -> P.Pattern:
    """`pat` read in the square view: in a call with Sq != Sk, query row q is position q + Sk - Sq of Sk (and Sq is
    Sk). Affine leaves are rewritten; documents, key padding and selection rules do not depend on q."""
    if isinstance(pat, P.And):
        return functools.reduce(operator.and_, map(_shift, pat.parts))
    if isinstance(pat, P.Or):
        return functools.reduce(operator.or_, map(_shift, pat.parts))
    if isinstance(pat, P.Not):
        return ~_shift(pat.part)
    if isinstance(pat, P.Affine):
        expr = substitute(pat.expr, {"q": q + Sk - Sq, "Sq": Sk})
        return pat if expr == pat.expr else P.Affine(expr, f"bottom_right({pat!r})")
    if isinstance(pat, (P.BlockLayout, P.LayoutSlot)):
        raise InputError(
            f"{pat!r} is set on a layer that is called with Sq != Sk (decoding with a cache): block layouts are "
            "indexed by query block and cannot be realigned; use them without a cache (use_cache=False)"
        )
    return pat


_NAMES: dict[tuple, str] = {}  # (kind, token) -> the name its pattern is stored under
_BY_NAME: dict[str, P.Pattern] = {}


@torch.compiler.assume_constant_result
def _layer_pattern_name(kind: tuple, token: int) -> str:
    """The name of the pattern a layer runs: the model's mask of this `kind` AND the user pattern `token` (-1: none),
    built once per combination (host work) and stored in `_BY_NAME`. torch.compile calls this at trace time and
    takes the name as a constant; the pattern is then read from the module-level dict, which it can guard."""
    key = (kind, token)
    name = _NAMES.get(key)
    if name is None:
        pat = _model_pattern(*kind)
        if token >= 0:
            user = _BY_TOKEN[token]
            pat = pat & (_shift(user) if kind[-1] else user)
        name = _NAMES.setdefault(key, f"p{len(_NAMES)}")
        _BY_NAME[name] = pat
    return name


def _layer_pattern(kind: tuple, token: int) -> P.Pattern:
    return _BY_NAME[_layer_pattern_name(kind, token)]


class Resolved(NamedTuple):
    """What one attention layer call runs: `attngen.attention(q, k[:, :, :keys_used], v[...], pattern, **inputs)`."""

    pattern: P.Pattern
    inputs: dict
    keys_used: int


def _default_mask(module, q_length: int, kv_length: int, sliding_window, is_causal) -> AttngenMask:
    """No mask from the model: causal (bottom-right) unless the layer says otherwise, with the layer's window."""
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    return AttngenMask(q_length, kv_length, kv_length, causal, sliding_window, None, None)


def resolve(
    module,
    q_length: int,
    kv_length: int,
    attention_mask: AttngenMask | None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
) -> Resolved:
    """The pattern and call-time inputs the "attngen" attention function runs for `module` (an attention layer)
    given the mask the model handed it: the model's mask AND the layer's `set_pattern` pattern."""
    mask = attention_mask
    if mask is None:
        mask = _default_mask(module, q_length, kv_length, sliding_window, is_causal)
    elif not isinstance(mask, AttngenMask):
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise InputError(
            f"attn_implementation='attngen' received a prepared attention mask ({shape}) instead of its own: pass the "
            "2-D padding mask (attention_mask [batch, seq]) or position_ids and let the model build the mask"
        )
    if (q_length, kv_length) != (mask.q_length, mask.kv_length):
        raise InputError(
            f"attn_implementation='attngen': the layer gets {q_length} queries and {kv_length} keys, its mask was "
            f"built for {mask.q_length} and {mask.kv_length}"
        )
    if sliding_window is not None and mask.window != sliding_window:
        raise InputError(
            f"attn_implementation='attngen': layer {getattr(module, 'layer_idx', '?')} has sliding_window="
            f"{sliding_window} but its mask has window {mask.window}"
        )
    token = getattr(module, "_attngen_token", -1)
    pattern = _layer_pattern(mask.kind, token)
    keys_used, docs = mask.keys_used, mask.document_ids
    if mask.filled is not None and token >= 0 and _POSITIONAL[token]:
        # The user pattern reads the query's position, q + Sk - Sq: the buffer's unfilled tail must go (this layer's
        # keys lose their static shape).
        keys_used = mask.filled
        docs = None if docs is None else (docs[0], docs[1][:, :keys_used])
    inputs = {}
    if docs is not None:
        inputs["document_ids"] = docs
    if mask.key_lengths is not None:
        inputs["key_lengths"] = mask.key_lengths
    return Resolved(pattern, inputs, keys_used)


# --------------------------------------------------------------------------------------- attention function


_FLOATS = (torch.float16, torch.bfloat16)


def _attentions_requested(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    if torch.compiler.is_compiling():
        return False
    try:  # transformers 5.x records attention weights with hooks while output_attentions=True
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    try:
        collected = _active_collector.get()
    except LookupError:  # nothing is being recorded
        return False
    return isinstance(collected, dict) and "attentions" in collected


def attngen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: AttngenMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for attn_implementation="attngen" (`AttentionInterface`): query
    [B, Hq, Sq, D], key / value [B, Hkv, Sk, D] (after the cache update) -> ([B, Sq, Hq, D], None)."""
    if dropout:
        raise InputError(
            f"attn_implementation='attngen' does not support attention dropout ({dropout} while training); set the "
            "config's attention_dropout to 0"
        )
    if _attentions_requested(kwargs):
        raise InputError(
            "attn_implementation='attngen' never forms the attention weights, so output_attentions=True cannot be "
            "served; use attn_implementation='eager' to inspect them"
        )
    D = query.shape[-1]
    if D not in HEAD_DIMS or key.shape[-1] != D:
        raise InputError(
            f"attn_implementation='attngen': head dim {D} is not supported; attngen's kernels take head dims "
            f"{', '.join(map(str, HEAD_DIMS))}"
        )
    if query.dtype not in _FLOATS:
        device = query.device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in _FLOATS
        if not autocast:
            raise InputError(
                f"attn_implementation='attngen': the model runs in {query.dtype}; attngen's kernels take fp16 and "
                "bf16: load the model with dtype=torch.bfloat16 (or float16), or run it under torch.autocast"
            )
        dtype = torch.get_autocast_dtype(device)  # what autocast gives SDPA
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    score_mod = None if softcap is None else softcap_mod(softcap)  # Gemma-2's attn_logit_softcapping
    if isinstance(attention_mask, torch.Tensor):  # a dense 4-D mask handed to the model: added as a bias
        bias = _dense_mask_bias(module, attention_mask, query, key)
        score_mod = (*([] if score_mod is None else [score_mod]), bias_mod())  # after the softcap, as eager adds it
        out = _attention(query, key, value, P.full(), scale=scaling, score_mod=score_mod, bias=bias)
        return out.transpose(1, 2), None
    run = resolve(module, query.shape[2], key.shape[2], attention_mask, sliding_window, is_causal)
    if run.keys_used != key.shape[2]:
        key, value = key[:, :, : run.keys_used], value[:, :, : run.keys_used]
    out = _attention(query, key, value, run.pattern, scale=scaling, score_mod=score_mod, **run.inputs)
    return out.transpose(1, 2), None


def _dense_mask_bias(module, mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """A dense 4-D attention mask ([B or 1, H or 1, Sq, Sk]; bool: True keeps, or additive float) as the bias the
    kernels add: 0 where kept, -inf where not (a float mask as given). A row it keeps nothing of gives 0."""
    if getattr(module, "_attngen_token", -1) >= 0:
        raise InputError(
            "attn_implementation='attngen': a dense 4-D attention_mask and a set_pattern pattern on one layer are "
            "not supported together; pass the 2-D padding mask, or no set_pattern"
        )
    want = (query.shape[2], key.shape[2])
    if mask.dim() != 4 or tuple(mask.shape[2:]) != want:
        raise InputError(
            f"attn_implementation='attngen': a dense attention mask must be [batch, heads or 1, {want[0]}, {want[1]}], "
            f"got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    if not mask.is_floating_point():
        raise InputError(f"attn_implementation='attngen': a dense attention mask is bool or float, got {mask.dtype}")
    return mask


# -------------------------------------------------------------------------------------- user patterns, API


def register() -> None:
    """Register "attngen" with transformers' attention and mask interfaces (idempotent; done on import)."""
    AttentionInterface.register(NAME, attngen_attention)
    AttentionMaskInterface.register(NAME, attngen_mask)


def attention_layers(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """The model's attention modules by layer index (modules with an integer `layer_idx` whose class name ends in
    "Attention", as in every transformers decoder)."""
    layers: dict[int, list[torch.nn.Module]] = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool) and type(m).__name__.endswith("Attention"):
            layers.setdefault(idx, []).append(m)
    return layers


def _num_layers(model, layers: dict) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) else max(layers, default=-1) + 1


def set_pattern(model: torch.nn.Module, pattern: P.Pattern | None, layers: Iterable[int] | None = None) -> None:
    """Put `pattern` on the attention layers `layers` of `model` (None: every layer); `pattern=None` removes it.

    The pattern is AND-ed with the model's own mask (causal, window, padding, packing), so pass the extra rule only:
    `attngen.nm(2, 4)`, `attngen.sliding_window(64)`, ... It is read in the square view (the module docstring says
    how it applies while decoding). The model must use attn_implementation="attngen"."""
    if pattern is not None:
        if not isinstance(pattern, P.Pattern):
            raise InputError(f"set_pattern takes an attngen pattern (or None), got {type(pattern).__name__}")
        if pattern.runtime_inputs:
            raise InputError(
                f"{pattern!r} needs call-time tensors ({', '.join(sorted(pattern.runtime_inputs))}), which the model "
                "does not pass: padding and packed sequences already come from the model's own mask"
            )
        split_selection(P.causal() & pattern)  # refuse compositions no kernel supports now, not mid-forward
    found = attention_layers(model)
    n = _num_layers(model, found)
    if layers is None:
        chosen = sorted(found)
    else:
        if isinstance(layers, int) or not isinstance(layers, Iterable):
            raise InputError(f"layers must be a list of layer indices or None, got {layers!r}")
        chosen = list(layers)
        for i in chosen:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise InputError(f"layers must hold layer indices from 0 to {n - 1} (the model has {n}), got {i!r}")
            if i not in found:
                raise InputError(f"layer {i} has no attention module attngen can run (found layers {sorted(found)})")
    if not chosen:
        raise InputError("the model has no attention layers attngen can run (modules named *Attention with layer_idx)")
    for i in chosen:
        for m in found[i]:
            impl = getattr(getattr(m, "config", None), "_attn_implementation", NAME)
            if impl != NAME:
                raise InputError(
                    f"layer {i} runs attn_implementation={impl!r}: patterns apply only with "
                    f"attn_implementation='attngen' (from_config / from_pretrained, or model.set_attn_implementation)"
                )
    token = -1 if pattern is None else _token(pattern)
    for i in chosen:
        for m in found[i]:
            m._attngen_token = token


def get_patterns(model: torch.nn.Module) -> dict[int, P.Pattern]:
    """The patterns `set_pattern` put on the model's layers, by layer index."""
    out = {}
    for i, modules in sorted(attention_layers(model).items()):
        token = getattr(modules[0], "_attngen_token", -1)
        if token >= 0:
            out[i] = _BY_TOKEN[token]
    return out


register()
