"""attngen: declare an attention sparsity pattern in Python, get fused CUDA kernels (forward and backward).

pat = attngen.causal() & attngen.sliding_window(1024) | attngen.global_tokens(16)
out = attngen.attention(q, k, v, pat)
kern = attngen.compile(pat, head_dim=64, dtype=torch.bfloat16, arch="sm_90")"""

from ._version import __version__
from .errors import AttngenError, InputError
from .launch import Kernel, attention, compile
from .pattern import (
    Pattern,
    Sk,
    Sq,
    block_layout,
    causal,
    documents,
    full,
    global_tokens,
    k,
    key_padding,
    local,
    predicate,
    prefix_lm,
    q,
    sliding_window,
)

__all__ = [
    "AttngenError",
    "InputError",
    "Kernel",
    "Pattern",
    "Sk",
    "Sq",
    "__version__",
    "attention",
    "block_layout",
    "causal",
    "compile",
    "documents",
    "full",
    "global_tokens",
    "k",
    "key_padding",
    "local",
    "predicate",
    "prefix_lm",
    "q",
    "sliding_window",
]
