"""Causal-LM loss: the model's own objective, as a sum over trained tokens, without whole-batch logits.

With a 152k vocabulary the fp32 logits of a 4096-token micro-batch take 2.5 GB, more than a 7B Q-LoRA model's
weights. The fused paths compute the loss from the final hidden states instead:

* `liger`: Liger's fused linear + cross-entropy Triton kernel (CUDA; on CPU under `TRITON_INTERPRET=1`).
* `chunked`: the output layer and cross-entropy over chunks of trained positions, so at most one chunk of logits is
  alive. Each chunk's gradients are formed in the forward (Liger's scheme, in torch; a trained output layer's summed
  in fp32); where the weight is not a plain readable nn.Linear (ZeRO-3 partitions it, a LoRA-adapted head) each
  chunk is recomputed in backward through the module instead. Positions with label -100 are skipped entirely, which
  also saves their output-layer matmul. Works everywhere (CPU, ZeRO-3, PEFT-wrapped heads).
* `none`: the model's own logits (its forward applies whatever it applies), cross-entropy on them.

A fused path must reproduce what the model's forward does to the output layer's result before the loss
(`LogitTransform`: Gemma-2/3 soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`). `probe_matches`
checks that on real inputs at the start of training, so a family with a transform we do not know is caught.

Every function returns a *sum* over the trained tokens; the trainer divides by the trained-token count of the whole
global batch, which it counts itself (never trusting a model's `num_items_in_batch` support).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chattune.data.encode import IGNORE_INDEX

MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 256, 4096
CHUNK_LOGIT_BYTES = 1 << 30  # one chunk's fp32 logits at most (the backward holds their gradient beside them)


# --------------------------------------------------------------------------------------------------------------
# What the model does to lm_head's output
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap(scale * lm_head(h)), as the model's forward computes them."""

    scale: float = 1.0  # Cohere: logit_scale; Granite: 1 / logits_scaling
    softcap: float | None = None  # Gemma-2/3: final_logit_softcapping (cap * tanh(logits / cap))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        parts = [f"scale {self.scale:g}"] if self.scale != 1.0 else []
        parts += [f"soft-cap {self.softcap:g}"] if self.softcap is not None else []
        return ", ".join(parts) or "none"


def logit_transform(config: Any) -> LogitTransform:
    """The transform the model family applies after its output layer, read from its config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    logit_scale = getattr(text, "logit_scale", None)  # Cohere, Cohere2
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        scale *= float(logit_scale)
    logits_scaling = getattr(text, "logits_scaling", None)  # Granite, GraniteMoe
    if isinstance(logits_scaling, (int, float)) and not isinstance(logits_scaling, bool) and logits_scaling:
        scale /= float(logits_scaling)
    softcap = getattr(text, "final_logit_softcapping", None)  # Gemma-2, Gemma-3
    return LogitTransform(scale, float(softcap) if softcap else None)


# --------------------------------------------------------------------------------------------------------------
# Targets and the loss sums
# --------------------------------------------------------------------------------------------------------------


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (or logits) that predict a trained token, and those tokens (position t predicts label t+1).

    Selected from the shifted view by a [rows, length - 1] mask, which copies only the trained positions: reshaping
    the view first would copy all of it (for logits, a full-vocabulary copy of every prompt and padding position)."""
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    return hidden[:, :-1][keep], y[keep]


def trained_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the loss is over: labels after the shift that are not -100."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk: as many as keep one chunk's fp32 logits within CHUNK_LOGIT_BYTES (1,024 for Qwen's 152k
    vocabulary), a power of two in [256, 4096]. Every chunk reads the whole output layer again, so the chunk is sized
    in tokens, not as a share of the micro-batch (Liger's rule, which cuts an 8k-token micro-batch for a 1.5B Qwen
    into 90 chunks: a fixed 17-56 ms of re-reading the 152k-row head per micro-batch)."""
    fit = max(1, CHUNK_LOGIT_BYTES // (4 * vocab_size))
    return min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, 1 << (fit.bit_length() - 1)))


def liger_chunk_mem_const(n_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Liger's `chunk_mem_const` that gives its kernel chunks of at most `chunk_tokens` positions (and at least half
    that): Liger cuts n_tokens into ceil(vocab / (const x hidden)) parts, each rounded up to a power of two
    (ops/fused_linear_cross_entropy.py, liger-kernel 0.8.5)."""
    chunks = max(1, -(-n_tokens // chunk_tokens(vocab_size)))
    return max(1, vocab_size // (hidden_size * chunks))


def zero_loss(lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """0, but connected to the output layer and the hidden states: a micro-batch with no trained token still takes
    part in every rank's backward (DDP and ZeRO wait for every parameter's gradient), and nothing divides by 0."""
    return lm_head(hidden.reshape(-1, hidden.shape[-1])[:1]).float().sum() * 0


def _chunk_loss_sum(lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor,
                    transform: LogitTransform) -> torch.Tensor:
    return F.cross_entropy(transform.apply(lm_head(h).float()), y, reduction="sum")


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy sum of transform(h W^T + b) over chunks of positions, each chunk's gradients formed in the
    forward while its logits are alive (Liger's scheme, in torch): three matmuls per chunk (the logits, the hidden
    states' and the weight's gradients; two with a frozen output layer) where a chunk recomputed in backward runs
    four (three), and the weight's gradient is summed over the chunks in fp32, not in a bf16 weight's own dtype."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                step: int, transform: LogitTransform, dtype: torch.dtype, grads: bool) -> torch.Tensor:
        # needs_input_grad says what requires grad even under no_grad (evaluation): `grads` is the grad mode outside
        want_h, want_w, want_b = (grads and need for need in ctx.needs_input_grad[:3])
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], step):
                hc, yc = h[start:start + step].to(dtype), y[start:start + step]
                raw = torch.addmm(b, hc, w.t()) if b is not None else hc @ w.t()
                z = raw.float() * transform.scale if transform.scale != 1.0 else raw.float()
                capped = torch.tanh(z / transform.softcap) if transform.softcap is not None else None
                if capped is not None:
                    z = capped * transform.softcap
                lse = torch.logsumexp(z, dim=-1)
                total += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
                if not (want_h or want_w or want_b):
                    continue
                g = torch.exp(z.sub_(lse[:, None]))  # d loss / d transformed logits: softmax - one-hot
                g[torch.arange(yc.shape[0], device=g.device), yc] -= 1
                if capped is not None:
                    g *= 1 - capped * capped
                if transform.scale != 1.0:
                    g *= transform.scale
                g = g.to(dtype)
                if want_h:
                    grad_h[start:start + step] = g @ w
                if want_w:
                    grad_w += (g.t() @ hc).float()
                if want_b:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        if scaled[1] is not None:
            scaled[1] = scaled[1].to(ctx.dtypes[0])
        if scaled[2] is not None:
            scaled[2] = scaled[2].to(ctx.dtypes[1])
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None


def _eager_linear(lm_head: torch.nn.Module) -> torch.nn.Linear | None:
    """The output layer's nn.Linear where its weight can be read directly; None under ZeRO-3 (a partitioned weight is
    gathered only by the module's own forward) or for a wrapped layer (a LoRA-adapted head)."""
    try:
        linear = _plain_linear(lm_head)
    except TypeError:
        return None
    return None if hasattr(linear.weight, "ds_id") else linear


def chunked_loss_sum(lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, vocab_size: int,
                     transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    step = chunk_tokens(vocab_size)
    linear = _eager_linear(lm_head)
    if linear is not None:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else \
            linear.weight.dtype
        return _ChunkedCrossEntropy.apply(h, linear.weight, linear.bias, y, step, transform, dtype,
                                          torch.is_grad_enabled())
    # Checkpointed chunks through the module's own forward: ZeRO-3 gathers the weight there, in forward and again in
    # the recompute, and an adapted head runs its adapters.
    total = None
    for start in range(0, h.shape[0], step):
        stop = start + step
        part = checkpoint(_chunk_loss_sum, lm_head, h[start:stop], y[start:stop], transform, use_reentrant=False)
        total = part if total is None else total + part
    return total


def _plain_linear(lm_head: torch.nn.Module) -> torch.nn.Linear:
    """The nn.Linear whose weight the output layer's forward uses: itself, or a peft ModulesToSaveWrapper's active
    trained copy (its original while adapters are disabled)."""
    if isinstance(lm_head, torch.nn.Linear):
        return lm_head
    copies, original = getattr(lm_head, "modules_to_save", None), getattr(lm_head, "original_module", None)
    active = list(getattr(lm_head, "active_adapters", None) or [])
    if copies is not None and not getattr(lm_head, "disable_adapters", False) and len(active) == 1 and \
            active[0] in copies and isinstance(copies[active[0]], torch.nn.Linear):
        return copies[active[0]]
    if copies is not None and isinstance(original, torch.nn.Linear):
        return original
    raise TypeError(f"Liger's fused loss needs a plain nn.Linear output layer, not {type(lm_head).__name__}")


def liger_loss_sum(lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor,
                   transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    from liger_kernel.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction,
    )

    linear = _plain_linear(lm_head)
    bias = linear.bias
    if transform.scale != 1.0:  # scale * (W h + b) = W (scale h) + scale b: the kernel stays fused
        h = h * transform.scale
        bias = bias * transform.scale if bias is not None else None
    weight = linear.weight
    # A trained output layer's gradient is summed over the chunks in fp32, not in bf16.
    accumulate = torch.float32 if weight.requires_grad else None
    # The kernel does its own matmuls and needs one dtype: the autocast dtype where the forward ran under autocast
    # (as the model's own lm_head would compute), else the weight's.
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    weight, h = weight.to(dtype), h.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    const = liger_chunk_mem_const(h.shape[0], weight.shape[0], weight.shape[1])
    # The Function, not LigerFusedLinearCrossEntropyLoss, which does not pass chunk_mem_const (chattune.train.hf)
    loss, *_ = LigerFusedLinearCrossEntropyFunction.apply(
        h, weight, y, bias, None, IGNORE_INDEX, 0.0, 0.0, "sum", transform.softcap, False, accumulate, False, False,
        False, None, None, const)
    return loss


def _out_features(lm_head: torch.nn.Module) -> int:
    for module in lm_head.modules():  # a plain Linear, or one inside a peft ModulesToSaveWrapper
        if isinstance(module, torch.nn.Linear):
            return module.out_features
    return getattr(lm_head, "out_features", 32768)


def fused_loss_sum(kind: str, lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    """Sum of cross-entropy over the trained tokens, from the decoder's last hidden states (`kind`: liger|chunked)."""
    h, y = shifted_targets(hidden, labels)
    if y.numel() == 0:
        return zero_loss(lm_head, hidden)
    if kind == "liger":
        return liger_loss_sum(lm_head, h, y, transform)
    return chunked_loss_sum(lm_head, h, y, _out_features(lm_head), transform)


def logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over the trained tokens, from the model's own logits."""
    scores, y = shifted_targets(logits, labels)
    if y.numel() == 0:
        return logits.float().sum() * 0
    return F.cross_entropy(scores.float(), y, reduction="sum")


# --------------------------------------------------------------------------------------------------------------
# Choosing the path
# --------------------------------------------------------------------------------------------------------------


def base_model(model: Any) -> Any:
    """The transformers model under a peft adapter (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (unwrapped) model's forward computes logits for the last positions only (remote-code models
    predating `logits_to_keep` do not, and then need their own full-logits loss)."""
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def liger_runs_here() -> str | None:
    """Why Liger's Triton kernels cannot run in this process, or None when they can: CUDA, or the Triton interpreter
    on CPU (`TRITON_INTERPRET=1`, slow, for tests)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA GPU here (on CPU Liger runs only under TRITON_INTERPRET=1, for tests)"


