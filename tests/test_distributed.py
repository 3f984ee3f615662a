"""Context parallelism on the CPU: the block plan (who computes what, who talks to whom) and, in several processes
with the gloo back end, the exchanges, the LSE merge and the backward's shares against single-process reference
attention on the whole sequence. The kernels of one block are replaced by the float64 reference (the block's
forward, and its backward given the merged output and LSE: exactly what the kernels compute), so everything around
them runs as it does on GPUs."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attngen as ag
from attngen import distributed as D
from attngen import reference, scoremod
from attngen.errors import InputError
from attngen.pattern import dense_mask
from attngen.select import split_selection

# ------------------------------------------------------------------------------------------------------- plans


def test_causal_plan_contiguous_and_zigzag():
    p = D.plan(ag.causal(), 4, 64, "contiguous")
    assert [p.needs(r) for r in range(4)] == [(), (0,), (0, 1), (0, 1, 2)]
    assert [len(b) for b in p.blocks] == [1, 2, 3, 4]  # unbalanced
    z = D.plan(ag.causal(), 4, 64, "zigzag")
    assert len({len(b) for b in z.blocks}) == 1  # zigzag: every rank computes 2·world + 1 blocks
    assert all(len(b) == 9 for b in z.blocks)
    assert all(b.owner == r for r, blocks in enumerate(z.blocks) for b in blocks[:2])  # local keys first


def test_sliding_window_talks_to_neighbours_only():
    for world in (2, 4, 8):
        p = D.plan(ag.sliding_window(32), world, 64, "contiguous")
        assert [p.needs(r) for r in range(world)] == [()] + [(r - 1,) for r in range(1, world)]
        assert [p.users(r) for r in range(world)] == [(r + 1,) for r in range(world - 1)] + [()]


def test_blocks_carry_the_pattern_moved_to_them():
    """Each block's pattern, on its rectangle's own positions, is the whole sequence's mask there; the rest of its
    chunk pair, and the blocks left out, are empty."""
    pat = ag.sliding_window(20) | ag.global_tokens(3)
    world, shard_len = 3, 32
    S = world * shard_len
    whole = dense_mask(pat, S, S)[0, 0]
    for layout in D.LAYOUTS:
        p = D.plan(pat, world, shard_len, layout, tile=4)
        L = p.chunk
        covered = torch.zeros(S, S, dtype=torch.bool)
        trimmed = 0
        for rank, blocks in enumerate(p.blocks):
            for bl in blocks:
                a = D.chunks_of(layout, world, rank)[bl.q_slot] * L
                b = D.chunks_of(layout, world, bl.owner)[bl.k_slot] * L
                (r0, r1), (k0, k1) = bl.rows, bl.keys
                got = dense_mask(bl.pattern, r1 - r0, k1 - k0)[0, 0]
                assert torch.equal(got, whole[a + r0 : a + r1, b + k0 : b + k1])
                covered[a + r0 : a + r1, b + k0 : b + k1] = True
                trimmed += (r1 - r0) * (k1 - k0) < L * L
        assert not (whole & ~covered).any()
        assert trimmed  # some blocks are smaller than their chunk pair


def test_window_blocks_read_only_the_window():
    """sliding_window(8192) over 2 ranks of 131072 positions: rank 1's block on rank 0's keys covers the window's
    8192 rows and keys only, and rank 0 sends just those keys."""
    p = D.plan(ag.sliding_window(8192), 2, 131072, "contiguous")
    (off,) = [bl for bl in p.blocks[1] if bl.owner == 0]
    assert off.rows == (0, 8192) and off.keys == (131072 - 8192, 131072)
    assert p.span(0, 1) == (131072 - 8192, 131072)
    assert p.span(1, 1) == (0, 131072)


def test_blocks_between_unrelated_documents_are_dropped():
    """Packed documents: blocks whose query and key chunks share no document are neither computed nor exchanged."""
    world, shard_len = 4, 16
    ids = torch.arange(world * shard_len) // (2 * shard_len)  # documents of two chunks each
    pat = ag.documents() & ag.causal()
    p = D.skip_unrelated_documents(D.plan(pat, world, shard_len), pat, ids)
    assert [p.needs(r) for r in range(world)] == [(), (0,), (), (2,)]
    assert [len(b) for b in p.blocks] == [1, 2, 1, 2]
    batched = torch.stack([ids, torch.zeros_like(ids)])  # one batch element is a single document: nothing dropped
    assert D.skip_unrelated_documents(D.plan(pat, world, shard_len), pat, batched) == D.plan(pat, world, shard_len)
    either = ag.documents() | ag.global_tokens(2)  # documents under |: a shared one is not required
    assert D.skip_unrelated_documents(D.plan(either, world, shard_len), either, ids) == D.plan(either, world, shard_len)
    within = ag.in_document(ag.causal()) & ag.causal()  # in_document() requires a shared document too
    p = D.skip_unrelated_documents(D.plan(within, world, shard_len), within, ids)
    assert [p.needs(r) for r in range(world)] == [(), (0,), (), (2,)]


def test_plan_refuses_what_it_cannot_split():
    with pytest.raises(InputError, match="multiple of 48"):
        D.plan(ag.block_layout(torch.ones(4, 4, dtype=torch.bool), 48) & ag.causal(), 2, 64)
    with pytest.raises(InputError, match="lsh through attention"):
        D.plan(ag.causal() & ag.lsh(8, seed=0), 2, 64)
    with pytest.raises(InputError, match="multiple of 4"):
        D.plan(ag.causal() & ag.nm(2, 4), 2, 30)
    with pytest.raises(InputError, match="layout"):
        D.plan(ag.causal(), 2, 64, "striped")
    with pytest.raises(InputError, match="init_process_group"):
        D.attention(*(torch.randn(1, 1, 8, 64) for _ in range(3)), ag.causal())


def test_block_layouts_skip_the_chunk_pairs_they_keep_nothing_of():
    """A block-diagonal layout of 32-position blocks over 4 ranks of 32: each rank computes its own chunk only and
    talks to nobody; each block's layout is the grid from its first blocks on."""
    grid = torch.eye(4, dtype=torch.bool)
    p = D.plan(ag.block_layout(grid, 32) | ag.block_layout(grid, 32) & ag.causal(), 4, 32)  # under | : no skipping
    assert [len(b) for b in p.blocks] == [4, 4, 4, 4]
    p = D.plan(ag.block_layout(grid, 32) & ag.causal(), 4, 32)
    assert [len(b) for b in p.blocks] == [1, 1, 1, 1] and all(p.needs(r) == () for r in range(4))
    (bl,) = p.blocks[2]
    assert torch.equal(dense_mask(bl.pattern, 32, 32)[0, 0], torch.ones(32, 32, dtype=torch.bool).tril())


def test_shard_and_unshard_are_inverse():
    x = torch.arange(2 * 3 * 48 * 2).view(2, 3, 48, 2)
    for layout in D.LAYOUTS:
        for world in (1, 2, 3):
            shards = [D.shard(x, world, r, layout) for r in range(world)]
            assert all(s.shape[2] == 48 // world for s in shards)
            assert torch.equal(D.unshard(shards, layout), x)
    assert torch.equal(D.shard(x, 2, 1, "zigzag")[:, :, :12], x[:, :, 12:24])
    assert torch.equal(D.shard(x, 2, 1, "zigzag")[:, :, 12:], x[:, :, 24:36])


# ------------------------------------------------------------------------------ several processes, gloo back end


def ref_block_forward(q, k, v, pat, scale, inputs, mods=(), bias=None):
    return reference.attention(q, k, v, pat, scale=scale, dtype=torch.float64, score_mod=mods, bias=bias, **inputs)


def ref_block_backward(dout, q, k, v, out, lse, pat, scale, inputs, mods=(), bias=None, bias_grad=False):
    """What the backward kernels compute for one block: P = exp(s - lse) over the kept keys, Δ = rowsum(dO ∘ O),
    dS = P ∘ (dP - Δ) (through the score modifications), and dL/ds at the bias's step where wanted. Written as the
    gradient of Σ dO ∘ (P V) - Σ Δ ∘ rowsum(P) with P so defined (lse held fixed), whose gradient in s is that dS."""
    g = q.shape[1] // k.shape[1]
    with torch.enable_grad():  # (a custom autograd function's backward runs without)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        kf, vf = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        probe = None  # dL/ds at the bias's step: the gradient of a full-shaped copy of it
        if bias is not None:
            probe = bias.detach().expand(*q.shape[:3], k.shape[2]).clone().requires_grad_()
        bound = scoremod.bind(scoremod.normalize(mods), q, k.shape[2], bias=probe)
        s = scoremod.reference(bound, scale * q @ kf.transpose(-1, -2))
        positions, rule = split_selection(pat)
        allowed = dense_mask(positions, q.shape[2], k.shape[2], q=q, **inputs)  # q: lists per KV head serve its group
        if rule is not None:
            allowed = allowed & rule.reference_keep(s.detach(), allowed)
        lse = lse.unsqueeze(-1)
        allowed = allowed & torch.isfinite(lse)
        p = torch.exp(s.masked_fill(~allowed, float("-inf")) - torch.where(torch.isinf(lse), 0, lse))
        surrogate = (dout * (p @ vf)).sum() - ((dout * out).sum(-1, keepdim=True) * p).sum()
        wrt = (q, k, v) + ((probe,) if bias_grad else ())
        grads = torch.autograd.grad(surrogate, wrt, allow_unused=True)
    dq, dk, dv = (torch.zeros_like(t) if gr is None else gr for t, gr in zip((q, k, v), grads))
    return dq, dk, dv, (grads[3] if bias_grad else None)


PATTERNS = {
    "causal": ag.causal(),
    "window": ag.sliding_window(24),
    "window_global": ag.causal() & ag.sliding_window(20) | ag.global_tokens(5),
    "full": ag.full(),
    "causal_nm": ag.causal() & ag.nm(2, 4),
    "documents": ag.documents() & ag.causal(),  # packed sequences
    # each document's own sinks and window (positions within documents counted on the whole sequence)
    "in_document": ag.in_document(ag.causal() & (ag.sliding_window(6) | ag.predicate("k < 2"))),
    # lists of keys per row (each rank passes its rows'): the gather form, and the bits form under |
    "key_indices": ag.causal() & ag.key_indices(),
    "key_indices_or_window": ag.key_indices() | ag.sliding_window(4),
    "padding": ag.key_padding() | ag.global_tokens(3),
    # block top-k chosen on the whole sequence (pooled keys gathered from every rank), in the top-level & and under |
    # top-k by token: each rank's rows choose among the whole sequence's keys, then run as key-index lists
    "topk": ag.causal() & ag.topk(5),
    "topk_or_window": ag.topk(3) | ag.sliding_window(4),
    "threshold": ag.causal() & ag.threshold(0.08),
    "topk_lowrank": ag.causal() & ag.topk(4, scorer=ag.lowrank()),
    "topk_documents": ag.documents() & ag.causal() & ag.topk(3),  # a context with call-time data
    "topk_indexer": ag.sliding_window(40) & ag.topk(4, scorer=ag.indexer()),
    # (their blocks are 64 positions: the workers' sequences are 4 times longer for them)
    "topk_blocks": ag.causal() & ag.topk_blocks(3, block=64),
    "topk_blocks_or_window": ag.topk_blocks(2, block=64) | ag.sliding_window(6),
    "topk_blocks_padding": ag.key_padding() & ag.causal() & ag.topk_blocks(2, block=64),
    # bucket ids and keep flags (each rank passes its rows' and keys'; the keys' are gathered), and lsh hashed per rank
    "buckets": ag.causal() & ag.buckets(),
    "buckets_or_window": ag.buckets() | ag.sliding_window(4),
    "keep": ag.causal() & ag.keep(),
    "buckets_keep_window": ag.sliding_window(24) & ag.buckets() & ag.keep(),
    "lsh": ag.causal() & ag.lsh(4, seed=3),
    # top-k with a block layout in its &-context: the whole sequence's grid for the choice, moved grids per block
    "topk_blocks_layout": ag.block_layout(
        (torch.rand(6, 6, generator=torch.Generator().manual_seed(5)) < 0.6) | torch.eye(6, dtype=torch.bool), 64
    )
    & ag.causal()
    & ag.topk_blocks(2, block=64),
    "topk_layout": ag.block_layout(torch.rand(2, 4, 12, 12, generator=torch.Generator().manual_seed(6)) < 0.5, 8)
    & ag.causal()
    & ag.topk(3),
    # 8-position blocks, random, over up to 96 positions (the 3-rank sequences)
    "layout": ag.block_layout(torch.rand(12, 12, generator=torch.Generator().manual_seed(3)) < 0.5, 8) & ag.causal(),
    # a grid per batch element (the workers' B = 2) and per head, under |
    "layout_per_batch": ag.block_layout(torch.rand(2, 4, 12, 12, generator=torch.Generator().manual_seed(4)) < 0.4, 8)
    | ag.causal(),
}


def _worker(rank, world, port, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    D._block_forward, D._block_backward = ref_block_forward, ref_block_backward
    D.TILE = 4  # blocks trimmed to rectangles of 4-position steps: chunks of 8 and 16 positions hold several
    try:
        for name, layout in cases:
            pat = PATTERNS[name]
            gen = torch.Generator().manual_seed(7)
            B, Hq, Hkv, S, Dh = 2, 4, 2, (64 if name.startswith("topk_blocks") else 16) * 2 * world, 64
            if name == "causal_nm":  # scores on a grid: exact ties, resolved by index in both computations
                q, k = (torch.randint(-2, 3, (B, h, S, Dh), generator=gen).double() / 2 for h in (Hq, Hkv))
            else:
                q, k = (torch.randn(B, h, S, Dh, generator=gen, dtype=torch.float64) for h in (Hq, Hkv))
            v = torch.randn(B, Hkv, S, Dh, generator=gen, dtype=torch.float64)
            dout = torch.randn(B, Hq, S, Dh, generator=gen, dtype=torch.float64)
            inputs = {}
            if "document_ids" in pat.runtime_inputs:  # documents of random lengths, across chunk boundaries
                inputs["document_ids"] = (torch.rand(B, S, generator=gen) < 0.08).cumsum(-1)
            if "key_lengths" in pat.runtime_inputs:
                inputs["key_lengths"] = torch.tensor([S - 5, S // 3])[:B]
            ranked = {}
            if "key_indices" in pat.runtime_inputs:  # a few keys per row, some far away, some repeated, -1 padding
                lists = torch.randint(-1, S, (B, Hkv, S, 6), generator=gen)
                lists[..., 0] = torch.arange(S) // 3  # one key from the first third, for every row
                inputs["key_indices"] = lists
                ranked["key_indices"] = D.shard(lists, world, rank, layout)  # this rank's rows
            if "proj" in pat.runtime_inputs:  # a scorer's tensors: proj whole, the indexer's per row and key
                inputs["proj"] = torch.randn(Dh, 8, generator=gen, dtype=torch.float64)
                ranked["proj"] = inputs["proj"]
            if "index_q" in pat.runtime_inputs:
                inputs["index_q"] = torch.randn(B, S, 3, 16, generator=gen, dtype=torch.float64)
                inputs["index_k"] = torch.randn(B, S, 16, generator=gen, dtype=torch.float64)
                inputs["index_w"] = torch.rand(B, S, 3, generator=gen, dtype=torch.float64)
                ranked |= {n: D.shard(inputs[n], world, rank, layout, dim=1) for n in ("index_q", "index_k", "index_w")}
            if "query_buckets" in pat.runtime_inputs:  # 3 buckets per head, at random
                inputs["query_buckets"] = torch.randint(0, 3, (B, Hq, S), generator=gen)
                inputs["key_buckets"] = torch.randint(0, 3, (B, Hkv, S), generator=gen, dtype=torch.int32)
            if "query_keep" in pat.runtime_inputs:  # about 1 in 5 queries and keys dropped
                inputs["query_keep"] = torch.rand(B, Hq, S, generator=gen) < 0.8
                inputs["key_keep"] = torch.rand(B, Hkv, S, generator=gen) < 0.8
            for given in ("query_buckets", "key_buckets", "query_keep", "key_keep"):
                if given in inputs:
                    ranked[given] = D.shard(inputs[given], world, rank, layout)  # this rank's rows or keys
            qs, ks, vs = (D.shard(t, world, rank, layout).requires_grad_() for t in (q, k, v))
            out = D.attention(qs, ks, vs, pat, layout=layout, **{**inputs, **ranked})
            grads = torch.autograd.grad(out, (qs, ks, vs), D.shard(dout, world, rank, layout))

            qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
            ref, _ = reference.attention(qf, kf, vf, pat, dtype=torch.float64, **inputs)
            want = torch.autograd.grad(ref, (qf, kf, vf), dout)
            for what, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *want)):
                b = D.shard(b.detach(), world, rank, layout)
                assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), f"{name} {layout} world {world}: {what}"
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_matches_single_process_reference(world):
    """Forward and gradients of every rank's shard against the whole sequence's reference, in both layouts, for
    causal, windows with global tokens, full, causal & nm(2, 4), packed documents (alone and with each document's
    own sinks and window), key padding, key-index lists (each rank passing its own rows'), block layouts (one
    grid, and one per batch element and head), block top-k and top-k by token (alone in the &, under |, and with a
    block layout in their &-context), a threshold, hash buckets (in the & and under |), keep masks and lsh."""
    cases = [(name, layout) for name in PATTERNS for layout in D.LAYOUTS]
    mp.spawn(_worker, args=(world, _free_port(), cases), nprocs=world, join=True)


SLOPES = 2.0 ** -torch.arange(1.0, 5.0)  # one per query head (the workers' Hq = 4): exact products with positions
MOD_CASES = {  # pattern, score_mod, the bias's shape over the whole sequence (B, Hq, S, S), or None
    "causal_softcap": (ag.causal(), (ag.softcap(3.0),), None),
    "window_global_alibi": (ag.causal() & ag.sliding_window(20) | ag.global_tokens(5), (ag.alibi(SLOPES),), None),
    "causal_alibi_bias": (ag.causal(), (ag.alibi(SLOPES), ag.bias()), (1, 4, "S", "S")),
    "documents_bias_softcap": (ag.documents() & ag.causal(), (ag.bias(), ag.softcap(4.0)), (2, 1, 1, "S")),
    "nm_alibi": (ag.causal() & ag.nm(2, 4), (ag.softcap(2.0), ag.alibi(SLOPES)), None),
    "topk_alibi_bias": (ag.causal() & ag.topk(5), (ag.alibi(SLOPES), ag.bias()), (2, 4, "S", "S")),
    "head_scale_softcap": (ag.full(), (ag.head_scale(torch.tensor([0.5, 1.0, 2.0, 3.0])), ag.softcap(5.0)), None),
    # reordering patterns take a softcap and head scales (lsh hashes each rank's own q, not q scaled per head)
    "buckets_softcap": (ag.causal() & ag.buckets(), (ag.softcap(3.0),), None),
    "lsh_head_scale": (ag.causal() & ag.lsh(4, seed=3), (ag.head_scale(torch.tensor([-1.0, 0.5, 2.0, 1.0])),), None),
}


def _mods_worker(rank, world, port, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    D._block_forward, D._block_backward = ref_block_forward, ref_block_backward
    D.TILE = 4
    try:
        for name, layout in cases:
            pat, mods, bias_shape = MOD_CASES[name]
            gen = torch.Generator().manual_seed(9)
            B, Hq, Hkv, S, Dh = 2, 4, 2, 16 * 2 * world, 64
            if "nm" in name:  # scores on a grid: exact ties, resolved by index in both computations
                q, k = (torch.randint(-2, 3, (B, h, S, Dh), generator=gen).double() / 2 for h in (Hq, Hkv))
            else:
                q, k = (torch.randn(B, h, S, Dh, generator=gen, dtype=torch.float64) for h in (Hq, Hkv))
            v = torch.randn(B, Hkv, S, Dh, generator=gen, dtype=torch.float64)
            dout = torch.randn(B, Hq, S, Dh, generator=gen, dtype=torch.float64)
            inputs, ranked = {}, {}
            if "document_ids" in pat.runtime_inputs:
                inputs["document_ids"] = (torch.rand(B, S, generator=gen) < 0.08).cumsum(-1)
            if "query_buckets" in pat.runtime_inputs:
                inputs["query_buckets"] = torch.randint(0, 3, (B, Hq, S), generator=gen)
                inputs["key_buckets"] = torch.randint(0, 3, (B, Hkv, S), generator=gen)
                ranked = {n: D.shard(inputs[n], world, rank, layout) for n in ("query_buckets", "key_buckets")}
            bias = None
            if bias_shape is not None:
                bias = torch.randn(*(S if n == "S" else n for n in bias_shape), generator=gen, dtype=torch.float64)
            rows_bias = None
            if bias is not None:  # this rank's rows (all of them where the bias broadcasts over rows)
                rows_bias = (D.shard(bias, world, rank, layout) if bias.shape[2] > 1 else bias).requires_grad_()
            qs, ks, vs = (D.shard(t, world, rank, layout).requires_grad_() for t in (q, k, v))
            out = D.attention(qs, ks, vs, pat, layout=layout, score_mod=mods, bias=rows_bias, **{**inputs, **ranked})
            leaves = (qs, ks, vs) + ((rows_bias,) if bias is not None else ())
            grads = list(torch.autograd.grad(out, leaves, D.shard(dout, world, rank, layout)))

            qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
            whole = (qf, kf, vf) + ((bias.clone().requires_grad_(),) if bias is not None else ())
            ref, _ = reference.attention(
                qf, kf, vf, pat, dtype=torch.float64, score_mod=mods, bias=whole[3] if bias is not None else None,
                **inputs,
            )  # fmt: skip
            want = list(torch.autograd.grad(ref, whole, dout))
            where = f"{name} {layout} world {world}"
            for what, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads[:3]), (ref, *want[:3])):
                assert torch.allclose(a, D.shard(b.detach(), world, rank, layout), atol=1e-9, rtol=1e-9), (where, what)
            if bias is not None:
                got, b = grads[3], want[3]
                if bias.shape[2] > 1:
                    b = D.shard(b, world, rank, layout)
                else:  # each rank's share of a bias its rows all read: summed over the ranks
                    dist.all_reduce(got)
                assert got.shape == rows_bias.shape and torch.allclose(got, b, atol=1e-9, rtol=1e-9), (where, "dbias")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_score_mods(world):
    """Score modifications on the whole sequence's positions: softcap, alibi (each block's term differs from the
    whole's by a constant per head, which moves its LSE), a bias given for each rank's rows (full, and broadcast over
    rows: each rank then returns its share of the gradient), with N:M and top-k by token ranking modified scores,
    and head scales; forward and gradients (the bias's too) against the single-process reference."""
    cases = [(name, layout) for name in MOD_CASES for layout in D.LAYOUTS]
    mp.spawn(_mods_worker, args=(world, _free_port(), cases), nprocs=world, join=True)


def test_context_parallel_refuses_what_blocks_cannot_modify():
    """Refused before any collective, by name: T5's buckets, alibi before a softcap, alibi with buckets, a
    bias without ag.bias() (and the reverse), a bias that is not this rank's rows."""
    q = torch.randn(1, 4, 16, 8, dtype=torch.float64)
    S = 32  # two ranks
    cases = [
        ((ag.rel_bias(8, 20),), None, ag.causal(), "rel_bias under context parallelism"),
        ((ag.alibi(SLOPES), ag.softcap(3.0)), None, ag.causal(), "alibi before a softcap"),
        ((ag.alibi(SLOPES),), None, ag.causal() & ag.buckets(), "only softcap and head_scale"),
        ((), torch.zeros(1, 4, 16, S), ag.causal(), "no ag.bias"),
        ((ag.bias(),), None, ag.causal(), "needs bias="),
        ((ag.bias(),), torch.zeros(1, 4, S, S), ag.causal(), "this rank's rows"),
        ((ag.alibi(SLOPES[:3]),), None, ag.causal(), "one per query head"),
    ]
    for mods, bias, pat, match in cases:
        with pytest.raises(InputError, match=match):
            D._score_mods(mods, pat, q, bias, S)
    mods, folded, _ = D._score_mods((ag.alibi(SLOPES, "bottom_right"), ag.softcap(3.0))[::-1], ag.causal(), q, None, S)
    assert [m.align for m in mods if hasattr(m, "align")] == ["top_left"] and folded is q


def _unlisted_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pat, S = ag.causal() & ag.key_indices(), 64  # zigzag over 2 ranks: 4 chunks of 16
        lists = torch.full((1, 1, S, 3), -1)
        lists[0, 0, :, 0] = torch.arange(S) % 8  # every row lists keys of chunk 0 only ...
        lists[0, 0, 48:, 1] = 40  # ... and the rows of chunk 3 also key 40 (chunk 2)
        whole = D.plan(pat, world, S // world, "zigzag")
        pruned = D.skip_unlisted_keys(whole, pat, D.shard(lists, world, rank, "zigzag"), dist.group.WORLD)
        pairs = {(bl.q_chunk, bl.k_chunk) for blocks in pruned.blocks for bl in blocks}
        assert pairs == {(0, 0), (1, 0), (2, 0), (3, 0), (3, 2)}, pairs
        either = ag.key_indices() | ag.sliding_window(4)  # lists under |: every block the window needs stays
        whole = D.plan(either, world, S // world, "zigzag")
        assert D.skip_unlisted_keys(whole, either, D.shard(lists, world, rank, "zigzag"), dist.group.WORLD) == whole
    finally:
        dist.destroy_process_group()


def test_blocks_no_listed_key_reaches_are_dropped():
    """Key-index lists: the ranks share which key chunks their rows list (one all-reduce) and all drop the same
    blocks, where no row of the query chunk lists a key of the key chunk."""
    mp.spawn(_unlisted_worker, args=(2, _free_port()), nprocs=2, join=True)


def _topk_pruned_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pat, S = ag.causal() & ag.topk_blocks(1, block=64), 256  # contiguous over 2 ranks: 2 chunks of 2 blocks
        q = torch.ones(1, 1, S, 8, dtype=torch.float64)
        k = torch.zeros(1, 1, S, 8, dtype=torch.float64)
        k[:, :, :64] = 1.0  # key block 0 scores highest for every query block: nothing chooses key chunk 1
        qs, ks = (D.shard(t, world, rank, "contiguous") for t in (q, k))
        whole = D.plan(ag.causal(), world, S // world, "contiguous", 64)
        leaf = D.P.topk_leaf(pat)
        chosen = D._with_block_choice(whole, pat, leaf, qs, ks, dist.group.WORLD, None)
        pairs = {(bl.q_chunk, bl.k_chunk) for bl in chosen.blocks[rank]}
        assert pairs == ({(0, 0)} if rank == 0 else {(1, 0)}), pairs
        share = next(bl.pattern for bl in chosen.blocks[rank])  # the choice as the block's layout: key block 0
        assert torch.equal(share.mask(128, 128)[0, 0, :, 64:], torch.zeros(128, 64, dtype=torch.bool))
    finally:
        dist.destroy_process_group()


def test_block_topk_drops_the_chunk_pairs_nothing_chose():
    """Block top-k: the ranks share which key chunks their query chunks chose a block of (one all-reduce) and all
    drop the same blocks; each remaining block runs its share of the choice as a block layout."""
    mp.spawn(_topk_pruned_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_top_k_refusals_name_the_problem():
    grid = ag.block_layout(torch.ones(4, 4, dtype=torch.bool), 64)
    causal = ag.causal() & ag.topk_blocks(2, block=64)
    with pytest.raises(InputError, match="chunks of a multiple of 64"):
        D._check_block_topk(causal, D.P.topk_leaf(causal), 96, "zigzag", 2)  # 2 chunks of 48
    D._check_block_topk(causal, D.P.topk_leaf(causal), 256, "zigzag", 2)
    laid = ag.block_layout(torch.ones(6, 6, dtype=torch.bool), 48) & ag.topk_blocks(2, block=64)
    with pytest.raises(InputError, match="48-position blocks needs chunks of a multiple of 48, got 256"):
        D._check_block_topk(laid, D.P.topk_leaf(laid), 256, "contiguous", 2)
    q = torch.zeros(1, 1, 16, 8)
    cases = [
        (ag.causal() & ag.topk(4, scorer=ag.lowrank()), {}, "needs proj="),
        (ag.causal() & ag.topk(4, scorer=ag.lowrank()), {"proj": torch.zeros(7, 2)}, r"proj= must be \[D=8"),
        (grid & ag.topk(4), {}, "64-position blocks needs chunks of a multiple of 64, got 16"),
        (ag.documents() & ag.topk(4), {}, "needs document_ids="),
    ]
    for pat, given, message in cases:  # refused before any collective (no process group here)
        with pytest.raises(InputError, match=message):
            D.token_choice(pat, D.P.token_leaf(pat), q, q, "contiguous", None, None, given)


def test_blocks_share_few_structures():
    """Each structure is a compile: blocks that a pattern allows whole run full(), and a leaf of q - k alone moves by
    the block's distance from the diagonal only (the diagonal keeps the leaf itself), whatever the place, the number
    of ranks and the lengths."""
    for world in (2, 4, 8):
        for shard_len in (2048, 65536):
            zig = D.plan(ag.causal(), world, shard_len, "zigzag")
            assert {bl.pattern.structure() for blocks in zig.blocks for bl in blocks} == {ag.causal(), ag.full()}
            win = D.plan(ag.sliding_window(1000), world, shard_len, "contiguous")
            moved = {bl.pattern.structure() for blocks in win.blocks for bl in blocks}
            assert ag.sliding_window(1000) in moved and len(moved) <= 2


def test_bucket_and_keep_refusals_name_the_problem():
    """Checked before any collective: lsh needs a seed (every rank must draw the same directions) and computes its
    own buckets; bucket ids and keep flags are this rank's rows' and keys', integers and bools, given exactly when
    the pattern reads them."""
    q, k = torch.zeros(2, 4, 16, 8), torch.zeros(2, 2, 16, 8)
    none = dict.fromkeys(("query_buckets", "key_buckets", "query_keep", "key_keep"))
    with pytest.raises(InputError, match="needs a seed"):
        D._hashed(ag.causal() & ag.lsh(4), q, k, none)
    with pytest.raises(InputError, match="lsh computes its buckets"):
        D._hashed(ag.lsh(4, seed=1), q, k, none | {"query_buckets": torch.zeros(2, 4, 16, dtype=torch.int32)})
    pat, given = D._hashed(ag.causal() & ag.lsh(4, seed=1), q, k, none)
    assert pat == ag.causal() & ag.buckets() and given["query_buckets"].shape == (2, 4, 16)
    assert given["key_buckets"].shape == (2, 2, 16)
    qb, kb = torch.zeros(2, 4, 16, dtype=torch.int32), torch.zeros(2, 2, 16, dtype=torch.int64)
    D._checked_sorting(ag.buckets(), none | {"query_buckets": qb, "key_buckets": kb}, q, k)
    cases = [
        (ag.buckets(), {"query_buckets": qb}, "key_buckets= is missing"),
        (ag.causal(), {"query_keep": qb.bool()}, "query_keep= is given but"),
        (ag.buckets(), {"query_buckets": qb[:, :, :8], "key_buckets": kb}, r"query_buckets \(this rank's shard\)"),
        (ag.buckets(), {"query_buckets": qb.float(), "key_buckets": kb}, "query_buckets"),
        (ag.keep(), {"query_keep": qb, "key_keep": kb.bool()}, "query_keep"),  # ids where flags belong
    ]
    for pattern, value, message in cases:
        with pytest.raises(InputError, match=message):
            D._checked_sorting(pattern, none | value, q, k)


def test_block_backward_of_a_reordered_pattern_sorts_and_moves_back(monkeypatch):
    """A block with buckets and keep masks runs its backward on the tokens sorted by bucket: the kernels' backward
    (here the reference, reading the sorted tensors through the route's original positions) gets dO, Q, O, LSE, K,
    V in the sorted order the route describes, and the gradients come back in the original order."""
    from attngen import op

    def sorted_backward(_kern, dout, q, k, v, out, lse, _dlse, scale, prep, _score_grad=None):
        """The backward kernels' result on sorted tensors: un-sort by the route, the reference, sort again."""
        qo, ko = prep.route.q_order.long(), prep.route.k_order.long()

        def original(x, order):
            index = order.view(*order.shape, *([1] * (x.dim() - 3))).expand_as(x)
            return torch.empty_like(x).scatter_(2, index, x)

        def resorted(x, order):
            return torch.gather(x, 2, order.view(*order.shape, *([1] * (x.dim() - 3))).expand_as(x))

        dq, dk, dv, _ = ref_block_backward(
            original(dout, qo), original(q, qo), original(k, ko), original(v, ko), original(out, qo),
            original(lse, qo), pattern, scale, inputs,
        )  # fmt: skip
        return resorted(dq, qo), resorted(dk, ko), resorted(dv, ko)

    monkeypatch.setattr(op, "backward", sorted_backward)
    monkeypatch.setattr(op, "_compiled_for", lambda *args: None)
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, Sq, Sk, Dh = 2, 4, 2, 24, 20, 16
    pattern = ag.causal(align="bottom_right") & ag.buckets() & ag.keep()
    q = torch.randn(B, Hq, Sq, Dh, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, Sk, Dh, generator=gen, dtype=torch.float64) for _ in "kv")
    inputs = {
        "query_buckets": torch.randint(0, 3, (B, Hq, Sq), generator=gen),
        "key_buckets": torch.randint(0, 3, (B, Hkv, Sk), generator=gen),
        "query_keep": torch.rand(B, Hq, Sq, generator=gen) < 0.8,
        "key_keep": torch.rand(B, Hkv, Sk, generator=gen) < 0.8,
    }
    out, lse = reference.attention(q, k, v, pattern, dtype=torch.float64, **inputs)
    dout = torch.randn_like(out)
    got = D._block_backward(dout, q, k, v, out, lse, pattern, Dh**-0.5, {"document_ids": None, **inputs})
    want = ref_block_backward(dout, q, k, v, out, lse, pattern, Dh**-0.5, inputs)
    assert got[3] is None and want[3] is None  # no bias
    for g, w in zip(got[:3], want[:3]):
        assert torch.allclose(g, w, atol=1e-12, rtol=1e-12)
    from attngen.prepare import prepare

    route = prepare(pattern, q, k, {"document_ids": None, **inputs}).route  # it really reorders the tokens here
    assert not torch.equal(route.q_order.long(), torch.arange(Sq).expand(B, Hq, Sq))


def test_block_backward_hands_the_modifications_to_the_kernels(monkeypatch):
    """A block's backward compiles its kernels with the modifications' structures, hands them their tensors (alibi's
    slopes, the block's bias) and, where the bias wants a gradient, a [B, Hq, rows, keys] buffer for dL/ds, which it
    returns."""
    from attngen import op

    seen = {}

    def compiled_for(name, q, mods=""):
        seen["compiled"] = (name, mods)
        return "kernels"

    def backward(kern, dout, q, k, v, out, lse, dlse, scale, prep, score_grad=None):
        seen["backward"] = (kern, prep.score_mod, score_grad)
        if score_grad is not None:
            score_grad.fill_(0.5)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    monkeypatch.setattr(op, "_compiled_for", compiled_for)
    monkeypatch.setattr(op, "backward", backward)
    B, Hq, Hkv, R, K, Dh = 2, 4, 2, 12, 20, 16
    q, out, dout = (torch.randn(B, Hq, R, Dh, dtype=torch.float64) for _ in range(3))
    k, v = (torch.randn(B, Hkv, K, Dh, dtype=torch.float64) for _ in range(2))
    lse = torch.randn(B, Hq, R, dtype=torch.float64)
    bias = torch.randn(1, Hq, R, K, dtype=torch.float64)
    mods = (ag.alibi(SLOPES), ag.bias())
    for wanted in (True, False):
        pat = ag.causal()
        inputs = {"document_ids": None}
        ds = D._block_backward(dout, q, k, v, out, lse, pat, 0.125, inputs, mods, bias, wanted)[3]
        structures = scoremod.structures(scoremod.bind(mods, q, K, bias=bias))
        assert seen["compiled"] == (pat.key, scoremod.key(structures))
        kern, tensors, buffer = seen["backward"]
        assert kern == "kernels" and torch.equal(tensors[0], SLOPES.float())
        assert torch.equal(tensors[1], bias.expand(B, Hq, R, K))  # the bias as the kernels read it
        if wanted:
            assert buffer.shape == (B, Hq, R, K) and ds is buffer and (ds == 0.5).all()
        else:
            assert buffer is None and ds is None


# ------------------------------------------------------------------------------------------ fuzzed patterns

FUZZ_CHUNK = 64  # zigzag's chunks (contiguous ones are twice as long): the whole sequence is 2 · world of them
FUZZ_SCALE = 0.125  # a power of two: exact scores stay exact, so fp32 and float64 choices agree


def _fuzz_cases(count: int, skip: int = 0) -> list[int]:
    """Seeds of tests/fuzzing.py, one per group (a group shares its pattern's recipe), whose patterns context
    parallelism can split in chunks of FUZZ_CHUNK positions (layout and topk_blocks blocks dividing it), of sizes
    a float64 reference handles quickly; `skip` groups first."""
    from fuzzing import GROUP, case

    seeds = []
    for seed in range(skip * GROUP, (skip + 40 * count) * GROUP, GROUP):
        c = case(seed)
        blocks = [lay.block_size for lay in c.pattern.layouts()]
        blocks += [leaf.block for leaf in c.pattern.leaves() if isinstance(leaf, D.P.TopkBlocks)]
        if any(FUZZ_CHUNK % b for b in blocks) or c.B * c.Hq > 16 or c.head_dim > 128:
            continue
        seeds.append(seed)
        if len(seeds) == count:
            break
    return seeds


def _covering(pat, S: int):
    """`pat` with every block layout's grid tiled to cover S positions (a case's grids cover its own lengths)."""
    if isinstance(pat, (D.P.And, D.P.Or)):
        return type(pat)(tuple(_covering(p, S) for p in pat.parts))
    if isinstance(pat, D.P.Not):
        return D.P.Not(_covering(pat.part, S))
    if isinstance(pat, D.P.BlockLayout):
        grid, n = pat.tensor().bool(), -(-S // pat.block_size)
        reps = (-(-n // grid.shape[-2]), -(-n // grid.shape[-1]))
        grid = grid.repeat(*([1] * (grid.dim() - 2)), *reps)[..., :n, :n]
        return ag.block_layout(grid if pat.per_batch else grid if pat.per_head else grid[0], pat.block_size)
    return pat


def _fuzz_inputs(c, pat, S: int, gen, world: int, rank: int, layout: str) -> tuple[dict, dict]:
    """The whole sequence's call-time tensors for `pat` (the reference's), and what each rank passes instead."""
    B, Hq, Hkv = c.B, c.Hq, c.Hkv
    need, whole, ranked = pat.runtime_inputs, {}, {}
    if "document_ids" in need:
        whole["document_ids"] = (torch.rand(B, S, generator=gen) < 0.05).cumsum(-1)
    if "key_lengths" in need:
        whole["key_lengths"] = torch.randint(0, S + 1, (B,), generator=gen)
    if "key_indices" in need:
        lists = torch.randint(-1, S, (B, c.key_indices.shape[1], S, 8), generator=gen)
        whole["key_indices"], ranked["key_indices"] = lists, D.shard(lists, world, rank, layout)
    if "proj" in need:
        whole["proj"] = ranked["proj"] = c.proj.double()
    if "index_q" in need:
        Hi, Di = c.index_q.shape[2:]
        whole["index_q"] = torch.randint(-2, 3, (B, S, Hi, Di), generator=gen).double() / 2
        whole["index_k"] = torch.randint(-2, 3, (B, S, Di), generator=gen).double() / 2
        whole["index_w"] = torch.randint(0, 3, (B, S, Hi), generator=gen).double()
        ranked |= {n: D.shard(whole[n], world, rank, layout, dim=1) for n in ("index_q", "index_k", "index_w")}
    if "query_buckets" in need:
        whole["query_buckets"] = torch.randint(0, 3, (B, Hq, S), generator=gen)
        whole["key_buckets"] = torch.randint(0, 3, (B, Hkv, S), generator=gen)
    if "query_keep" in need:
        whole["query_keep"] = torch.rand(B, Hq, S, generator=gen) < 0.8
        whole["key_keep"] = torch.rand(B, Hkv, S, generator=gen) < 0.8
    for name in ("query_buckets", "key_buckets", "query_keep", "key_keep"):
        if name in whole:
            ranked[name] = D.shard(whole[name], world, rank, layout)
    shared = {n: t for n, t in whole.items() if n in ("document_ids", "key_lengths")}
    return whole, shared | ranked


def _fuzz_mods(c) -> tuple:
    """The case's softcap and alibi (slopes 2^-i for its heads), as context parallelism takes them: no bias, no T5
    table (their tensors are the case's lengths'), no alibi before a softcap."""
    kinds = [type(m).__name__ for m in c.score_mod]
    mods = []
    for m in c.score_mod:
        if isinstance(m, scoremod.Softcap):
            mods.append(m)
        elif isinstance(m, scoremod.Alibi) and "Softcap" not in kinds[kinds.index("Alibi") :]:
            mods.append(ag.alibi(2.0 ** -torch.arange(1.0, c.Hq + 1), m.align))
    return tuple(mods)


def _fuzz_worker(rank, world, port, seeds, ran):
    from fuzzing import case

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    D._block_forward, D._block_backward = ref_block_forward, ref_block_backward
    D.TILE = 4
    S = 2 * world * FUZZ_CHUNK
    try:
        for n, seed in enumerate(seeds):
            c, layout = case(seed), D.LAYOUTS[n % 2]
            pat, mods = _covering(c.pattern, S), _fuzz_mods(c)
            gen = torch.Generator().manual_seed(seed)
            q, k = (torch.randint(-2, 3, (c.B, h, S, c.head_dim), generator=gen).double() / 2 for h in (c.Hq, c.Hkv))
            v = torch.randn(c.B, c.Hkv, S, c.head_dim, generator=gen, dtype=torch.float64)
            dout = torch.randn(c.B, c.Hq, S, c.head_dim, generator=gen, dtype=torch.float64)
            whole, given = _fuzz_inputs(c, pat, S, gen, world, rank, layout)
            qs, ks, vs = (D.shard(t, world, rank, layout).requires_grad_() for t in (q, k, v))
            where = f"seed {seed} {pat!r:.200} mods {mods} {layout}"
            try:
                out = D.attention(qs, ks, vs, pat, layout=layout, scale=FUZZ_SCALE, score_mod=mods, **given)
            except InputError as e:  # refused alike on every rank, before any collective
                print(f"refused: {where}: {e}")
                continue
            grads = torch.autograd.grad(out, (qs, ks, vs), D.shard(dout, world, rank, layout))
            qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
            ref, _ = reference.attention(
                qf, kf, vf, pat, scale=FUZZ_SCALE, dtype=torch.float64, score_mod=mods, **whole
            )
            want = torch.autograd.grad(ref, (qf, kf, vf), dout)
            for what, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *want)):
                b = D.shard(b.detach(), world, rank, layout)
                assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), f"{where}: {what} {(a - b).abs().max():.3g}"
            if rank == 0:
                ran.append(seed)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,groups,skip", [(2, 40, 0), (3, 16, 400)])
def test_context_parallel_fuzzed_patterns(world, groups, skip):
    """Patterns of the fuzzer (tests/fuzzing.py: nested & | ~, every leaf, rules, both top-k kinds, key lists,
    buckets and keep masks, block layouts tiled to the length), one per recipe, with its softcap and alibi, in both
    layouts: forward and gradients against the single-process reference. Most must run (not be refused)."""
    seeds = _fuzz_cases(groups, skip)
    ran = mp.Manager().list()
    mp.spawn(_fuzz_worker, args=(world, _free_port(), seeds, ran), nprocs=world, join=True)
    assert len(ran) >= 0.75 * len(seeds), f"only {len(ran)} of {len(seeds)} fuzzed patterns ran: {list(ran)}"
