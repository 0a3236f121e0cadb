"""Causal-LM loss without materializing the logits of the whole batch.

With a 152k vocabulary the fp32 logits of a 4096-token micro-batch take 2.5 GB, more than a 7B Q-LoRA model's
weights. Both paths here compute the loss from the final hidden states instead:

* `liger`: Liger's fused linear + cross-entropy Triton kernel (CUDA), on a plain `lm_head` weight.
* `chunked`: the output layer and cross-entropy over chunks of trained positions, each chunk recomputed in backward
  (activation checkpointing), so at most one chunk of logits is alive. Positions with label -100 are skipped
  entirely, which also saves their output-layer matmul. Works everywhere (CPU, ZeRO-3, PEFT-wrapped heads).

The result is the sum of token losses divided by `num_items_in_batch` (the trained-token count of the global batch,
computed by the Trainer across gradient accumulation and data-parallel ranks), exactly like transformers' loss.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chattune.errors import ConfigError
from chattune.template import IGNORE_INDEX

MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 256, 4096


def chunk_tokens(n_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Positions per chunk so that one chunk's logits take about as much memory as the batch's hidden states
    (Liger's rule), within [256, 4096] so small models do not loop over tiny matmuls."""
    ratio = max(1, -(-vocab_size // hidden_size))
    want = max(1, -(-n_tokens // ratio))
    return min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, 1 << (want - 1).bit_length()))


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a trained token, and those tokens (position t predicts label t+1)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


def _chunk_loss_sum(lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), y, reduction="sum")


def chunked_loss_sum(lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, vocab_size: int) -> torch.Tensor:
    total = h.sum().float() * 0  # keeps the graph (and every rank's backward) alive for a chunk-free micro-batch
    step = chunk_tokens(h.shape[0], vocab_size, h.shape[-1])
    for start in range(0, h.shape[0], step):
        stop = start + step
        total = total + checkpoint(_chunk_loss_sum, lm_head, h[start:stop], y[start:stop], use_reentrant=False)
    return total


def liger_loss_sum(lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
        lm_head.weight, h, y, getattr(lm_head, "bias", None)
    )


def _out_features(lm_head: torch.nn.Module) -> int:
    for module in lm_head.modules():  # a plain Linear, or one inside a peft ModulesToSaveWrapper
        if isinstance(module, torch.nn.Linear):
            return module.out_features
    return getattr(lm_head, "out_features", 32768)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (unwrapped) model's forward computes logits for the last positions only (remote-code models
    predating `logits_to_keep` do not, and then need their own full-logits loss)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def resolve_fused_ce(requested: str, lm_head: torch.nn.Module, zero3: bool) -> str:
    """auto: Liger on CUDA for a plain nn.Linear head (not ZeRO-3 partitioned), else chunked."""
    choices = ("auto", "liger", "chunked", "none")
    if requested not in choices:
        raise ConfigError(f"--fused_ce {requested!r}: choose one of {', '.join(choices)}")
    liger_ok = (
        torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
        and type(lm_head) is torch.nn.Linear and not zero3
    )
    if requested == "liger" and not liger_ok:
        raise ConfigError("--fused_ce liger needs liger-kernel on CUDA and a plain (not ZeRO-3 partitioned, not "
                          "adapter-wrapped) output layer; use --fused_ce chunked")
    if requested == "auto":
        return "liger" if liger_ok else "chunked"
    return requested


def causal_lm_loss(kind: str, lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: Any = None) -> torch.Tensor:
    h, y = shifted_targets(hidden, labels)
    if kind == "liger":
        total = liger_loss_sum(lm_head, h, y)
    else:
        total = chunked_loss_sum(lm_head, h, y, _out_features(lm_head))
    denominator = num_items_in_batch if num_items_in_batch is not None else y.numel()
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator
