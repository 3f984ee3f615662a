"""The pattern catalogue (patterns/*.py): every file loads on its own, builds an attngen Pattern whose dense mask
has the structure its paper describes (checked against formulas written independently here), and its main()
draws the mask and prints the expression and tile schedule. CPU only: the schedule compiles for sm_90."""

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import attngen
from attngen.plan import make_plan
from attngen.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "patterns").glob("*.py"))
S = 256


@functools.cache
def load(stem: str) -> ModuleType:
    """Import patterns/<stem>.py from its path, as a user of the catalogue would, without a package."""
    spec = importlib.util.spec_from_file_location(f"catalogue_{stem}", ROOT / "patterns" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mask2d(p: attngen.Pattern, n: int = S, **runtime) -> torch.Tensor:
    m = p.mask(n, n, **runtime)
    assert m.dtype == torch.bool and m.shape[-2:] == (n, n)
    return m[0, 0]


def positions(n: int = S) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n)[:, None], torch.arange(n)[None, :]


def test_catalogue_has_the_named_patterns():
    names = {f.stem for f in FILES}
    expected = {"longformer", "bigbird", "streaming_llm", "document_causal", "prefix_lm", "dilated_blocks", "dfss"}
    expected |= {"dsa", "deepseek_indexer", "gemma2", "alibi", "natten", "dilated_window", "t5", "packed_sinks"}
    assert expected <= names


@pytest.mark.parametrize("path", FILES, ids=lambda f: f.stem)
def test_file_documents_itself_and_builds_a_pattern(path):
    module = load(path.stem)
    assert module.__doc__ and len(module.__doc__.split()) > 30
    assert f"python patterns/{path.stem}.py" in module.__doc__
    p = module.pattern()
    assert isinstance(p, attngen.Pattern)
    assert module.pattern() == p and hash(module.pattern()) == hash(p)  # same arguments, same kernel


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda f: f.stem)
def test_main_draws_the_mask_and_explains_the_schedule(path, capsys):
    load(path.stem).main()
    out = capsys.readouterr().out
    lines = out.splitlines()
    (plan_line,) = [line for line in lines if line.startswith("KernelPlan for ")]
    expression = plan_line.removeprefix("KernelPlan for ")
    assert lines[0] == f"{path.stem}  {expression}"
    picture = [line for line in lines if line and set(line) <= set("█▒·")]
    assert len(picture) == 64 and {len(line) for line in picture} == {64}
    assert "█" in "".join(picture) and "·" in "".join(picture)
    assert "  schedule  " in out and "sm_90" in out


def test_runs_as_a_script_from_the_repository_root():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "patterns/prefix_lm.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("prefix_lm  prefix_lm(256)\n")


# ------------------------------------------------------------------------------------------- structure


def test_longformer_band_and_global_tokens():
    m = mask2d(load("longformer").pattern(window=64, n_global=4))
    q, k = positions()
    assert torch.equal(m, ((q - k).abs() <= 32) | (q < 4) | (k < 4))
    assert m[3].all() and m[:, 3].all()  # a global token: its row and its column
    assert m[100, 132] and not m[100, 133] and not m[200, 10]
    big = mask2d(load("longformer").pattern(), 1024)  # defaults: 256 each side, 16 global tokens
    assert big[:, 15].all() and big[15].all() and not big[1000, 100] and big[1000, 744]


def test_streaming_llm_sinks_window_and_no_future():
    m = mask2d(load("streaming_llm").pattern(window=32, n_sinks=4))
    q, k = positions()
    assert torch.equal(m, (k <= q) & ((q - k < 32) | (k < 4)))
    assert m[3:, :4].all()  # the sinks are visible to every query that comes after them
    assert not m[200, 4:169].any() and m[200, 169:201].all()  # between the sinks and the window: hidden
    assert not m.triu(1).any()  # never a future key


def test_streaming_llm_bottom_right_for_decoding():
    p = load("streaming_llm").pattern(window=32, n_sinks=4, align="bottom_right")
    m = p.mask(8, S)[0, 0]
    assert m[-1, -32:].all() and m[-1, :4].all() and not m[-1, 4:-32].any()
    assert not m[0, -7:].any() and m[0, -8]  # query i of the 8 sits at key S - 8 + i


def test_bigbird_window_global_random_blocks():
    bigbird = load("bigbird")
    bs, nb, window, n_global, n_random = 16, S // 16, 3, 2, 3
    p = bigbird.pattern(seq_len=S, block_size=bs)
    m = mask2d(p)
    assert m[: n_global * bs].all() and m[:, : n_global * bs].all()  # global rows and columns
    q, k = positions()
    assert m[((q // bs) - (k // bs)).abs() <= window // 2].all()  # the block window
    blocks = m.view(nb, bs, nb, bs)
    assert (blocks.all(3).all(1) == blocks.any(3).any(1)).all()  # whole blocks only
    visible = blocks.any(3).any(1)
    for row in range(n_global, nb):
        near = {c for c in range(nb) if abs(c - row) <= window // 2 or c < n_global}
        assert visible[row].sum().item() == len(near) + n_random, row
    assert 0.4 < m.float().mean().item() < 0.7
    assert bigbird.pattern(seq_len=S, block_size=bs, seed=1) != p  # the seed picks the random blocks


def test_bigbird_heads_draw_their_own_random_blocks():
    m = load("bigbird").pattern(seq_len=S, block_size=16, heads=4).mask(S, S)
    assert m.shape == (1, 4, S, S)
    assert len({tuple(m[0, h].flatten().tolist()) for h in range(4)}) == 4


def test_document_causal_never_crosses_documents():
    document_causal = load("document_causal")
    ids = document_causal.document_ids([100, 56, 100])
    assert ids.tolist() == [0] * 100 + [1] * 56 + [2] * 100
    m = mask2d(document_causal.pattern(), document_ids=ids)
    q, k = positions()
    same = ids[:, None] == ids[None, :]
    assert not (m & ~same).any()
    assert torch.equal(m, same & (k <= q))
    assert not m[100, 99] and m[155, 100] and not m[156, 155]
    batch = torch.stack([ids, torch.zeros(S, dtype=torch.int32)])  # per-sequence packing
    both = document_causal.pattern().mask(S, S, document_ids=batch)
    assert both.shape == (2, 1, S, S) and torch.equal(both[1, 0], (k <= q).expand(S, S))


def test_packed_sinks_restart_in_every_document():
    """Each document's tokens see the earlier tokens of their own document that are among the last `window` or
    its first `sinks` (written with each document's start, independently of in_document)."""
    packed = load("packed_sinks")
    lengths = [100, 56, 100]
    ids = packed.document_ids(lengths)
    m = mask2d(packed.pattern(window=20, sinks=3), document_ids=ids)
    q, k = positions()
    start = torch.tensor([0] * 100 + [100] * 56 + [156] * 100)
    same = ids[:, None] == ids[None, :]
    want = same & (k <= q) & ((q - k < 20) | (k - start[None, :] < 3))
    assert torch.equal(m, want)
    assert m[150, 100] and m[150, 102] and not m[150, 103] and m[150, 131] and not m[150, 99]


def test_prefix_lm_bidirectional_prefix_then_causal():
    m = mask2d(load("prefix_lm").pattern(prefix=64))
    q, k = positions()
    assert torch.equal(m, (k < 64) | (k <= q))
    assert m[:, :64].all() and m[10, 63] and not m[10, 64] and not m[100, 101]


def test_dilated_blocks_local_and_every_dilation_th_block():
    m = mask2d(load("dilated_blocks").pattern(seq_len=S, block_size=16, local_blocks=2, dilation=3))
    q, k = positions()
    back = q // 16 - k // 16
    assert torch.equal(m, (k <= q) & ((back < 2) | (back % 3 == 0)))
    assert m[10 * 16, 7 * 16] and not m[10 * 16, 8 * 16] and m[10 * 16, 9 * 16]


def test_chunked_causal_restarts_at_each_chunk():
    m = mask2d(load("chunked_causal").pattern(chunk=64))
    q, k = positions()
    assert torch.equal(m, (k <= q) & (q // 64 == k // 64))
    assert not m[64, 63] and m[127, 64]


def test_dfss_keeps_two_of_every_four_allowed_keys():
    dfss = load("dfss")
    assert dfss.pattern() == attngen.causal() & attngen.nm(2, 4)
    assert dfss.pattern(causal=False) == attngen.nm(2, 4)
    assert dfss.pattern(1, 2) == attngen.causal() & attngen.nm(1, 2)
    q, k = positions(64)
    groups = lambda m: m.view(64, 16, 4).sum(-1)
    kept = dfss.kept(dfss.pattern(), 64)
    assert not (kept & (k > q)).any()  # never a future key
    assert torch.equal(groups(kept), groups((k <= q).expand(64, 64)).clamp(max=2))
    encoder = dfss.kept(dfss.pattern(causal=False), 64)
    assert (groups(encoder) == 2).all()
    assert not torch.equal(encoder, dfss.kept(dfss.pattern(causal=False), 64, seed=1))  # the scores choose


def _best_earlier(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [..., n, n]: per row of float64 scores, the k largest among the keys not after the query (all of them
    where fewer exist), ties to the lower key (a stable sort; the indexer's ReLU makes ties at 0)."""
    n = scores.shape[-1]
    q, key = positions(n)
    order = scores.masked_fill(key > q, -torch.inf).sort(dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order[..., :k], True) & (key <= q)


def test_dsa_keeps_the_k_best_keys_by_projected_scores():
    dsa = load("dsa")
    assert dsa.pattern() == attngen.causal() & attngen.topk(256, scorer=attngen.lowrank())
    assert dsa.pattern(8, causal=False) == attngen.topk(8, scorer=attngen.lowrank())
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    proj = attngen.random_projection(16, 4, seed=0)
    m = dsa.pattern(8).mask(64, 64, q=q, k=k, proj=proj)
    P = proj.double()
    assert torch.equal(m, _best_earlier((q @ P) @ (k @ P).transpose(-1, -2), 8))  # per head
    assert (m.sum(-1) == torch.arange(64).clamp(max=7) + 1).all()
    exact = (attngen.causal() & attngen.topk(8)).mask(64, 64, q=q, k=k)
    assert torch.equal(dsa.pattern(8).mask(64, 64, q=q, k=k, proj=torch.eye(16)), exact)  # P = I: the exact top-k


def test_deepseek_indexer_one_selection_for_every_head_on_the_gather_kernels():
    indexer = load("deepseek_indexer")
    assert indexer.pattern() == attngen.causal() & attngen.topk(2048, scorer=attngen.indexer())
    inputs = indexer.indexer_inputs(48, heads=3, dim=8, seed=1)
    assert [tuple(t.shape) for t in inputs.values()] == [(1, 48, 3, 8), (1, 48, 8), (1, 48, 3)]
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 48, 16, generator=gen), torch.randn(1, 2, 48, 16, generator=gen)
    m = indexer.pattern(6).mask(48, 48, q=q, k=k, **inputs)
    iq, ik, w = (inputs[n].double() for n in ("index_q", "index_k", "index_w"))
    scores = torch.einsum("bih,bihj->bij", w, torch.einsum("bihd,bjd->bihj", iq, ik).relu())
    assert m.shape == (1, 1, 48, 48) and torch.equal(m[:, 0], _best_earlier(scores, 6))
    lists = prepare(indexer.pattern(6), q, k, inputs).key_lists  # the call's fp32 pass: one list per KV head
    assert lists.shape == (1, 2, 48, 6) and torch.equal(lists[:, 0], lists[:, 1])
    assert torch.equal(attngen.key_indices().mask(48, 48, key_indices=lists, q=q), m.expand(1, 4, 48, 48))
    plan = make_plan(indexer.pattern(), head_dim=128, dtype="bf16", arch="sm_90a")
    assert plan.gather is not None and plan.gather.rest_c == "k <= q"


def test_gemma2_alternates_window_and_global_layers_and_caps_logits():
    gemma = load("gemma2")
    i, j = positions()
    assert torch.equal(mask2d(gemma.pattern(0, window=32)), (j <= i) & (j > i - 32))
    assert torch.equal(mask2d(gemma.pattern(1, window=32)), j <= i)
    assert gemma.score_mod() == attngen.softcap(50.0)


def test_alibi_slopes_follow_the_paper():
    """Geometric 2^(-8 i / n) for a power of two; otherwise the next lower power's, then every other of twice it."""
    alibi = load("alibi")
    assert alibi.slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi.slopes(12) == alibi.slopes(8) + [2.0 ** -(i + 0.5) for i in range(4)]
    mod = alibi.score_mod(12)
    assert torch.equal(mod.slopes, torch.tensor(alibi.slopes(12))) and alibi.pattern() == attngen.causal()


def test_natten_2d_windows_shift_inwards_at_the_borders():
    """Every query of a 16 x 16 grid sees exactly its 5 x 5 neighbourhood, clamped inside the grid."""
    H = W = 16
    qi, qj = torch.arange(S) // W, torch.arange(S) % W
    start_i, start_j = (qi - 2).clamp(0, H - 5), (qj - 2).clamp(0, W - 5)
    rows = (qi[None, :] >= start_i[:, None]) & (qi[None, :] < start_i[:, None] + 5)
    cols = (qj[None, :] >= start_j[:, None]) & (qj[None, :] < start_j[:, None] + 5)
    got = mask2d(load("natten").pattern(H, W, 5, 5))
    assert torch.equal(got, rows & cols) and set(got.sum(1).tolist()) == {25}


def test_natten_1d_and_its_tiles():
    natten = load("natten")
    _, j = positions()
    start = (torch.arange(S) - 3).clamp(0, S - 7)[:, None]
    assert torch.equal(mask2d(natten.pattern_1d(7)), (j >= start) & (j < start + 7))
    # 7 x 7 neighbourhoods on 64 x 64 patches: the tiles of rows more than 3 grid rows apart are never visited
    report = str(attngen.compile(natten.pattern(64, 64, 7, 7), head_dim=64, arch="sm_90").explain(4096, 4096))
    (line,) = [t for t in report.splitlines() if t.startswith("  schedule  ")]
    tiles, empty = re.search(r"(\d+) query tiles x (\d+) key tiles", line), re.search(r"(\d+) empty", line)
    assert int(empty[1]) >= 0.85 * int(tiles[1]) * int(tiles[2]), line


def test_dilated_window_keeps_every_dilation_th_key():
    i, j = positions()
    got = mask2d(load("dilated_window").pattern(16, 4))
    assert torch.equal(got, (i >= j) & ((i - j) % 4 == 0) & (i - j < 64))


def test_t5_bias_is_the_models():
    """patterns/t5.py adds exactly what transformers' T5 attention adds to its scores (its compute_bias), for a
    random relative_attention_bias, decoder and encoder."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    module = load("t5")
    for decoder in (True, False):
        config = t5.T5Config(num_heads=4, d_model=32, d_kv=8, is_decoder=decoder)
        layer = t5.T5Attention(config, has_relative_attention_bias=True)
        with torch.no_grad():
            layer.relative_attention_bias.weight.normal_()
            want = layer.compute_bias(37, 37)  # [1, heads, q, k]
        table = module.table_of(layer.relative_attention_bias)
        q = torch.empty(1, 4, 37, 8)
        mods = attngen.scoremod.bind((module.score_mod(decoder=decoder),), q, 37, rel_table=table)
        got = attngen.scoremod.reference(mods, torch.zeros(1, 4, 37, 37))
        assert torch.allclose(got, want)
