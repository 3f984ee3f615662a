"""in_document(pattern): an affine pattern on positions counted from each document's first token, within documents.
The positions (against a token-by-token oracle), the pattern and its refusals, the mask, the kernels' arguments,
calls end to end with the kernels replaced by the reference, block top-k in such a context, and compiles without
spills. The C lowering is in tests/test_lower.py's random cases, the tile classes in tests/test_schedule.py, the
GPU test in tests/test_kernels_gpu.py."""

from __future__ import annotations

import pytest
import torch
from test_lower import document_offsets_oracle
from test_nm_compile import assert_no_spills

import attngen as ag
from attngen import bind, prepare, reference
from attngen.errors import InputError
from attngen.pattern import document_offsets
from attngen.plan import make_plan


def _packed(B: int, S: int, seed: int, rate: float = 0.03) -> torch.Tensor:
    return (torch.rand(B, S, generator=torch.Generator().manual_seed(seed)) < rate).cumsum(-1)


@pytest.mark.parametrize(
    "ids",
    [
        _packed(3, 200, 0),
        torch.randint(0, 4, (2, 150), generator=torch.Generator().manual_seed(1)),  # a document in pieces
        torch.zeros(97, dtype=torch.int32),
        torch.arange(50),  # one token per document
        torch.tensor([[5, 5, -2, -2, -2, 5, 2**31 - 1]]),
    ],
    ids=["packed", "scattered", "one document", "singletons", "any ids"],
)
def test_positions_count_the_earlier_tokens_of_the_document(ids):
    S = ids.shape[-1]
    got = document_offsets(ids, S, S)
    assert got.dtype == torch.int64 and torch.equal(got, document_offsets_oracle(ids))


def test_the_pattern_and_its_structure():
    per_doc = ag.in_document(ag.prefix_lm(16))
    assert repr(per_doc) == "in_document(prefix_lm(16))"
    assert per_doc.runtime_inputs == {"document_ids"}
    assert per_doc.structure() == ag.in_document(ag.prefix_lm(16)).structure()
    assert per_doc.structure() != ag.in_document(ag.prefix_lm(17)).structure()
    assert repr(ag.in_document(ag.causal() & ~ag.local(0, 3)) | ag.sliding_window(8)) == (
        "in_document(causal() & ~local(0, 3)) | sliding_window(8)"
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ag.in_document(ag.causal(align="bottom_right")), "no Sq or Sk"),
        (lambda: ag.in_document(ag.predicate("k < Sk - 4")), "no Sq or Sk"),
        (lambda: ag.in_document(ag.documents()), "takes an affine pattern"),
        (lambda: ag.in_document(ag.causal() & ag.nm(2, 4)), "takes an affine pattern"),
        (lambda: ag.in_document(ag.block_layout(torch.ones(2, 2, dtype=torch.bool), 64)), "takes an affine pattern"),
    ],
)
def test_what_in_document_refuses(make, match):
    with pytest.raises(InputError, match=match):
        make()
    with pytest.raises(TypeError, match="patterns combine only with patterns"):
        ag.in_document("causal()")


def test_the_mask_is_the_pattern_inside_each_document():
    """Per-document prefix LM over documents of 5, 3 and 4 tokens: the first 2 tokens of a document see each other,
    the rest is causal, all within the document."""
    ids = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    got = ag.in_document(ag.prefix_lm(2)).mask(12, 12, document_ids=ids)[0, 0]
    want = torch.zeros(12, 12, dtype=torch.bool)
    for start, n in ((0, 5), (5, 3), (8, 4)):
        for i in range(n):
            for j in range(n):
                want[start + i, start + j] = j < 2 or j <= i
    assert torch.equal(got, want)
    # a causal mask that restarts in each document is documents() & causal() on packed ids
    causal = ag.in_document(ag.causal()).mask(12, 12, document_ids=ids)
    assert torch.equal(causal, (ag.documents() & ag.causal()).mask(12, 12, document_ids=ids))


def test_without_one_sequence_the_positions_are_given():
    """Positions within documents are counted on one sequence; with a (query, key) pair of ids (Sq != Sk: decoding
    with a cache) the call passes them, checked like the ids."""
    q = torch.zeros(1, 2, 40, 64, dtype=torch.float16)
    k = torch.zeros(1, 2, 30, 64, dtype=torch.float16)
    pat = ag.in_document(ag.causal())
    pair = (torch.zeros(40, dtype=torch.int64), torch.zeros(30, dtype=torch.int64))
    inputs = {"key_lengths": None, "document_ids": pair}
    with pytest.raises(InputError, match=r"Sq=40, Sk=30: pass document_positions="):
        prepare.prepare(pat, q, k, inputs)
    with pytest.raises(InputError, match="a \\(query, key\\) pair of ids: pass document_positions="):
        prepare.prepare(pat, q, q, {**inputs, "document_ids": (pair[0], pair[0])})
    with pytest.raises(InputError, match=r"needs document_ids="):
        prepare.prepare(pat, q, q, {"document_ids": None, "key_lengths": None})
    with pytest.raises(InputError, match=r"document_positions \(key\) must be a \[B, 30\] or \[30\]"):
        prepare.prepare(pat, q, k, {**inputs, "document_positions": (torch.arange(40), torch.arange(29))})
    with pytest.raises(InputError, match=r"with Sq != Sk pass document_positions=\(query_positions, key_positions\)"):
        prepare.prepare(pat, q, k, {**inputs, "document_positions": torch.arange(40)})
    with pytest.raises(InputError, match="must be integers"):
        prepare.prepare(pat, q, k, {**inputs, "document_positions": (torch.zeros(40), torch.zeros(30))})
    with pytest.raises(InputError, match="does not use it"):
        prepare.prepare(ag.documents(), q, k, {**inputs, "document_positions": (torch.arange(40), torch.arange(30))})
    prep = prepare.prepare(pat, q, k, {**inputs, "document_positions": (torch.arange(40), torch.arange(30))})
    assert [t.shape for t in prep.document_ids] == [(1, 40), (1, 30), (1, 40), (1, 30)]


def test_decoding_with_a_cache_matches_the_whole_sequence(reference_kernels):
    """The last 7 queries over 90 cached keys, with their ids and positions sliced from the whole sequence's: the
    same rows as attending over the whole sequence."""
    gen = torch.Generator().manual_seed(10)
    S, n = 90, 7
    ids = _packed(2, S, 11, rate=0.06)
    within = document_offsets(ids, S, S)
    pat = ag.in_document(ag.prefix_lm(6) & ag.sliding_window(30))
    q = torch.randn(2, 4, S, 32, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, S, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    whole = ag.attention(q, k, v, pat, document_ids=ids)
    last = ag.attention(
        q[:, :, -n:], k, v, pat, document_ids=(ids[:, -n:], ids), document_positions=(within[:, -n:], within)
    )
    assert (last.float() - whole[:, :, -n:].float()).abs().max() < 1e-2
    want, _ = reference.attention(
        q[:, :, -n:], k, v, pat, dtype=torch.float64, document_ids=(ids[:, -n:], ids),
        document_positions=(within[:, -n:], within),
    )  # fmt: skip
    assert (last.double() - want).abs().max() < 2e-2


def test_the_kernels_read_positions_beside_the_ids():
    """The plan's arguments: ids, then positions within documents, each with its batch stride (0 for one row for
    every batch element), bound from what `prepare` computed."""
    pat = ag.in_document(ag.global_tokens(4)) & ag.causal()
    plan = make_plan(pat, head_dim=64, dtype="bf16", arch="sm_90")
    names = [a.name for a in plan.runtime_args]
    assert names == ["qdoc", "qdoc_sb", "kdoc", "kdoc_sb", "qoff", "qoff_sb", "koff", "koff_sb"]
    assert "koff[b * koff_sb + k] < 4" in plan.mask_c and "qoff[b * qoff_sb + q] < 4" in plan.mask_c
    plain = make_plan(ag.documents() & ag.causal(), head_dim=64, dtype="bf16", arch="sm_90")
    assert [a.name for a in plain.runtime_args] == names[:4]  # documents() alone: no positions
    for ids, stride in ((_packed(3, 90, 2), 90), (_packed(1, 90, 2)[0], 0)):
        q = torch.zeros(3, 2, 90, 64, dtype=torch.bfloat16)
        prep = prepare.prepare(pat, q, q, {"document_ids": ids, "key_lengths": None})
        *_ids, qo, ko = prep.document_ids
        assert qo.dtype == torch.int32 and torch.equal(qo.long(), document_offsets_oracle(ids)) and qo is ko
        values = bind.runtime_values(plan, prep, 2)
        assert [int(v) for v in values[1::2]] == [stride] * 4
        assert int(values[4]) == qo.data_ptr() and int(values[6]) == ko.data_ptr()


@pytest.mark.parametrize(
    "pat",
    [
        ag.in_document(ag.prefix_lm(12)),
        ag.in_document(ag.predicate("q // 16 == k // 16") & ag.causal()) | ag.sliding_window(5),
        ag.in_document(ag.global_tokens(3)) & ag.causal(),
        ~ag.in_document(ag.sliding_window(20)) & ag.causal(),
    ],
    ids=repr,
)
def test_calls_match_the_reference(pat, reference_kernels):
    """Through attngen.attention (the kernels replaced by the float32 reference): out and gradients equal the
    float64 reference, with GQA and ids per batch element; the op receives the positions within documents."""
    gen = torch.Generator().manual_seed(6)
    B, S = 2, 100
    ids = _packed(B, S, 7, rate=0.05)
    q = torch.randn(B, 4, S, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(B, 2, S, 32, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(2))
    out = ag.attention(q, k, v, pat, document_ids=ids)
    want, _ = reference.attention(q, k, v, pat, dtype=torch.float64, document_ids=ids)
    assert (out.double() - want).abs().max() < 2e-2
    assert torch.equal(reference_kernels.calls[-1].prep.document_ids[2].long(), document_offsets_oracle(ids))
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    got, ref = torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout.double())
    for g, r in zip(got, ref):
        assert ((g.double() - r).norm() / r.norm()) < 2e-2


def test_block_top_k_chooses_among_the_blocks_in_document_allows(reference_kernels):  # lifts the CUDA refusal
    """`in_document(global_tokens(8)) & topk_blocks(1)`: a block is a candidate only where some pair of it is in one
    document and has a global token; with 4 documents of 64 tokens only the diagonal blocks are."""
    ids = torch.arange(4).repeat_interleave(64)
    pat = ag.in_document(ag.global_tokens(8)) & ag.topk_blocks(1, block=64)
    q, k = (torch.randn(1, 2, 256, 32, generator=torch.Generator().manual_seed(8)) for _ in range(2))
    chosen = ag.selected_blocks(q.half(), k.half(), pat, document_ids=ids)
    assert torch.equal(chosen, torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles_without_spills(arch):
    pat = ag.in_document(ag.predicate("q // 64 == k // 64") & ag.causal()) | ag.sliding_window(20)
    assert_no_spills(ag.compile(pat, head_dim=128, dtype=torch.bfloat16, arch=arch))
