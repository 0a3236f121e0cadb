"""Linear-attention layers on packed rows: Gated DeltaNet (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) keeps a recurrent state
and a short causal convolution that must both start fresh at every sample of a packed row.

transformers 5.23 passes the row's sample boundaries (`cu_seq_lens_q`) down to these layers, but its torch fallbacks
ignore them (and refuse them when given), and the CUDA kernels honour them only when both flash-linear-attention
(`cu_seqlens`) and causal-conv1d (`seq_idx`) are installed and both are passed. The functions here keep the samples
apart on every device:

* `packed_causal_conv1d`: each tap of the depthwise convolution masked where it would read the previous sample
  (exact); on CUDA, causal-conv1d with `seq_idx` (or flash-linear-attention's varlen conv with `cu_seqlens`).
* `packed_chunk_gated_delta_rule`: the recurrence run on a right-padded batch of the row's samples, each from a zero
  state (exact: the rule is causal, so right padding cannot reach a real position); on CUDA, flash-linear-attention's
  kernel with `cu_seqlens`.

chattune.train.hf installs them into the modeling modules (that part reaches into transformers' internals).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# The transformers modeling modules whose Gated DeltaNet layers call `causal_conv1d_fn` and
# `torch_chunk_gated_delta_rule` as module globals (transformers 5.23).
GATED_DELTANET_MODULES = {
    "qwen3_5": "transformers.models.qwen3_5.modeling_qwen3_5",
    "qwen3_5_text": "transformers.models.qwen3_5.modeling_qwen3_5",
    "qwen3_5_moe": "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "qwen3_5_moe_text": "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "qwen3_next": "transformers.models.qwen3_next.modeling_qwen3_next",
}


def kernels_available() -> dict[str, bool]:
    """Which CUDA kernels for these layers are installed (they run only on CUDA tensors)."""
    return {"flash-linear-attention": importlib.util.find_spec("fla") is not None,
            "causal-conv1d": importlib.util.find_spec("causal_conv1d") is not None}


def kernel_problem(cuda: bool) -> str | None:
    """Why the Gated DeltaNet layers will run the slow torch path, or None when the CUDA kernels will run."""
    if not cuda:
        return "no CUDA GPU"
    missing = [name for name, present in kernels_available().items() if not present]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -r requirements-cuda.txt)"
    return None


def seq_idx_of(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """The sample index of every position of a packed row, (1, length) int32, from the cumulative lengths."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu.diff()
    seq_idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device, dtype=torch.int32), lengths)
    if seq_idx.numel() != length:
        raise ValueError(f"the sample boundaries cover {seq_idx.numel()} tokens, the packed row has {length}")
    return seq_idx[None]


def masked_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                         seq_idx: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution of x (B, C, T) with weight (C, W) in which no tap reads across a sample boundary:
    the tap j positions back is masked where that position belongs to another sample."""
    taps = weight.shape[-1]
    length = x.shape[-1]
    inputs = x.to(weight.dtype)
    out = inputs * weight[:, taps - 1, None]
    for j in range(1, taps):
        same = (F.pad(seq_idx, (j, 0), value=-1)[..., :length] == seq_idx)[:, None].to(inputs.dtype)
        out = out + F.pad(inputs, (j, 0))[..., :length] * same * weight[:, taps - 1 - j, None]
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        if activation not in ("silu", "swish"):
            raise NotImplementedError(f"activation {activation}")
        out = F.silu(out)
    return out.to(x.dtype)


def padded_segments(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(1, T, ...) -> (samples, longest, ...) right-padded with zeros, and the index to gather the row back."""
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    lengths = cu.diff()
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
    offset = torch.arange(x.shape[1], device=x.device) - cu[:-1][sample]
    out = x.new_zeros((lengths.numel(), int(lengths.max())) + tuple(x.shape[2:]))
    out[sample, offset] = x[0]
    return out, (sample, offset)


def segmented_chunk_rule(torch_rule: Callable, query, key, value, g, beta, cu_seqlens, **kwargs) -> torch.Tensor:
    """The torch chunk rule with a zero initial state for every sample of the row: the samples as a right-padded
    batch, run once, gathered back (exact, because the rule is causal)."""
    q, index = padded_segments(query, cu_seqlens)
    out, _ = torch_rule(q, padded_segments(key, cu_seqlens)[0], padded_segments(value, cu_seqlens)[0],
                        g=padded_segments(g, cu_seqlens)[0], beta=padded_segments(beta, cu_seqlens)[0],
                        initial_state=None, output_final_state=False, **kwargs)
    return out[index][None]


def boundaries(kwargs: dict[str, Any], length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(cu_seqlens, seq_idx) of a packed row from the layer's keyword arguments, or (None, None) when not packed."""
    cu, seq_idx = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens")), kwargs.get("seq_idx")
    if cu is None and seq_idx is None:
        return None, None
    if cu is None:
        flat = seq_idx.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        positions = starts.nonzero().flatten()
        cu = torch.cat([positions, positions.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, seq_idx if seq_idx is not None else seq_idx_of(cu, length)


def packed_causal_conv1d(torch_conv: Callable, hidden_states: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None, **kwargs) -> torch.Tensor:
    """`causal_conv1d_fn` of the modeling module, keeping packed samples apart (see the module docstring)."""
    cu, seq_idx = boundaries(kwargs, hidden_states.shape[-1])
    if cu is None:
        return torch_conv(hidden_states, weight, bias, activation)
    if hidden_states.shape[0] != 1:
        raise ValueError("packed rows have batch size 1")
    seq_idx = seq_idx.to(hidden_states.device)
    if hidden_states.is_cuda and kernels_available()["causal-conv1d"]:
        from causal_conv1d import causal_conv1d_fn

        x = hidden_states if hidden_states.stride(1) == 1 else hidden_states.transpose(1, 2).contiguous().transpose(1, 2)
        return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx.to(torch.int32).contiguous(), activation=activation)
    if hidden_states.is_cuda and kernels_available()["flash-linear-attention"]:
        from fla.modules.causal_conv1d import causal_conv1d

        out, _ = causal_conv1d(x=hidden_states.transpose(1, 2).contiguous(), weight=weight, bias=bias,
                               activation=activation, cu_seqlens=cu.to(hidden_states.device))
        return out.transpose(1, 2)
    return masked_causal_conv1d(hidden_states, weight, bias, activation, seq_idx)


def packed_chunk_gated_delta_rule(torch_rule: Callable, query, key, value, g, beta, chunk_size: int = 64,
                                  initial_state=None, output_final_state: bool = False,
                                  use_qk_l2norm_in_kernel: bool = False, cu_seqlens=None, **kwargs):
    """`torch_chunk_gated_delta_rule` of the modeling module, keeping packed samples apart (module docstring); the
    CUDA kernel of flash-linear-attention on CUDA tensors, the torch rule elsewhere (never the kernel on a CPU)."""
    cu, _ = boundaries({"cu_seq_lens_q": cu_seqlens, **kwargs}, query.shape[1])
    fla = query.is_cuda and kernels_available()["flash-linear-attention"]
    if fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        if cu is not None and query.shape[0] != 1:
            raise ValueError("packed rows have batch size 1")
        return chunk_gated_delta_rule(query, key, value, g=g, beta=beta, initial_state=initial_state,
                                      output_final_state=output_final_state,
                                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                      cu_seqlens=None if cu is None else cu.to(query.device))
    if cu is None:
        return torch_rule(query, key, value, g=g, beta=beta, chunk_size=chunk_size, initial_state=initial_state,
                          output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    if initial_state is not None or output_final_state:
        raise ValueError("packed rows are for training: no cache (use_cache=False)")
    return segmented_chunk_rule(torch_rule, query, key, value, g, beta, cu, chunk_size=chunk_size,
                                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel), None
