"""Train a tiny character-level GPT with Sparse Flash Attention's hash attention and query/key dropping.

Three runs from the same start: dense `causal()`, hash attention `predicate("k < q") & lsh(8)` and query/key
dropping `causal() & keep()`; the script prints their loss curves side by side and the median time per step.

    python examples/08_train_lsh_attention.py                        # 300 steps
    python examples/08_train_lsh_attention.py --steps 60
    python examples/08_train_lsh_attention.py --buckets 16 --drop 0.3
    python examples/08_train_lsh_attention.py --context 2048 --batch 8

Sparse Flash Attention: Pagliardini et al., "Fast Attention Over Long Sequences With Dynamic Sparse Flash Attention"
(NeurIPS 2023, arXiv 2306.01160). Hash attention puts every query and key in one of --buckets buckets by angular LSH
(per key/value head a random D x n/2 matrix R, bucket = argmax([xR, -xR])), and a query attends only to the earlier
keys of its own bucket; as in the paper's language models the inequality is strict, so a token does not attend to
itself and the first token of a sequence outputs 0. R is drawn afresh on every call (every layer of every step), as
SFA does during training. Query/key dropping drops a random --drop share of the queries and of the keys of every
head, again afresh on every call: a dropped key is seen by no query, a dropped query outputs 0. For both,
attngen.attention sorts the tokens of every head by bucket (dropped tokens last), runs the kernels on the sorted
tokens, skipping the tiles with no kept pair, and puts the outputs back in order; hashing, sorting and moving back
are part of the call and of the times printed. The backward uses the buckets and keep masks of its forward.

The model (that of 04_train_tiny_lm.py, written out again here), the text (the source of a few standard-library
modules, one character per token, nothing downloaded), the starting weights and the batches are the same for
every run, under bf16 autocast. The script exits 1 if a loss is not finite or if a run ends (mean of the last
tenth of its steps) less than --min-drop below the loss of its first step. Needs a CUDA GPU; without one it says
so and exits 0."""

import argparse
import copy
import importlib
import inspect
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import attngen

MODULES = ("argparse", "dataclasses", "functools", "json.decoder", "json.encoder", "string", "textwrap")


@dataclass(frozen=True)
class Config:
    vocab: int
    context: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4  # head_dim = d_model / n_head = 64
    n_kv_head: int = 2  # grouped-query attention: two query heads share each key/value head (and its LSH matrix)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.hd = cfg.d_model // cfg.n_head
        self.split = [cfg.n_head * self.hd, cfg.n_kv_head * self.hd, cfg.n_kv_head * self.hd]
        self.qkv = nn.Linear(cfg.d_model, sum(self.split), bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, attend):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, -1, self.hd).transpose(1, 2) for t in self.qkv(x).split(self.split, dim=-1))
        return self.proj(attend(q, k, v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )

    def forward(self, x, attend):
        x = x + self.attn(self.ln1(x), attend)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied input and output embeddings
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5 if name.endswith("proj.weight") else 0.02)

    def forward(self, idx, attend):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x, attend)
        return self.head(self.ln_f(x))


def dense_attend():
    """Dense causal attention: every key not after the query."""
    pattern = attngen.causal()
    return lambda q, k, v: attngen.attention(q, k, v, pattern)


def hash_attend(n_buckets: int):
    """SFA's hash attention for language models: the strictly earlier keys of the query's LSH bucket. `lsh(n)` has
    no seed, so every call hashes with a new random R (the backward reuses its forward's buckets)."""
    pattern = attngen.predicate("k < q") & attngen.lsh(n_buckets)
    return lambda q, k, v: attngen.attention(q, k, v, pattern)


def drop_attend(rate: float):
    """SFA's query/key dropping: causal attention among the tokens kept; a new random choice on every call, per
    batch row and head (keys per key/value head)."""
    pattern = attngen.causal() & attngen.keep()

    def attend(q, k, v):
        query_keep = torch.rand(q.shape[:3], device=q.device) >= rate  # [B, Hq, S], True = kept
        key_keep = torch.rand(k.shape[:3], device=k.device) >= rate  # [B, Hkv, S]
        return attngen.attention(q, k, v, pattern, query_keep=query_keep, key_keep=key_keep)

    return attend


def load_text() -> str:
    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)


def make_batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    """The same `steps` batches of (input, next-character target) for every run."""
    starts = torch.randint(len(data) - context - 1, (steps, batch), generator=torch.Generator().manual_seed(seed))
    offsets = torch.arange(context + 1)
    for s in starts:
        chunk = data[s[:, None] + offsets]
        yield chunk[:, :-1], chunk[:, 1:]


def train(model, attend, batches, lr: float, warmup: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Loss and wall-clock seconds of every step (the first includes compiling the kernels)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    losses, seconds = [], []
    for x, y in batches:
        t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x, attend)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())  # .item() waits for the step, so the wall clock is honest
        seconds.append(time.perf_counter() - t0)
    return losses, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=256, help="characters per sequence")
    parser.add_argument("--buckets", type=int, default=8, help="LSH buckets of the hash attention (even)")
    parser.add_argument("--drop", type=float, default=0.5, help="share of queries and of keys dropped per call")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=0, help="print every N steps (default: about 15 rows)")
    parser.add_argument(
        "--min-drop", type=float, default=1.0, help="least fall of every run's loss from its first step"
    )
    args = parser.parse_args()
    if args.buckets < 2 or args.buckets % 2:
        parser.error(f"--buckets must be an even number of at least 2, got {args.buckets}")
    if not 0 <= args.drop < 1:
        parser.error(f"--drop must be at least 0 and below 1, got {args.drop}")
    runs = {
        "causal()": dense_attend(),
        f"k < q & lsh({args.buckets})": hash_attend(args.buckets),
        f"causal & drop {args.drop:g}": drop_attend(args.drop),
    }
    patterns = f"causal(), predicate('k < q') & lsh({args.buckets}) and causal() & keep() (drop {args.drop:g})"
    if not torch.cuda.is_available():
        print("08_train_lsh_attention needs a CUDA GPU to train (attngen kernels run on CUDA); none found here.")
        print(f"It compares {patterns}.")
        return 0
    device = torch.device("cuda")

    text = load_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    cfg = Config(vocab=len(chars), context=args.context)
    torch.manual_seed(args.seed)
    start = GPT(cfg)
    n_params = sum(p.numel() for p in start.parameters())
    print(f"{len(text):,} characters of stdlib source, vocabulary {cfg.vocab}; model {n_params / 1e6:.2f} M params")
    print(f"{cfg}, batch {args.batch}, {args.steps} steps, bf16 autocast on {torch.cuda.get_device_name()}")
    print(f"attention: {patterns}; a new hash and new keep masks on every call")

    curves, seconds = {}, {}
    for name, attend in runs.items():
        torch.manual_seed(args.seed + 1)  # the same random hashes and keep masks on every run of the script
        batches = make_batches(data, args.steps, args.batch, cfg.context, args.seed)
        model = copy.deepcopy(start).to(device)
        curves[name], seconds[name] = train(model, attend, batches, args.lr, 30, device)

    names = list(runs)
    every = args.every or max(1, args.steps // 15)
    print(f"\n{'step':>12}" + "".join(f"{n:>24}" for n in names))
    for s in range(args.steps):
        if s % every == 0 or s == args.steps - 1:
            print(f"{s:12d}" + "".join(f"{curves[n][s]:24.4f}" for n in names))
    tail = max(1, args.steps // 10)
    final = {n: sum(c[-tail:]) / tail for n, c in curves.items()}
    # The first step compiles the kernels (or loads them from the cache): left out of the median.
    step_ms = {n: 1e3 * statistics.median(s[1:] or s) for n, s in seconds.items()}
    print(f"{'mean last ' + str(tail):>12}" + "".join(f"{final[n]:24.4f}" for n in names))
    print(f"{'ms/step':>12}" + "".join(f"{step_ms[n]:24.2f}" for n in names) + "   (median)")

    dense = names[0]
    print(f"\nover the last {tail} steps, against dense {dense} ({final[dense]:.4f}, {step_ms[dense]:.2f} ms/step):")
    for n in names[1:]:
        print(f"  {n:<22} loss {final[n] - final[dense]:+.4f}, time per step x{step_ms[n] / step_ms[dense]:.2f}")
    finite = all(math.isfinite(x) for c in curves.values() for x in c)
    learned = {n: curves[n][0] - final[n] for n in names}
    ok = finite and min(learned.values()) >= args.min_drop
    falls = ", ".join(f"{n} {d:.4f}" for n, d in learned.items())
    print(f"{'every loss is' if finite else 'not every loss is'} finite; fall of the loss from the first step to the")
    print(f"mean of the last {tail}: {falls} (at least {args.min_drop})")
    print("PASS: all three attentions train" if ok else "FAIL: a run did not train")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
