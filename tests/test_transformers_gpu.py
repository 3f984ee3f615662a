"""GPU: tiny random Llama, Qwen2, Mistral and Gemma-2 models with attn_implementation="attngen" in bf16 on CUDA,
running attngen's kernels, against attn_implementation="sdpa" (Gemma-2: "eager"; transformers has no SDPA path for
it) on the same weights: forward logits with padding and packing, decoding with a cache, generate(), parameter
gradients, and 2:4 attention on one layer. The yardstick is float32 eager attention on the same weights: attngen must
be as close to it as the bf16 baseline is (`assert_tracks`). The models, inputs and helpers are those of the CPU
tests (test_transformers.py), with head dim 64 (Hopper's TMA + wgmma kernels). Skipped cleanly without a GPU."""

import pytest
import torch

import attngen as ag

pytest.importorskip("transformers")

from test_transformers import (
    FAMILIES,
    agt,
    assert_tracks,
    eager_nm_impl,  # noqa: F401 (a fixture)
    generate,
    gradients,
    model,
    real_rows,
    run_scenario,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HEAD_DIM = 64


def baseline(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"


def trio(family: str, impl: str = "attngen"):
    """(`impl` bf16, the bf16 baseline, eager float32) on CUDA, on the same bf16-rounded weights."""
    ours = model(family, impl, torch.bfloat16, head_dim=HEAD_DIM).cuda()
    base = model(family, baseline(family), torch.bfloat16, head_dim=HEAD_DIM).cuda()
    exact = model(family, "eager", torch.float32, head_dim=HEAD_DIM).cuda()
    exact.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    return ours, base, exact


@pytest.mark.parametrize("scenario", ["no_mask", "right_padding", "left_padding", "packed", "decode_left_padding"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_track_sdpa(family, scenario):
    ours, base, exact = (run_scenario(m, scenario).float().cpu() for m in trio(family))
    assert torch.isfinite(ours).all()
    rows = real_rows(scenario, *ours.shape[:2]) if ours.shape[1] == 24 else torch.ones(ours.shape[:2], dtype=bool)
    assert_tracks(ours[rows], exact[rows], base[rows], f"{family} {scenario}")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_tracks_sdpa(family):
    ours, base, exact = (generate(m) for m in trio(family))
    assert_tracks(*(o.logits[0].cpu() for o in (ours, base, exact)), f"{family} generate step 1")
    top2 = exact.logits[0].float().topk(2, -1).values
    if (top2[:, 0] - top2[:, 1]).min() > 0.2:  # no near-tie: greedy picks the same first token
        assert torch.equal(ours.sequences[:, :21], exact.sequences[:, :21])


@pytest.mark.parametrize("scenario", ["left_padding", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_track_sdpa(family, scenario):
    ours, base, exact = (gradients(m, scenario) for m in trio(family))
    assert set(ours) == set(exact)
    for name in exact:
        assert torch.isfinite(ours[name]).all(), name
        assert_tracks(ours[name].cpu(), exact[name].cpu(), base[name].cpu(), f"{family} {scenario} {name}", 3.0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_nm_on_one_layer_tracks_eager(eager_nm_impl, family):  # noqa: F811 (the imported fixture)
    """2:4 attention on layer 0 against the eager 2:4 of the CPU tests (bf16 and float32 on the same weights): layer 0
    sees the same inputs in every model, so the kernels choose the keys the eager version chooses."""
    ours = model(family, "attngen", torch.bfloat16, head_dim=HEAD_DIM).cuda()
    base = model(family, "eager_nm", torch.bfloat16, head_dim=HEAD_DIM).cuda()
    exact = model(family, "eager_nm", torch.float32, head_dim=HEAD_DIM).cuda()
    exact.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    agt.set_pattern(ours, ag.nm(2, 4), layers=[0])
    eager_nm_impl.clear()
    eager_nm_impl.add(0)
    logits = [run_scenario(m, "right_padding").float().cpu() for m in (ours, base, exact)]
    eager_nm_impl.clear()
    rows = real_rows("right_padding", *logits[0].shape[:2])
    assert_tracks(*(t[rows] for t in logits), f"{family} 2:4 on layer 0")
