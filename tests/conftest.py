"""Keep test runs out of the user's kernel cache: one fresh cache directory per test session, removed at its end
(unless ATTNGEN_CACHE_DIR was set: a prewarmed cache is the caller's to keep). Shared fixtures: `one_torch_thread`,
and `reference_kernels`, which runs `attngen.attention` end to end on the CPU with the kernels replaced by the
reference (for code built on attngen, such as the integrations)."""

import atexit
import concurrent.futures
import functools
import operator
import os
import shutil
import tempfile

import pytest

if "ATTNGEN_CACHE_DIR" not in os.environ:
    os.environ["ATTNGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="attngen-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ATTNGEN_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Outputs and gradients start as NaN (ATTNGEN_POISON_OUTPUTS=1), so an element a kernel fails to write shows;
    every GPU test module uses it (test_kernels_gpu.GPU_TESTS)."""
    monkeypatch.setenv("ATTNGEN_POISON_OUTPUTS", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's many small CPU tensor operations on one thread: the pool only adds overhead there, and stalls
    on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_kernels(monkeypatch):
    """`attngen.attention` on CPU tensors, end to end, with the kernels replaced by the float32 reference: the checks,
    `prepare`, the custom op (eager and traced) and its autograd run as they do on a GPU; the forward computes
    `attngen.reference.attention` of the pattern rebuilt from the op's arguments (its structure, its layout grids,
    document ids, key lengths, the block top-k choice and key lists), and the backward its exact gradient (a
    selection rule's choice held fixed, as in the kernels). For tests of code built on attngen without a GPU. Records
    every call (pattern, run-time tensors, shapes, score modifications) in `calls`. Inputs must still be fp16 / bf16,
    as for the kernels."""
    from types import SimpleNamespace

    import torch

    from attngen import launch, op, reference, scoremod
    from attngen import pattern as P
    from attngen.select import split_selection

    calls = []

    def compiled_for(name, q, mods=""):
        structure = P.by_key(name)
        layouts = tuple(dict.fromkeys(leaf for leaf in structure.leaves() if isinstance(leaf, P.LayoutSlot)))
        mods = scoremod.by_key(mods)
        plan = SimpleNamespace(layouts=layouts, positions=split_selection(structure)[0], score_mods=mods)
        return SimpleNamespace(plan=plan, name=name, mods=mods)

    def mods_of(kern, prep, probe=None):
        """The call's score modifications: the structures, with the tensors the call passed (slopes, a bias, a T5
        table); `probe` (zeros) is added just before the first bias or table: its gradient is dL/ds there."""
        tensors, bound = iter(prep.score_mod), []
        for m in kern.mods:
            if isinstance(m, scoremod.ADDITIVE) and probe is not None:
                bound.append(scoremod.BoundBias(probe, "float32"))
                probe = None
            if isinstance(m, scoremod.AlibiSlot):
                m = scoremod.Alibi(next(tensors), m.align)
            elif isinstance(m, scoremod.Bias):
                m = scoremod.BoundBias(next(tensors), m.dtype)
            elif isinstance(m, scoremod.RelBias):
                m = scoremod.BoundRelBias(m, next(tensors))
            bound.append(m)
        return tuple(bound)

    def rebuild(pat, grids):
        if isinstance(pat, (P.And, P.Or)):
            parts = [rebuild(p, grids) for p in pat.parts]
            return functools.reduce(operator.and_ if isinstance(pat, P.And) else operator.or_, parts)
        if isinstance(pat, P.Not):
            return ~rebuild(pat.part, grids)
        if isinstance(pat, P.LayoutSlot):
            grid = grids[pat.index].bool()
            return P.block_layout(grid if pat.per_head else grid[0], pat.block_size)
        return pat

    def inputs_of(prep):
        docs = prep.document_ids  # (query ids, key ids), then their positions within documents for in_document()
        inputs = {"document_ids": None if docs is None else docs[:2], "key_lengths": prep.key_lengths}
        inputs |= {"document_positions": docs[2:]} if docs is not None and len(docs) == 4 else {}
        inputs |= prep.route.mask_inputs() if prep.route is not None else {}  # the sorted tokens' mask
        inputs |= {"selected_blocks": prep.blocks.bool()} if prep.blocks is not None else {}  # topk_blocks' choice
        inputs |= {"key_indices": prep.key_lists} if prep.key_lists is not None else {}
        return inputs

    def reference_of(kern, q, k, v, scale, prep):
        pat = rebuild(P.by_key(kern.name), prep.layouts)
        mods = mods_of(kern, prep)
        return reference.attention(
            q, k, v, pat, scale=scale, dtype=torch.float32, score_mod=mods, **inputs_of(prep)
        ), pat

    def forward(kern, q, k, v, scale, prep):
        (out, lse), pat = reference_of(kern, q, k, v, scale, prep)
        shapes = (tuple(q.shape), tuple(k.shape))
        calls.append(SimpleNamespace(pattern=pat, prep=prep, shapes=shapes, mods=mods_of(kern, prep)))
        return out.to(q.dtype), lse

    def backward(kern, dout, q, k, v, out, lse, dlse, scale, prep, score_grad=None):
        # Written out (the custom op's implementation runs below autograd): the softmax backward over the kept keys,
        # the choice of a selection rule held fixed, as the kernels do.
        pat = rebuild(P.by_key(kern.name), prep.layouts)
        inputs = inputs_of(prep)
        Sq, Sk, groups = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
        qf, kf, vf = q.float(), k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
        raw = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale
        modified = scoremod.reference(mods_of(kern, prep), raw)
        s = modified.detach()
        positions, rule = split_selection(pat)
        kept = P.dense_mask(positions, Sq, Sk, device=q.device, q=q, **inputs)
        if rule is not None:
            kept = kept & rule.reference_keep(s, kept, q=q, k=k, **inputs)
        s = s.masked_fill(~kept, float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse))
        do = dout.float()
        ds = p * (do @ vf.transpose(-1, -2) - (do * (p @ vf)).sum(-1, keepdim=True))
        if dlse is not None:
            ds = ds + p * dlse.float().unsqueeze(-1)
        if kern.mods:  # the modifications' derivative, and dL/ds at a bias's / table's step as dK/dV writes it
            ds, at_step = _through_mods(kern, prep, raw, ds, score_grad is not None)
            if score_grad is not None:
                score_grad.copy_(at_step)
        dq = ds @ kf * scale
        dk, dv = (ds.transpose(-1, -2) @ qf) * scale, p.transpose(-1, -2) @ do
        dk, dv = (g.unflatten(1, (k.shape[1], groups)).sum(2) for g in (dk, dv))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def _through_mods(kern, prep, raw, ds, at_step: bool):
        """(dL/d raw, dL/ds at the first bias / table) from dL/d modified, by autograd on a thread of its own: the
        custom op's implementation runs below autograd, whose dispatch exclusion is per thread."""

        def run():
            r = raw.detach().requires_grad_()
            probe = torch.zeros_like(r).requires_grad_() if at_step else None
            modified = scoremod.reference(mods_of(kern, prep, probe), r)
            grads = torch.autograd.grad(modified, (r, probe) if at_step else (r,), ds)
            return grads[0], grads[1] if at_step else None

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()

    monkeypatch.setattr(launch, "_require_cuda", lambda q: None)  # every other check of the call still runs
    monkeypatch.setattr(op, "_compiled_for", compiled_for)
    monkeypatch.setattr(op, "forward", forward)
    monkeypatch.setattr(op, "backward", backward)
    return SimpleNamespace(calls=calls)
