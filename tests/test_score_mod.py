"""Score modifications (`softcap`, `alibi`) on the CPU: their reference semantics, the call-time checks, the plan and
the emitted CUDA, and every kernel compiled (NVRTC, no GPU needed) without spills or a stack frame in both kernel
families. tests/test_score_mod_gpu.py checks the kernels against the reference."""

import math

import pytest
import torch
from test_nm_compile import assert_no_spills

import attngen as ag
from attngen import reference, scoremod
from attngen.errors import InputError
from attngen.plan import make_plan

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def test_softcap_and_alibi_reference_semantics():
    """s -> c·tanh(s/c), then s + slopes[h]·(k - q') in the order given; q' = q + Sk - Sq bottom-right."""
    s = torch.randn(1, 4, 3, 5, dtype=torch.float64) * 40
    capped = scoremod.reference((ag.softcap(30.0),), s)
    assert torch.allclose(capped, 30 * torch.tanh(s / 30))
    assert capped.abs().max() < 30
    shifted = scoremod.reference((ag.alibi(SLOPES, "bottom_right"),), s)
    h, i, j = 2, 1, 4
    assert math.isclose(shifted[0, h, i, j] - s[0, h, i, j], SLOPES[h].item() * (j - (i + 5 - 3)))
    both = scoremod.reference((ag.alibi(SLOPES), ag.softcap(30.0)), s)
    assert torch.allclose(both, 30 * torch.tanh(scoremod.reference((ag.alibi(SLOPES),), s) / 30))


def test_reference_attention_applies_them_before_the_pattern():
    q, k, v = (torch.randn(1, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    mods = (ag.alibi(SLOPES), ag.softcap(5.0))
    out, lse = reference.attention(q, k, v, ag.causal(), score_mod=mods)
    s = scoremod.reference(mods, q @ k.transpose(-1, -2) / math.sqrt(8))
    s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(out, torch.softmax(s, -1) @ v) and torch.allclose(lse, torch.logsumexp(s, -1))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: ag.softcap(0), "positive finite"),
        (lambda: ag.softcap(float("inf")), "positive finite"),
        (lambda: ag.softcap("3"), "positive finite"),
        (lambda: ag.alibi(torch.ones(2, 2)), "1-d float tensor"),
        (lambda: ag.alibi(torch.ones(4, dtype=torch.int32)), "1-d float tensor"),
        (lambda: ag.alibi(SLOPES, align="middle"), "align"),
        (lambda: scoremod.normalize((ag.softcap(1.0), ag.softcap(2.0))), "at most one softcap"),
        (lambda: scoremod.normalize(torch.tanh), "score_mod takes"),
        (lambda: scoremod.check_call((ag.alibi(SLOPES),), torch.zeros(1, 3, 4, 8)), "one per query head"),
    ],
)
def test_bad_modifications_are_refused(bad, match):
    with pytest.raises(InputError, match=match):
        bad()


def test_plan_carries_the_modifications_and_alibi_slopes_are_a_runtime_argument():
    p = make_plan(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90", score_mods=(ag.alibi(SLOPES), ag.softcap(50.0)))
    assert p.score_mods == (scoremod.AlibiSlot(), ag.softcap(50.0)) and p.mod_grad
    assert [a.name for a in p.runtime_args] == ["alibi_slopes"]
    assert "score mod alibi(), softcap(50.0)" in str(p)
    # new slopes are data: the same structure, one compile
    other = make_plan(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90", score_mods=(ag.alibi(SLOPES * 2),))
    assert other.score_mods == (scoremod.AlibiSlot(),) and not other.mod_grad


def test_gather_kernels_give_way_and_reordered_patterns_are_refused():
    """key_indices() with a modification runs on the tile kernels (lists as bits); buckets refuse it."""
    capped = (ag.softcap(9.0),)
    p = make_plan(ag.causal() & ag.key_indices(), head_dim=64, dtype="fp16", arch="sm_80", score_mods=capped)
    assert p.gather is None and "kbits" in [a.name for a in p.runtime_args]
    with pytest.raises(InputError, match="reordered"):
        make_plan(ag.causal() & ag.buckets(), head_dim=64, dtype="fp16", arch="sm_80", score_mods=capped)


KERNELS = {
    "causal softcap": (ag.causal(), (ag.softcap(30.0),)),
    "window alibi": (ag.sliding_window(100), (ag.alibi(SLOPES),)),
    "full alibi softcap": (ag.full(), (ag.alibi(SLOPES, "bottom_right"), ag.softcap(20.0))),
    "causal nm softcap": (ag.causal() & ag.nm(2, 4), (ag.softcap(30.0),)),
}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_compile_with_the_hooks_and_without_spills(name, head_dim, arch):
    pat, mods = KERNELS[name]
    kern = ag.compile(pat, head_dim=head_dim, dtype="bf16", arch=arch, score_mod=mods)
    fwd, bwd = kern.source, kern.backward_source
    assert "struct ScoreMod" in fwd and "mod.apply(" in fwd and bwd.count("mod.apply(") == 2
    grads = bwd.count("mod.grad(") + bwd.count("mod.grad_of_p(")
    assert grads == (2 if any(isinstance(m, scoremod.Softcap) for m in mods) else 0)
    assert_no_spills(kern)


def test_without_modifications_the_kernels_are_unchanged():
    plain = ag.compile(ag.causal(), head_dim=64, dtype="bf16", arch="sm_90")
    assert "ScoreMod" not in plain.source and "ScoreMod" not in plain.backward_source
