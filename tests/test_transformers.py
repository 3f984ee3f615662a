"""attngen inside Hugging Face transformers (`attngen.integrations.transformers`), without a GPU.

Mask translation: tiny random Llama, Qwen2 (sliding and full layers), Mistral (sliding window) and Gemma-2 (sliding
and global layers) models run twice on the same inputs, once with transformers' own eager mask and once with
attngen's mask builder, both through an eager attention written here; every layer call's attngen pattern and
call-time tensors must give exactly transformers' dense mask (no mask, right and left padding, packed sequences,
decoding with a dynamic cache: Sq = 16 with Sk = 117, then Sq = 1, and generation with a static cache; sliding
windows with their caches). Fully masked rows (left padding) are compared too: the masks agree there; the outputs
do not (attngen gives 0, eager the mean of V; nothing attends to those rows), so outputs are compared on real tokens.

End to end: the same models with attn_implementation="attngen", `attngen.attention` running for real except for
the kernels, which the `reference_kernels` fixture (conftest.py) replaces by the float32 reference (forward and
exact backward). In float32 (`float32_kernels` widens the dtype gates, nothing else) logits, generated tokens and
parameter gradients equal eager attention's to rounding; in bf16, the real dtype path, they track eager float32 as
closely as eager bf16 does. Also: `set_pattern` (2:4 attention, a sliding window while generating) against eager
versions written here, torch.compile, autocast, and the errors the integration raises."""

import copy
import inspect
import math
from types import SimpleNamespace

import pytest
import torch

import attngen as ag
from attngen import InputError

transformers = pytest.importorskip("transformers")
agt = pytest.importorskip("attngen.integrations.transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AttentionMaskInterface,
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.masking_utils import eager_mask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, WINDOW = 128, 8
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    head_dim=32,
    max_position_embeddings=512,
    initializer_range=0.1,  # attention scores of a few units: masking mistakes show in the logits
    use_cache=True,
)


def config(family: str, **overrides):
    """A fresh config (from_config writes the attention implementation into the one it is given)."""
    if family == "llama":
        return LlamaConfig(**{**COMMON, **overrides})
    if family == "qwen2":  # layer 0 full, layers 1 and 2 sliding
        kw = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        return Qwen2Config(**{**COMMON, **kw, **overrides})
    if family == "mistral":
        return MistralConfig(**{**COMMON, "sliding_window": WINDOW, **overrides})
    if family == "gemma2":  # sliding and global layers alternate; its scale is query_pre_attn_scalar ** -0.5
        kw = dict(
            sliding_window=WINDOW,
            attn_logit_softcapping=None,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=24,
            tie_word_embeddings=False,  # tied, a random Gemma-2 repeats its last token
        )
        return Gemma2Config(**{**COMMON, **kw, **overrides})
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma2"]
_BASES = {}


def model(family: str, impl: str, dtype=torch.float32, **overrides):
    """The family's model with one fixed set of random weights, for attention implementation `impl`."""
    key = (family, tuple(sorted(overrides.items())))
    if key not in _BASES:
        torch.manual_seed(0)
        _BASES[key] = AutoModelForCausalLM.from_config(config(family, **overrides), attn_implementation="eager")
    m = AutoModelForCausalLM.from_config(config(family, **overrides), attn_implementation=impl)
    m.load_state_dict(_BASES[key].state_dict())
    return m.to(dtype).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padding(batch: int, length: int, pads: list[int], side: str) -> torch.Tensor:
    """A 2-D padding mask (1: a real token) whose row b has pads[b] padding tokens on `side`."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, n in enumerate(pads):
        if n and side == "left":
            mask[b, :n] = 0
        elif n:
            mask[b, length - n :] = 0
    return mask


def with_cache(m, cache) -> dict:
    """The cache keyword of `m.forward`: `cache` from transformers 5.2x, `past_key_values` before."""
    return {"cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values": cache}


def packed_positions(splits: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in splits])


# ------------------------------------------------------------------------------------------- mask translation


def eager_attention(module, query, key, value, mask_bool, scaling):
    """Plain attention over a bool mask [B, 1, Sq, Sk] (True: attend), eager's way (fully masked rows: the mean)."""
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    s = (query.float() @ k.float().transpose(-1, -2)) * scaling
    s = s.masked_fill(~mask_bool, torch.finfo(torch.float32).min)
    p = torch.softmax(s, -1)
    return (p @ v.float()).to(query.dtype).transpose(1, 2), None


def attngen_dense_mask(module, q_length, kv_length, mask, sliding_window, batch):
    """The dense mask [B, 1, Sq, Sk] of what the attngen attention function runs for this call."""
    run = agt.resolve(module, q_length, kv_length, mask, sliding_window)
    dense = run.pattern.mask(q_length, run.keys_used, **run.inputs).expand(batch, 1, q_length, run.keys_used)
    full = torch.zeros(batch, 1, q_length, kv_length, dtype=torch.bool)
    full[..., : run.keys_used] = dense
    return full, run


@pytest.fixture(scope="module")
def probes():
    """Two attention implementations that record what each layer call gets and attend with its dense mask:
    "probe_eager" (transformers' eager mask) and "probe_attngen" (attngen's mask builder and patterns)."""
    records = {"probe_eager": [], "probe_attngen": []}

    def eager(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kw):
        mask = attention_mask == 0 if attention_mask is not None else None
        records["probe_eager"].append((module.layer_idx, query.shape[2], key.shape[2], mask))
        if mask is None:
            mask = torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool)
        return eager_attention(module, query, key, value, mask, scaling)

    def attngen(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kw):
        Sq, Sk = query.shape[2], key.shape[2]
        dense, run = attngen_dense_mask(module, Sq, Sk, attention_mask, sliding_window, query.shape[0])
        records["probe_attngen"].append((module.layer_idx, Sq, Sk, dense, run, attention_mask))
        return eager_attention(module, query, key, value, dense, scaling)

    AttentionInterface.register("probe_eager", eager)
    AttentionMaskInterface.register("probe_eager", eager_mask)
    AttentionInterface.register("probe_attngen", attngen)
    AttentionMaskInterface.register("probe_attngen", agt.attngen_mask)
    return records


def run_scenario(m, scenario: str):
    """Run `m` on one scenario's inputs; returns the logits."""
    B, on = 3, lambda t: t.to(m.device)
    with torch.no_grad():
        if scenario in ("right_padding", "left_padding"):
            side = scenario.split("_")[0]
            return m(on(ids(B, 24)), attention_mask=on(padding(B, 24, [0, 5, 11], side))).logits
        if scenario == "packed":  # position_ids restart: transformers finds the sequences (no mask, no cache)
            pos = packed_positions([[10, 14], [24], [3, 9, 12]])
            return m(on(ids(B, 24)), position_ids=on(pos), use_cache=False).logits
        if scenario in ("decode", "decode_left_padding"):  # prefill 101, then 16 more (Sk = 117), then 1 (Sk = 118)
            pads = [0, 7, 30] if scenario == "decode_left_padding" else [0, 0, 0]
            mask = padding(B, 101, pads, "left")
            cache = DynamicCache(config=m.config)
            logits = [m(on(ids(B, 101)), attention_mask=on(mask), **with_cache(m, cache)).logits[:, -1]]
            for step, n in enumerate((16, 1)):
                mask = torch.cat([mask, torch.ones(B, n, dtype=mask.dtype)], 1)
                out = m(on(ids(B, n, seed=2 + step)), attention_mask=on(mask), **with_cache(m, cache))
                logits.append(out.logits[:, -1])
            return torch.stack(logits, 1)
        if scenario == "no_mask":
            return m(on(ids(B, 24))).logits
        if scenario == "static_generate":  # a static cache: every layer gets the whole buffer
            return torch.stack(generate(m, cache_implementation="static").logits, 1)
    raise ValueError(scenario)


SCENARIOS = ["no_mask", "right_padding", "left_padding", "packed", "decode", "decode_left_padding", "static_generate"]
LEFT_PADDED_DECODING = ("decode_left_padding", "static_generate")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_translation_matches_transformers_masks(probes, family, scenario):
    """Every layer call: attngen's pattern and call-time tensors give exactly transformers' eager mask, fully masked
    rows included; the run-time form is the one expected (key lengths for right padding, document ids for left
    padding and packing, bottom-right alignment with a cache, the window on sliding layers only)."""
    for r in probes.values():
        r.clear()
    logits = {impl: run_scenario(model(family, impl), scenario) for impl in probes}
    ours, theirs = probes["probe_attngen"], probes["probe_eager"]
    assert len(ours) == len(theirs) > 0
    cfg = config(family)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    for (layer, Sq, Sk, dense, run, mask), (layer2, Sq2, Sk2, hf) in zip(ours, theirs):
        assert (layer, Sq, Sk) == (layer2, Sq2, Sk2)
        if hf is None:  # transformers gave no mask: plain causal (Sq == Sk), or a single query row
            hf = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq).expand_as(dense)
        assert torch.equal(dense, hf.expand_as(dense)), f"layer {layer}, Sq={Sq}, Sk={Sk}: {run.pattern!r}"
        sliding = types[layer] == "sliding_attention" or family == "mistral"
        assert mask.window == (WINDOW if sliding else None)
        past = run.keys_used - Sq  # keys before the first query: decoding calls (1 or 16 queries) only
        assert mask.causal and past >= 0 and (past > 0) == (Sq in (1, 16))
        text = repr(run.pattern)
        assert ("sliding_window(8" in text) == sliding and ("bottom_right" in text) == (Sq != run.keys_used)
        if scenario == "right_padding":
            assert mask.key_lengths is not None and mask.document_ids is None
        elif scenario in ("left_padding", "packed") or (scenario in LEFT_PADDED_DECODING and not sliding):
            assert mask.document_ids is not None and mask.key_lengths is None
        elif scenario in LEFT_PADDED_DECODING:  # the window may have left the padding behind
            assert mask.key_lengths is None
        else:
            assert mask.document_ids is None and mask.key_lengths is None
    # identical masks, identical attention: the two runs agree (fully masked rows too: both attend eager's way here)
    torch.testing.assert_close(logits["probe_attngen"], logits["probe_eager"], rtol=1e-5, atol=1e-5)


def test_sliding_cache_drops_keys_and_the_pattern_follows(probes):
    """Mistral decoding past its window: the sliding layers get window - 1 cached keys plus the new ones, and the
    mask builder's offsets put the queries at the end of them."""
    for r in probes.values():
        r.clear()
    run_scenario(model("mistral", "probe_attngen"), "decode")
    shapes = {(Sq, Sk) for _, Sq, Sk, *_ in probes["probe_attngen"]}
    assert shapes == {(101, 101), (16, WINDOW - 1 + 16), (1, WINDOW)}


def test_static_cache_unfilled_slots_are_left_out():
    """A static cache hands every layer its whole buffer. Several queries: the mask builder keeps only the filled
    keys (keys_used); one query (decoding): it keeps the buffer, for static shapes, and the unfilled keys become
    padding. Both give transformers' mask."""
    full = torch.ones(2, 14, dtype=torch.bool)
    m = agt.attngen_mask(2, 4, 64, q_offset=10, kv_offset=0, attention_mask=full)
    assert (m.q_length, m.kv_length, m.keys_used) == (4, 64, 14)
    assert m.key_lengths is None and m.document_ids is None
    m = agt.attngen_mask(2, 1, 64, q_offset=torch.tensor(13), kv_offset=0, attention_mask=full)
    assert (m.keys_used, m.key_lengths.tolist(), m.document_ids) == (64, [14, 14], None)
    left = full.clone()
    left[1, :3] = False
    for Sq, past in ((4, 10), (1, 13)):
        m = agt.attngen_mask(2, Sq, 64, q_offset=past, kv_offset=0, attention_mask=left)
        hf = eager_mask(2, Sq, 64, q_offset=past, attention_mask=left) == 0
        dense, _ = attngen_dense_mask(SimpleNamespace(layer_idx=0), Sq, 64, m, None, 2)
        assert torch.equal(dense, hf)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def float32_kernels(reference_kernels, monkeypatch):
    """`reference_kernels`, letting float32 through too: the kernels take fp16 and bf16 only, but the reference
    computes in float32 anyway, so a float32 model with attngen attention then agrees with eager float32 to rounding
    and any masking, alignment or scaling mistake shows. Only the dtype gates are widened."""
    from attngen import launch

    check = launch._check
    narrow = lambda t: t.to(torch.bfloat16) if t.dtype == torch.float32 else t
    monkeypatch.setattr(launch, "_check", lambda q, k, v: check(narrow(q), narrow(k), narrow(v)))
    monkeypatch.setattr(agt, "_FLOATS", (torch.float16, torch.bfloat16, torch.float32))
    return reference_kernels


def models_fp32(family: str, **overrides):
    """attngen and eager, float32, same weights."""
    return model(family, "attngen", **overrides), model(family, "eager", **overrides)


def models_bf16(family: str, **overrides):
    """attngen in bf16, eager in bf16 and eager in float32 on the same (bf16-rounded) weights."""
    agm = model(family, "attngen", torch.bfloat16, **overrides)
    bf = model(family, "eager", torch.bfloat16, **overrides)
    fp = model(family, "eager", torch.float32, **overrides)
    fp.load_state_dict({k: v.float() for k, v in agm.state_dict().items()})
    return agm, bf, fp


def assert_exact(ours: torch.Tensor, eager: torch.Tensor, what: str):
    """float32 attngen (the float32 reference) against eager float32: rounding only."""
    scale = eager.abs().max().item()
    err = (ours - eager).abs().max().item()
    assert err <= 1e-4 * scale + 1e-6, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def assert_tracks(ours: torch.Tensor, exact: torch.Tensor, bf16: torch.Tensor, what: str, factor: float = 2.0):
    """`ours` (attngen, bf16) is as close to the float32 result as eager attention in bf16 is (within `factor`, plus
    a floor of 1% of the result's scale). On these models bf16 rounding moves the logits by about 1.5% of their
    scale; a masking mistake moves them much more (the float32 tests above pin the semantics down exactly)."""
    ours, exact, bf16 = ours.float(), exact.float(), bf16.float()
    err, budget = (ours - exact).abs().max().item(), (bf16 - exact).abs().max().item()
    floor = 1e-2 * exact.abs().max().item()
    assert err <= factor * budget + floor, f"{what}: attngen error {err:.4g}, eager bf16 error {budget:.4g}"


def real_rows(scenario: str, B: int, S: int) -> torch.Tensor:
    """bool [B, S]: positions that are real tokens (not padding)."""
    if scenario in ("right_padding", "left_padding"):
        return padding(B, S, [0, 5, 11], scenario.split("_")[0]).bool()
    return torch.ones(B, S, dtype=torch.bool)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager_float32(float32_kernels, family, scenario):
    """Forward passes (padding, packing) and decoding with a cache (Sq = 16 with Sk = 117, then Sq = 1): the logits
    of real tokens equal eager's. Left-padded rows get 0 from attngen and the mean of V from eager; nothing attends
    to them, so only their own logits differ."""
    agm, eager = models_fp32(family)
    ours, theirs = run_scenario(agm, scenario), run_scenario(eager, scenario)
    rows = real_rows(scenario, *ours.shape[:2]) if ours.shape[1] == 24 else torch.ones(ours.shape[:2], dtype=bool)
    assert_exact(ours[rows], theirs[rows], f"{family} {scenario}")
    shapes = {c.shapes for c in float32_kernels.calls}
    if scenario.startswith("decode"):
        assert any(s[0][2] == 16 and s[1][2] in (117, WINDOW - 1 + 16) for s in shapes)
        assert any(s[0][2] == 1 for s in shapes)
    if scenario == "left_padding":  # the padded rows really are empty for attngen
        assert (~rows).any()


@pytest.mark.parametrize("scenario", ["left_padding", "decode_left_padding"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager_bf16(reference_kernels, family, scenario):
    """The real dtype path: the model in bf16 tracks eager float32 as closely as eager bf16 does."""
    agm, bf, fp = models_bf16(family)
    ours, b16, exact = (run_scenario(m, scenario) for m in (agm, bf, fp))
    rows = real_rows(scenario, *ours.shape[:2]) if ours.shape[1] == 24 else torch.ones(ours.shape[:2], dtype=bool)
    assert_tracks(ours[rows], exact[rows], b16[rows], f"{family} {scenario} logits")


def generate(m, **kw):
    prompt, mask = ids(2, 20).to(m.device), padding(2, 20, [0, 6], "left").to(m.device)
    return m.generate(
        prompt,
        attention_mask=mask,
        max_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kw,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_eager(float32_kernels, family):
    """generate() with a KV cache, greedy, three new tokens, left-padded batch: same tokens, same step logits."""
    agm, eager = models_fp32(family)
    ours, theirs = generate(agm), generate(eager)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        assert_exact(a, b, f"{family} generate step {step}")
    assert any(c.shapes[0][2] == 1 for c in float32_kernels.calls)


def test_generate_bf16_static_cache(reference_kernels):
    """bf16 generation, also with a static cache (every layer gets the whole buffer; the unfilled keys are dropped):
    the first step tracks eager."""
    agm, bf, fp = models_bf16("llama")
    outs = [generate(m) for m in (agm, bf, fp)]
    assert_tracks(*(o.logits[0] for o in outs), "llama generate step 1")
    reference_kernels.calls.clear()
    static = generate(agm, cache_implementation="static")  # a buffer for the prompt's 20 tokens and the new ones
    assert torch.equal(static.sequences, outs[0].sequences)
    # prefill: the 20 filled keys; decoding: the whole buffer (static shapes), its unfilled keys as padding (with the
    # left padding: document ids)
    prefill = {c.shapes[1][2] for c in reference_kernels.calls if c.shapes[0][2] == 20}
    decoding = [c for c in reference_kernels.calls if c.shapes[0][2] == 1]
    assert prefill == {20} and len({c.shapes[1][2] for c in decoding}) == 1 and decoding[0].shapes[1][2] > 21
    assert all(c.prep.document_ids is not None and c.prep.key_lengths is None for c in decoding)


def loss_of(m, input_ids, labels, **kw):
    logits = m(input_ids, use_cache=False, **kw).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def gradients(m, scenario: str) -> dict[str, torch.Tensor]:
    """Parameter gradients of a loss over real tokens (left-padded rows: the last pad position would predict the first
    real token, and in packed rows a sequence's first token is not predicted from the previous sequence: masked)."""
    x = ids(3, 24)
    kw, labels = {}, x.clone()
    if scenario == "left_padding":
        kw["attention_mask"] = padding(3, 24, [0, 5, 11], "left")
        labels[kw["attention_mask"] == 0] = -100  # pads are not predicted
        labels[:, 1:][kw["attention_mask"][:, :-1] == 0] = -100  # nor predicted from a pad
    else:
        kw["position_ids"] = packed_positions([[10, 14], [24], [3, 9, 12]])
        labels[kw["position_ids"] == 0] = -100
    device = next(m.parameters()).device
    m.train()
    m.zero_grad()
    loss_of(m, x.to(device), labels.to(device), **{k: v.to(device) for k, v in kw.items()}).backward()
    return {n.removeprefix("_orig_mod."): p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scenario", ["left_padding", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_eager_float32(float32_kernels, family, scenario):
    ours, theirs = (gradients(m, scenario) for m in models_fp32(family))
    assert set(ours) == set(theirs) and len(ours) > 10
    for name in theirs:
        assert_exact(ours[name], theirs[name], f"{family} {scenario} grad {name}")
    assert any(c.prep.document_ids is not None for c in float32_kernels.calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_eager_bf16(reference_kernels, family):
    ours, b16, exact = (gradients(m, "left_padding") for m in models_bf16(family))
    for name in exact:
        assert_tracks(ours[name], exact[name], b16[name], f"{family} grad {name}", factor=3.0)


def test_autocast_runs_a_float32_model(reference_kernels):
    """Under bf16 autocast the float32 model's queries reach attngen in float32 (RoPE runs in float32): they are cast
    to the autocast dtype, as autocast does for SDPA."""
    agm, eager = models_fp32("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = agm(ids(2, 24)).logits
    exact = eager(ids(2, 24)).logits
    assert (ours.float() - exact).abs().max() < 0.05 * exact.abs().max()
    assert all(c.shapes and c.pattern == ag.causal() for c in reference_kernels.calls)


# ------------------------------------------------------------------------------------------------ patterns


def eager_nm(scores: torch.Tensor, allowed: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep, in every group of m keys (k // m), the n allowed keys of largest score (written independently of
    attngen: topk over groups padded with -inf)."""
    Sk = scores.shape[-1]
    groups = math.ceil(Sk / m)
    s = scores.masked_fill(~allowed, float("-inf"))
    s = torch.nn.functional.pad(s, (0, groups * m - Sk), value=float("-inf")).unflatten(-1, (groups, m))
    top = s.topk(n, -1).indices
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True) & (s > float("-inf"))
    return keep.flatten(-2)[..., :Sk]


@pytest.fixture(scope="module")
def eager_nm_impl():
    """An eager attention that applies 2:4 selection on the layers listed in `layers`, on top of the model's mask."""
    layers = set()

    def attend(module, query, key, value, attention_mask, scaling=None, **kw):
        allowed = attention_mask == 0
        if module.layer_idx in layers:
            groups = query.shape[1] // key.shape[1]
            k = key.repeat_interleave(groups, 1).float()
            s = (query.float() @ k.transpose(-1, -2)) * scaling
            allowed = allowed & eager_nm(s, allowed, 2, 4)
        return eager_attention(module, query, key, value, allowed, scaling)

    AttentionInterface.register("eager_nm", attend)
    AttentionMaskInterface.register("eager_nm", eager_mask)
    return layers


@pytest.fixture(scope="module")
def eager_window_impl():
    """An eager attention with `sliding_window(4)` on layer 0 and 2:4 on layer 1, on top of the model's mask (queries
    at the end of the keys)."""

    def attend(module, query, key, value, attention_mask, scaling=None, **kw):
        allowed = attention_mask == 0
        positions = torch.arange(key.shape[2], device=key.device)
        own = (allowed * positions).amax(-1, keepdim=True)  # causal: a row's last key is its own
        if module.layer_idx == 0:
            allowed = allowed & (positions > own - 4)
        if module.layer_idx == 1:
            k = key.repeat_interleave(query.shape[1] // key.shape[1], 1).float()
            allowed = allowed & eager_nm((query.float() @ k.transpose(-1, -2)) * scaling, allowed, 2, 4)
        return eager_attention(module, query, key, value, allowed, scaling)

    AttentionInterface.register("eager_window", attend)
    AttentionMaskInterface.register("eager_window", eager_mask)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_set_pattern_nm_on_one_layer(float32_kernels, eager_nm_impl, family):
    """2:4 attention on layer 0 only: the pattern reaching layer 0 is the model's mask & nm(2, 4), the other layers'
    is the model's mask alone, and the logits match an eager 2:4 written here (and differ from dense attention).
    In float32 (see `float32_kernels`): both sides then choose among the same scores."""
    reference_kernels = float32_kernels
    agm, ref = model(family, "attngen"), model(family, "eager_nm")
    x, mask = ids(2, 24), padding(2, 24, [0, 4], "right")

    dense = agm(x, attention_mask=mask).logits
    agt.set_pattern(agm, ag.nm(2, 4), layers=[0])
    assert agt.get_patterns(agm) == {0: ag.nm(2, 4)}
    reference_kernels.calls.clear()
    sparse = agm(x, attention_mask=mask).logits
    patterns = [repr(c.pattern) for c in reference_kernels.calls]
    n_layers = agm.config.num_hidden_layers
    assert len(patterns) == n_layers and patterns[0].endswith("& nm(2, 4)")
    assert all("nm(" not in p for p in patterns[1:])
    assert "key_padding()" in patterns[0]

    eager_nm_impl.clear()
    eager_nm_impl.add(0)
    exact = ref(x, attention_mask=mask).logits
    eager_nm_impl.clear()
    exact_dense = ref(x, attention_mask=mask).logits
    rows = mask.bool()
    assert_exact(sparse[rows], exact[rows], f"{family} 2:4 on layer 0")
    assert_exact(dense[rows], exact_dense[rows], f"{family} dense")
    assert (exact[rows] - exact_dense[rows]).abs().max() > 0.1  # 2:4 changes the result

    agt.set_pattern(agm, None)  # removed: dense again
    assert agt.get_patterns(agm) == {}
    torch.testing.assert_close(agm(x, attention_mask=mask).logits, dense, rtol=0, atol=0)


def test_user_patterns_are_aligned_for_decoding(reference_kernels):
    """A user pattern is read in the square view: in a decoding call (Sq != Sk) query row q is position
    q + Sk - Sq, so `sliding_window(4)` on a layer keeps the last 4 keys during decoding as during prefill."""
    agm = model("llama", "attngen", torch.bfloat16)
    agt.set_pattern(agm, ag.sliding_window(4))
    cache = DynamicCache(config=agm.config)
    with torch.no_grad():
        agm(ids(1, 10), **with_cache(agm, cache))
        reference_kernels.calls.clear()
        agm(ids(1, 1), **with_cache(agm, cache))
    (call, *_) = reference_kernels.calls
    mask = call.pattern.mask(1, 11)
    assert mask[0, 0, 0].tolist() == [False] * 7 + [True] * 4
    assert "bottom_right(sliding_window(4))" in repr(call.pattern)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_user_patterns_while_generating(float32_kernels, eager_window_impl, cache):
    """`sliding_window(4)` and 2:4 put on layers of a model that generates: prefill and every decoding step (a static
    cache's buffer included) give the eager result of the same rules."""
    agm, ref = model("llama", "attngen"), model("llama", "eager_window")
    agt.set_pattern(agm, ag.sliding_window(4), layers=[0])
    agt.set_pattern(agm, ag.nm(2, 4), layers=[1])
    ours, theirs = generate(agm, cache_implementation=cache), generate(ref, cache_implementation=cache)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        assert_exact(a, b, f"{cache} cache, step {step}")
    decoding = [c for c in float32_kernels.calls if c.shapes[0][2] == 1]
    assert {"sliding_window(4)" in repr(c.pattern) for c in decoding} == {True, False}


def test_set_pattern_validates():
    agm = model("llama", "attngen", torch.bfloat16)
    with pytest.raises(InputError, match="attngen pattern"):
        agt.set_pattern(agm, "causal()")
    with pytest.raises(InputError, match="from 0 to 1"):
        agt.set_pattern(agm, ag.nm(2, 4), layers=[2])
    with pytest.raises(InputError, match="from 0 to 1"):
        agt.set_pattern(agm, ag.nm(2, 4), layers=[-1])
    with pytest.raises(InputError, match="list of layer indices"):
        agt.set_pattern(agm, ag.nm(2, 4), layers=0)
    with pytest.raises(InputError, match="call-time tensors"):
        agt.set_pattern(agm, ag.documents())
    with pytest.raises(InputError, match="nests a selection rule"):
        agt.set_pattern(agm, ag.nm(2, 4) | ag.global_tokens(2))
    with pytest.raises(InputError, match="attn_implementation='attngen'"):
        agt.set_pattern(model("llama", "eager"), ag.nm(2, 4))
    agt.set_pattern(agm, ag.nm(2, 4), layers=[1])
    agt.set_pattern(agm, ag.global_tokens(2), layers=[0])
    assert agt.get_patterns(agm) == {0: ag.global_tokens(2), 1: ag.nm(2, 4)}


# -------------------------------------------------------------------------------------------------- errors


def test_gemma2_softcapping_runs_as_a_score_modification(float32_kernels):
    """Gemma-2 with attn_logit_softcapping (a cap of 0.5, so that it bites): attngen's calls cap the scores, and
    logits and gradients match eager attention, which caps the logits itself."""
    agm, eager = models_fp32("gemma2", attn_logit_softcapping=0.5)
    x = ids(2, 24)
    ours, theirs = agm(x).logits, eager(x).logits
    assert_exact(ours, theirs, "gemma2 softcapped logits")
    assert float32_kernels.calls  # attngen's attention ran
    plain = model("gemma2", "attngen", attn_logit_softcapping=None)  # the same weights without the cap
    with torch.no_grad():
        assert not torch.allclose(plain(x).logits, ours, atol=1e-3)
    (ours.square().mean()).backward()
    (theirs.square().mean()).backward()
    for (name, a), b in zip(agm.named_parameters(), eager.parameters()):
        if a.grad is not None:
            assert_exact(a.grad, b.grad, f"gradient of {name}")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_dense_4d_mask_runs_as_a_bias(float32_kernels, kind):
    """A custom 4-D mask handed to the model (causal with holes, each row keeping its own token; bool or additive
    float): attngen adds it as a bias() on a full() pattern, and logits and gradients match those of SDPA (a bool
    mask: True keeps a key; eager attention would add it as 0 / 1) or of eager attention (a float mask)."""
    agm, eager = model("llama", "attngen"), model("llama", "sdpa" if kind == "bool" else "eager")
    x = ids(2, 20)
    gen = torch.Generator().manual_seed(3)
    keep = torch.ones(20, 20, dtype=torch.bool).tril() & (torch.rand(2, 1, 20, 20, generator=gen) < 0.7)
    keep |= torch.eye(20, dtype=torch.bool)
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    ours, theirs = agm(x, attention_mask=mask).logits, eager(x, attention_mask=mask).logits
    assert_exact(ours, theirs, f"logits with a dense {kind} mask")
    assert any(type(m).__name__ == "BoundBias" for c in float32_kernels.calls for m in c.mods)  # it ran as a bias
    (ours.square().mean()).backward()
    (theirs.square().mean()).backward()
    for (name, a), b in zip(agm.named_parameters(), eager.parameters()):
        if a.grad is not None:
            assert_exact(a.grad, b.grad, f"gradient of {name}")


def test_unsupported_settings_raise(reference_kernels):
    with pytest.raises(InputError, match="fp16 and bf16"):
        model("llama", "attngen", torch.float32)(ids(1, 8))
    with pytest.raises(InputError, match="head dim 48"):
        model("llama", "attngen", torch.bfloat16, head_dim=48)(ids(1, 8))
    dropout = model("llama", "attngen", torch.bfloat16, attention_dropout=0.1).train()
    with pytest.raises(InputError, match="dropout"):
        dropout(ids(1, 8))
    agm = model("llama", "attngen", torch.bfloat16)
    with pytest.raises(InputError, match="output_attentions"):
        agm(ids(1, 8), output_attentions=True)
    with pytest.raises(InputError, match="dense attention mask must be"):
        agm(ids(1, 8), attention_mask=torch.ones(1, 1, 8, 7, dtype=torch.bool))


def test_unknown_mask_parts_are_refused():
    """A mask function attngen does not know (here a custom or_mask_function) is refused, never ignored."""
    from transformers.masking_utils import causal_mask_function, or_masks

    custom = or_masks(causal_mask_function, lambda b, h, q, k: k == 0)
    with pytest.raises(InputError, match="or_masks"):
        agt.attngen_mask(1, 8, 8, q_offset=0, kv_offset=0, mask_function=custom)


def test_cuda_is_required_without_the_reference():
    """Without the fixture the kernels are real: CPU tensors are refused (no silent fallback to another backend)."""
    agm = model("llama", "attngen", torch.bfloat16)
    with pytest.raises(InputError, match="CUDA"):
        agm(ids(1, 8))


def test_register_is_idempotent():
    agt.register()
    agt.register()
    assert AttentionInterface._global_mapping["attngen"] is agt.attngen_attention
    assert AttentionMaskInterface._global_mapping["attngen"] is agt.attngen_mask


def test_pattern_lookup_is_cheap(reference_kernels):
    """A layer call's pattern is looked up, not rebuilt: the second forward pass builds no pattern."""
    agm = model("qwen2", "attngen", torch.bfloat16)
    agt.set_pattern(agm, ag.nm(2, 4), layers=[1])
    agm(ids(2, 24), attention_mask=padding(2, 24, [0, 3], "left"))
    built = len(agt._BY_NAME)
    calls = reference_kernels.calls
    first = [c.pattern for c in calls]
    calls.clear()
    agm(ids(2, 24), attention_mask=padding(2, 24, [0, 3], "left"))
    assert len(agt._BY_NAME) == built and [c.pattern for c in calls] == first


def test_compiled_training_step(float32_kernels):
    """torch.compile(model) (CPU, eager backend): a left-padded training step runs through the custom op (traced;
    the mask builder is a graph break) and gives eager's gradients; the attention layers trace without a break."""
    agm, eager = models_fp32("qwen2")
    compiled = torch.compile(agm, backend="eager")
    ours, theirs = (gradients(m, "left_padding") for m in (compiled, eager))
    for name in theirs:
        assert_exact(ours[name], theirs[name], f"compiled grad {name}")
    torch._dynamo.reset()
    x, mask = ids(3, 24), padding(3, 24, [0, 5, 11], "left")
    explained = torch._dynamo.explain(agm)(x, attention_mask=mask, use_cache=False)
    where = {f.name for b in explained.break_reasons for f in b.user_stack[-1:]}
    assert where <= {"create_causal_mask", "create_sliding_window_causal_mask"}, where
    torch._dynamo.reset()


def test_copy_keeps_patterns():
    agm = model("llama", "attngen", torch.bfloat16)
    agt.set_pattern(agm, ag.nm(2, 4), layers=[0])
    assert agt.get_patterns(copy.deepcopy(agm)) == {0: ag.nm(2, 4)}
