"""Train a tiny character-level GPT three ways from the same start: attngen `causal()`, attngen
`causal() & sliding_window(64)` and PyTorch SDPA causal, and print the three loss curves side by side.

    python examples/04_train_tiny_lm.py            # 300 steps
    python examples/04_train_tiny_lm.py --steps 60

The text is the source of a few standard-library modules (nothing is downloaded), one character per token. All
runs start from the same weights and see the same batches in the same order, under bf16 autocast. attngen
causal and SDPA causal compute the same function, so their curves must agree. Their bf16 roundings differ a
little, and training amplifies such differences (measured on an H100: 0.027 by step 48), so the check is in two
parts: the first 50 steps within 0.05, every step within --tolerance (0.1); the script exits 1 otherwise. A
masking or gradient error moves the curve much further. The window run sees only the last 64 of its 256
characters of context. Needs a CUDA GPU; without one it says so and exits 0."""

import argparse
import copy
import importlib
import inspect
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import attngen

EARLY_STEPS, EARLY_TOLERANCE = 50, 0.05  # before differences have had time to grow (2% of the loss)
MODULES = ("argparse", "dataclasses", "functools", "json.decoder", "json.encoder", "string", "textwrap")


@dataclass(frozen=True)
class Config:
    vocab: int
    context: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4  # head_dim = d_model / n_head = 64
    n_kv_head: int = 2  # grouped-query attention: two query heads share each key/value head


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


def attngen_attend(pattern: attngen.Pattern):
    return lambda q, k, v: attngen.attention(q, k, v, pattern)


def sdpa_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def load_text() -> str:
    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)


def make_batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    """The same `steps` batches of (input, next-character target) for every run."""
    starts = torch.randint(len(data) - context - 1, (steps, batch), generator=torch.Generator().manual_seed(seed))
    offsets = torch.arange(context + 1)
    for s in starts:
        chunk = data[s[:, None] + offsets]
        yield chunk[:, :-1], chunk[:, 1:]


def train(model, attend, batches, lr: float, warmup: int, device: torch.device) -> tuple[list[float], float]:
    """Losses per step, and seconds per step (excluding the first, which compiles the kernels)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    losses, t0 = [], None
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x, attend)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())  # .item() waits for the step, so the wall clock below is honest
        t0 = t0 or time.perf_counter()
    return losses, (time.perf_counter() - t0) / max(1, len(losses) - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=0, help="print every N steps (default: about 15 rows)")
    parser.add_argument(
        "--tolerance", type=float, default=0.1, help="largest allowed |attngen causal - SDPA causal| loss gap"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("04_train_tiny_lm needs a CUDA GPU to train (attngen kernels run on CUDA); none found here.")
        return 0
    device = torch.device("cuda")

    text = load_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    cfg = Config(vocab=len(chars))
    torch.manual_seed(args.seed)
    start = GPT(cfg)
    n_params = sum(p.numel() for p in start.parameters())
    print(f"{len(text):,} characters of stdlib source, vocabulary {cfg.vocab}; model {n_params / 1e6:.2f} M params")
    print(f"{cfg}, batch {args.batch}, {args.steps} steps, bf16 autocast on {torch.cuda.get_device_name()}")

    runs = {
        "attngen causal": attngen_attend(attngen.causal()),
        f"attngen window {args.window}": attngen_attend(attngen.causal() & attngen.sliding_window(args.window)),
        "sdpa causal": sdpa_causal,
    }
    curves, step_s = {}, {}
    for name, attend in runs.items():
        batches = make_batches(data, args.steps, args.batch, cfg.context, args.seed)
        model = copy.deepcopy(start).to(device)
        curves[name], step_s[name] = train(model, attend, batches, args.lr, 30, device)

    every = args.every or max(1, args.steps // 15)
    names = list(runs)
    print(f"\n{'step':>12}" + "".join(f"{n:>22}" for n in names) + "    |attngen - sdpa|")
    for s in range(args.steps):
        if s % every == 0 or s == args.steps - 1:
            gap = abs(curves[names[0]][s] - curves[names[2]][s])
            print(f"{s:12d}" + "".join(f"{curves[n][s]:22.4f}" for n in names) + f"{gap:20.4f}")
    tail = max(1, args.steps // 10)
    print(f"{'mean last ' + str(tail):>12}" + "".join(f"{sum(curves[n][-tail:]) / tail:22.4f}" for n in names))
    print(f"{'ms/step':>12}" + "".join(f"{1e3 * step_s[n]:22.2f}" for n in names))

    gaps = [abs(a - b) for a, b in zip(curves[names[0]], curves[names[2]])]
    early, late = max(gaps[:EARLY_STEPS]), max(gaps)
    ok = early <= EARLY_TOLERANCE and late <= args.tolerance
    print(
        f"\nmax |attngen causal - sdpa causal| over the first {min(EARLY_STEPS, args.steps)} steps: {early:.4f} "
        f"(tolerance {EARLY_TOLERANCE}), over {args.steps} steps: {late:.4f} (tolerance {args.tolerance})"
    )
    print("PASS: attngen causal tracks SDPA causal" if ok else "FAIL: attngen causal and SDPA causal diverge")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
