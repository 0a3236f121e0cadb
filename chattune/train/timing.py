"""The time model of the planner: training FLOPs per token (active experts only, recompute, attention over the
context), seconds per GPU kind at the fitted utilisation, and the printed time estimate. Memory is in
`chattune.train.memory`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chattune.train.memory import ModelShape, Setup, recomputed_layers


@dataclass(frozen=True)
class GpuKind:
    name: str
    bf16_flops: float  # dense tensor-core peak, bf16 with fp32 accumulate (the vendor's data sheet)
    memory_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s between GPUs of a node (NVLink, else PCIe)


GPU_KINDS = {
    "H100": GpuKind("H100 SXM", 989e12, 3.35e12, 450e9),
    "A100": GpuKind("A100 SXM", 312e12, 2.04e12, 300e9),
    "L40S": GpuKind("L40S", 362e12, 0.864e12, 32e9),
    "RTX4090": GpuKind("RTX 4090", 165e12, 1.01e12, 32e9),
    "RTX3090": GpuKind("RTX 3090", 71e12, 0.936e12, 32e9),
}
# Model FLOPs utilisation at long sequences: MFU_MAX x d / (d + MFU_HALF_HIDDEN) for hidden size d (narrow models use
# the tensor cores less well): 0.45 for d = 2048, 0.60 for 4096, 0.72 for 8192. Fitted on Qwen's published s/it (A100,
# flash-attention 2, gradient checkpointing); assumed to carry over to other cards in proportion to their peak.
MFU_MAX = 0.9
MFU_HALF_HIDDEN = 2048
# Q-LoRA dequantizes every quantized weight in each forward, recompute and backward pass: bytes moved per weight
# and pass (fitted on Qwen's GPTQ Q-LoRA rows; the kernels are far from the bandwidth bound).
DEQUANT_BYTES_PER_WEIGHT = 20
# A floor per micro-batch and decoder layer, whatever its size: kernel launches and Python in the forward,
# recompute and backward passes (Qwen's 1.8B model takes 1.0 s per 8 micro-batches at 256 and at 1024 tokens).
LAYER_SECONDS = 0.004


def flops_per_token(shape: ModelShape, s: Setup, sequence_tokens: int) -> float:
    """Training FLOPs per token: the matmuls of the decoder and output layer (2 per weight forward; of an MoE layer
    only the token's top-k experts), attention over a causal context of `sequence_tokens` in the softmax-attention
    layers (flash-attention skips the masked half; linear-attention layers cost per token), backward twice the
    forward for what is trained and once for frozen weights (gradients of their inputs only), and a second forward
    with gradient checkpointing."""
    weights = shape.active_matmul_params + shape.vocab_size * shape.hidden_size
    forward = 2 * weights
    layers = shape.num_layers if shape.attention_layers is None else shape.attention_layers
    attention = 2 * layers * shape.hidden_size * sequence_tokens  # QK^T and AV over ~half the context
    backward = (2 if s.mode == "full" else 1) * forward + 2 * attention
    share = recomputed_layers(shape.num_layers, s) / max(1, shape.num_layers)
    recompute = (forward - 2 * shape.vocab_size * shape.hidden_size + attention) * share
    return forward + attention + backward + recompute


def estimate_seconds(shape: ModelShape, s: Setup, tokens: float, gpu: str = "H100", sequence_tokens: float = 0,
                     micro_batches: float | None = None) -> float:
    """Seconds for one GPU to train on `tokens` tokens (padding included) in `micro_batches` micro-batches (default:
    full ones of s.micro_batch_tokens) of sequences of `sequence_tokens` (default the whole micro-batch), from FLOPs
    at the fitted utilisation, plus a per-layer floor, Q-LoRA's dequantization and ZeRO-3's parameter gathering per
    micro-batch."""
    kind = GPU_KINDS[gpu]
    t = s.micro_batch_tokens
    mfu = MFU_MAX * shape.hidden_size / (shape.hidden_size + MFU_HALF_HIDDEN)
    seconds = tokens * flops_per_token(shape, s, sequence_tokens or t) / (kind.bf16_flops * mfu)
    micro_batches = tokens / t if micro_batches is None else micro_batches
    passes = 2 + recomputed_layers(shape.num_layers, s) / max(1, shape.num_layers)
    seconds += micro_batches * shape.num_layers * LAYER_SECONDS
    if s.mode == "qlora":
        seconds += micro_batches * passes * shape.linear_params * DEQUANT_BYTES_PER_WEIGHT / kind.memory_bandwidth
    if s.zero_stage == 3 and s.gpus > 1:  # every pass gathers the other GPUs' shards of every weight
        gathered = shape.total * s.bytes_per_weight * (s.gpus - 1) / s.gpus
        seconds += micro_batches * passes * gathered / kind.link_bandwidth
    return seconds


@dataclass(frozen=True)
class DataPlan:
    """What the user's tokenized data means for the planner, batched as training batches it (plan.Batch): the largest
    micro-batch (activations), the tokens the GPUs process per epoch (padding included), and the token-weighted
    sample length (attention cost)."""
    samples: int
    tokens: int  # real tokens
    processed_tokens: int  # real + padding
    micro_batches: int
    peak_micro_batch_tokens: int
    sequence_tokens: float  # sum(length^2) / sum(length)
    packing: bool


def token_weighted_length(lengths: Any) -> float:
    """sum(length^2) / sum(length): the sequence length the average token attends over (attention cost)."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.float64)
    return float((lengths**2).sum() / lengths.sum())


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_time(shape: ModelShape, s: Setup, plan: DataPlan | None, epochs: float) -> str:
    """Estimated time per epoch and for the run on each GPU kind (with the data), or per 1,000 micro-batches of the
    worst case (without)."""
    lines = [f"time estimate, {s.gpus} GPU(s) (throughput fitted on Qwen's published A100 profile; README \"Memory "
             "and time\" gives its error)"]
    if plan is None:
        tokens = 1000 * s.micro_batch_tokens
        lines.append(f"  no --data_path: per 1,000 micro-batches of {s.micro_batch_tokens} tokens per GPU "
                     "(pass --data_path for the time per epoch of your data)")
        for key, kind in GPU_KINDS.items():
            lines.append(f"  {kind.name:<10} {format_duration(estimate_seconds(shape, s, tokens, key)):>8}")
        return "\n".join(lines)
    padding = plan.processed_tokens - plan.tokens
    lines.append(f"  data: {plan.samples:,} samples, {plan.tokens:,} tokens"
                 + (f" + {padding:,} padding ({padding / max(plan.processed_tokens, 1):.0%})" if padding else "")
                 + f", {plan.micro_batches:,} micro-batch(es) per epoch, "
                 + ("packed" if plan.packing else "padded to the longest of each batch")
                 + f"; largest {plan.peak_micro_batch_tokens:,} tokens")
    per_gpu = plan.processed_tokens / s.gpus
    for key, kind in GPU_KINDS.items():
        epoch = estimate_seconds(shape, s, per_gpu, key, sequence_tokens=plan.sequence_tokens,
                                 micro_batches=plan.micro_batches / s.gpus)
        lines.append(f"  {kind.name:<10} {format_duration(epoch):>8} per epoch, {format_duration(epoch * epochs):>8} "
                     f"for {epochs:g} epoch(s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------------------------------------------
