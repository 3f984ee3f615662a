"""attngen: declare an attention sparsity pattern in Python, get fused CUDA kernels (forward and backward).

pat = attngen.causal() & attngen.sliding_window(1024) | attngen.global_tokens(16)
out = attngen.attention(q, k, v, pat)
kern = attngen.compile(pat, head_dim=64, dtype=torch.bfloat16, arch="sm_90")

The public names load on first use (PEP 562), so `import attngen` and the CLI's cache commands do not import torch,
sympy or CuPy until something needs them."""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import AttngenError, InputError

# public name -> the module that defines it
_LAZY = {name: ".launch" for name in ("Kernel", "attention", "compile", "selected_blocks", "selected_keys")}
_LAZY |= {"nm": ".select.nm"}
_LAZY |= {name: ".scoremod" for name in ("softcap", "alibi", "bias", "rel_bias", "head_scale")}
_LAZY |= {
    name: ".pattern"
    for name in (
        "Pattern",
        "Sk",
        "Sq",
        "block_layout",
        "buckets",
        "causal",
        "documents",
        "full",
        "global_tokens",
        "in_document",
        "indexer",
        "k",
        "keep",
        "key_indices",
        "key_padding",
        "local",
        "lowrank",
        "lsh",
        "predicate",
        "prefix_lm",
        "q",
        "random_projection",
        "sliding_window",
        "threshold",
        "topk",
        "topk_blocks",
    )
}

# Bound only when asked for: its graph break (torch.compiler.disable) imports torch._dynamo, ~0.7 s.
_ON_DEMAND = {"lsh_buckets": ".hashing"}

__all__ = ["AttngenError", "InputError", "__version__", *sorted(_LAZY | _ON_DEMAND), "distributed"]


_SUBMODULES = ("distributed",)  # attngen.distributed: context parallelism over torch.distributed


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _ON_DEMAND:
        globals()[name] = getattr(importlib.import_module(_ON_DEMAND[name], __name__), name)
        return globals()[name]
    if name not in _LAZY:
        raise AttributeError(f"module 'attngen' has no attribute {name!r}")
    # Everything at once: the first use of any public name (building a pattern, usually) binds them all, so that code
    # traced later by torch.compile finds plain attributes.
    for public, module in _LAZY.items():
        globals()[public] = getattr(importlib.import_module(module, __name__), public)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_ON_DEMAND) | set(_SUBMODULES))
