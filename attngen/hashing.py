"""Angular LSH buckets (Sparse Flash Attention's hash): q [B, Hq, Sq, D], k [B, Hkv, Sk, D] -> int32 bucket ids
[B, Hq, Sq] and [B, Hkv, Sk] in [0, n). Per KV head a D x n/2 matrix R of standard-normal entries; bucket(x) =
argmax([xR, -xR]) in float32 (the first of equal maxima); queries use their KV head's R. A seeded R is drawn on the
CPU (the same on every machine); without a seed, a fresh R is drawn on q's device at every call."""

from __future__ import annotations

import functools

import torch

from .errors import InputError

MAX_BUCKETS = 2**16


def check(n: object, seed: object) -> None:
    """Refuse a number of buckets that is not an even int from 2 to 2**16, or a seed that is not None or an int from
    0 to 2**63 - 1."""
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_BUCKETS or n % 2:
        raise InputError(
            f"lsh(n): n must be an even integer from 2 to {MAX_BUCKETS} (n/2 random directions, each with its "
            f"opposite), got {n!r:.40}"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InputError(f"lsh(n, seed): seed must be None or an integer from 0 to 2**63 - 1, got {seed!r:.40}")


def lsh_directions(heads: int, head_dim: int, n: int, seed: int | None, device) -> torch.Tensor:
    """R, float32 [heads, head_dim, n / 2] on `device`: drawn on the CPU from `seed` (the same R on every machine;
    uploaded once, so later calls do not synchronise with the host), or, when `seed` is None, a fresh draw on the
    device from torch's generator there."""
    if seed is None:
        return torch.randn(heads, head_dim, n // 2, dtype=torch.float32, device=device)
    return _seeded(heads, head_dim, n, seed, torch.device(device))


@torch.compiler.disable  # a torch.Generator cannot be made inside a compiled region: traced, this is a graph break
@functools.lru_cache(maxsize=64)
def _seeded(heads: int, head_dim: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, head_dim, n // 2, generator=gen, dtype=torch.float32).to(device)


def lsh_buckets(q: torch.Tensor, k: torch.Tensor, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_buckets [B, Hq, Sq], key_buckets [B, Hkv, Sk]), int32: exactly the buckets `lsh(n, seed)` uses, so
    `attention(q, k, v, causal() & lsh(n, seed=s))` equals `attention(q, k, v, causal() & buckets(),
    query_buckets=qb, key_buckets=kb)` with `qb, kb = lsh_buckets(q, k, n, s)`."""
    check(n, seed)
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise InputError(f"lsh_buckets: {name} must be a floating [batch, heads, seq, head_dim] tensor")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise InputError(f"lsh_buckets: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head_dim")
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[3]
    r = lsh_directions(Hkv, D, n, seed, q.device)

    def bucket(x: torch.Tensor, rx: torch.Tensor) -> torch.Tensor:
        proj = torch.matmul(x.float(), rx)  # [B, H, S, n/2]
        return torch.argmax(torch.cat([proj, -proj], dim=-1), dim=-1).to(torch.int32)

    with torch.autocast(q.device.type, enabled=False):
        return bucket(q, r.repeat_interleave(Hq // Hkv, dim=0)), bucket(k, r)
