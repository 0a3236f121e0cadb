"""torch's own variable-length attention for packed rows (`--attn_implementation torch_varlen`).

torch 2.10+ ships the flash-attention 2 kernels behind `torch.nn.attention.varlen.varlen_attn`: attention over
packed samples given their boundaries, each sample attending only to itself, with no flash-attn wheel (none is built
for torch 2.13) and no per-shape compilation (flex_attention's cost on the first steps).

It is registered with transformers as an attention implementation (`AttentionInterface.register`, public). It reads
no mask: the sample boundaries come from the packing collator's `cu_seq_lens_q/k` and `max_length_q/k`, which the
model passes down to its attention as flash-attention's kwargs (transformers builds no mask for an implementation it
has no mask function for anyway: masking_utils._preprocess_mask_arguments, 5.23 L841).

Opt-in until a GPU run of tests/test_gpu.py shows it equal to sdpa per sample and bench/throughput.py shows it pays;
`auto` keeps flash-attn where it is installed, else flex_attention.
"""

from __future__ import annotations

from typing import Any

import torch

from chattune.errors import ConfigError

NAME = "torch_varlen"


def varlen_problem(cuda: bool) -> str | None:
    """Why torch's varlen attention cannot run here, or None."""
    if not cuda:
        return "no CUDA GPU"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch 2.10 or newer has)"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"its flash-attention kernels need an Ampere or newer GPU (compute capability " \
               f"{torch.cuda.get_device_capability()})"
    return None


def _kernel() -> Any:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, softcap: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (batch, heads, tokens, dim), key/value (batch, kv heads, tokens, dim)
    in; (batch, tokens, heads, dim) out. Packed rows come as one row per micro-batch (batch 1)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        raise ConfigError("--attn_implementation torch_varlen attends within packed rows, and this batch has no sample "
                          "boundaries (cu_seq_lens): use --packing true, or another --attn_implementation")
    if softcap is not None:
        raise ConfigError(f"--attn_implementation torch_varlen: {type(module).__name__} soft-caps its attention scores, "
                          "which torch's varlen kernel does not; use flex_attention or sdpa")
    if dropout:
        raise ConfigError("--attn_implementation torch_varlen has no attention dropout; set the model's "
                          "attention_dropout to 0 or use sdpa")
    batch, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * tokens, heads, dim)
    k = key.transpose(1, 2).reshape(batch * tokens, kv_heads, key.shape[-1])
    v = value.transpose(1, 2).reshape(batch * tokens, kv_heads, value.shape[-1])
    # causal: (-1, 0); a sliding window of w tokens sees itself and the w - 1 before it (transformers' flash path)
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    out = _kernel()(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(kwargs["max_length_q"]),
                    int(kwargs["max_length_k"]), scale=scaling, window_size=window, enable_gqa=kv_heads != heads)
    return out.reshape(batch, tokens, heads, value.shape[-1]), None


def register() -> None:
    """Make `torch_varlen` an attention implementation transformers accepts (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
