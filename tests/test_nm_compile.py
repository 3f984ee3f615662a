"""Every N:M kernel compiles (NVRTC, no GPU needed) for the mma.sync family (sm_80) and Hopper (sm_90: wgmma for head
dims 64, 128 and 256's forward) with no spills and no stack frame; the forward runs P·V on the sparse instruction of
its family (the rule choosing as P is compressed), and the backward kernels carry the rule's hook."""

import pytest

import attngen as ag
from attngen.plan import HEAD_DIMS

PATTERNS = {"causal&nm24": ag.causal() & ag.nm(2, 4), "documents&nm12": ag.documents() & ag.nm(1, 2)}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_nm_kernels_compile_sparse_and_without_spills(name, head_dim, arch):
    kern = ag.compile(PATTERNS[name], head_dim=head_dim, dtype="fp16", arch=arch)
    fwd, bwd = kern.source, kern.backward_source
    wgmma = arch == "sm_90" and head_dim in (64, 128, 256)
    assert ("wgmma.mma_async.sp.sync" if wgmma else "mma.sp::ordered_metadata") in fwd
    assert "mma.sync.aligned.m16n8k16" not in fwd.split("O += P V")[-1]  # no dense P·V after the sparse one
    assert "struct Select" in fwd and "select.group_keep(" in fwd  # the rule's choice, made as P is compressed
    assert "struct Select" in bwd and "select.apply(" in bwd  # the same choice, on the recomputed scores
    n, m = kern.kernel_plan.select.param("n"), kern.kernel_plan.select.param("m")
    assert f"N = {n}, M = {m}" in fwd and f"N = {n}, M = {m}" in bwd
    assert_no_spills(kern)


def assert_no_spills(kern) -> None:
    """Every kernel of an `attngen.compile` result, forward and backward: no spills and no stack frame."""
    binaries = {"attngen_fwd": kern.forward_binary}
    binaries |= {e: kern.backward_binary for e in ("attngen_bwd_preprocess", "attngen_bwd_dkdv", "attngen_bwd_dq")}
    for entry, binary in binaries.items():
        res = binary.resources_of(entry)
        assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"{entry}: {res}"


def test_nm_bf16_uses_the_bf16_sparse_instructions():
    for arch, instr in (("sm_80", "m16n8k32.row.col.f32.bf16.bf16.f32"), ("sm_90", "k32.f32.bf16.bf16")):
        kern = ag.compile(ag.nm(2, 4), head_dim=64, dtype="bf16", arch=arch)
        assert instr in kern.source
