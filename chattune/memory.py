"""Per-GPU memory estimate from the model config alone (no weights), with a verdict per card and the cheapest fix.

The model is built on the meta device to count parameters by kind (decoder linear layers, embeddings/output layer,
the rest), so MoE, GLM and remote-code models are counted as they are. Then, per GPU:

    weights + gradients + optimizer states   by mode (full/LoRA/Q-LoRA), dtype, ZeRO stage, offload, GPU count
    activations                              per token and layer; with gradient checkpointing one layer input each
    logits                                   full vocabulary for the micro-batch, or one chunk with a fused loss
    overhead                                 CUDA context and allocator slack

The estimate is a planning tool: it is meant to be within ~15% of the measured peak for dense decoder models, and it
errs on the high side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

GB = 2**30
CARDS = (24, 40, 80)
CUDA_CONTEXT_BYTES = 0.5 * GB
ALLOCATOR_SLACK = 1.03  # allocator rounding and transient buffers


@dataclass(frozen=True)
class ModelShape:
    linear_params: int  # decoder nn.Linear weights (what LoRA adapts and Q-LoRA quantizes)
    embedding_params: int  # input embeddings + output layer (counted once when tied)
    other_params: int  # norms, biases, routers, fused expert weights
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    lora_params_per_rank: int  # trainable LoRA parameters for r = 1 on every decoder linear layer

    @property
    def total(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params


@dataclass(frozen=True)
class Setup:
    mode: str  # full | lora | qlora
    gpus: int = 1
    zero_stage: int = 0  # 0 (no DeepSpeed), 2 or 3
    offload: bool = False  # ZeRO-3 offload of optimizer (and parameters) to CPU
    micro_batch_tokens: int = 4096
    gradient_checkpointing: bool = True
    fused_ce: bool = True
    lora_r: int = 64
    train_embeddings: bool = False  # LoRA with modules_to_save embed_tokens + lm_head
    bytes_per_weight: int = 2  # compute dtype: bf16/fp16 = 2, fp32 = 4


def shape_from_config(config: Any, trust_remote_code: bool = False) -> ModelShape:
    """Count parameters by kind on a meta-device model built from `config` (remote code runs only when the user
    allowed it with --trust_remote_code)."""
    from unittest import mock

    import torch
    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM

    # Under an active ZeRO-3 config (a full fine-tuning run with finetune_ds.sh) from_config would build the model in
    # deepspeed.zero.Init, which partitions real tensors and fails on the meta device: count on a plain model.
    with torch.device("meta"), mock.patch.object(transformers.modeling_utils, "is_deepspeed_zero3_enabled",
                                                 return_value=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    embeddings = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    seen: set[int] = set()
    linear = embedding = other = lora_per_rank = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(module) in embeddings:
                embedding += p.numel()
            elif isinstance(module, torch.nn.Linear) and p.dim() == 2:
                linear += p.numel()
                lora_per_rank += module.in_features + module.out_features
            else:
                other += p.numel()
    text = getattr(config, "text_config", config)
    return ModelShape(
        linear_params=linear, embedding_params=embedding, other_params=other,
        hidden_size=text.hidden_size, intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_layers=text.num_hidden_layers, vocab_size=text.vocab_size, lora_params_per_rank=lora_per_rank,
    )


def estimate(shape: ModelShape, s: Setup) -> dict[str, float]:
    """Bytes per GPU by component (weights, gradients, optimizer, activations, logits, overhead) and the total."""
    w = s.bytes_per_weight
    shard = s.gpus if s.zero_stage == 3 else 1
    opt_shard = s.gpus if s.zero_stage in (2, 3) else 1
    if s.mode == "full":
        trainable = shape.total
        if s.zero_stage:  # DeepSpeed: compute-dtype weights and grads, fp32 master + Adam moments (12 B)
            weights = trainable * w / shard
            grads = trainable * w / opt_shard
            optimizer = 0 if s.offload else trainable * 12 / opt_shard
        else:  # plain Trainer: fp32 weights and grads, Adam moments, autocast copies of one layer at a time
            weights, grads, optimizer = trainable * 4, trainable * 4, trainable * 8
    else:
        frozen_linear = shape.linear_params * (0.5 + 1 / 64 + 1 / 256) if s.mode == "qlora" else shape.linear_params * w
        weights = (frozen_linear + (shape.embedding_params + shape.other_params) * w) / shard
        trainable = shape.lora_params_per_rank * s.lora_r + (shape.embedding_params if s.train_embeddings else 0)
        weights += trainable * 4 / shard  # adapters in fp32
        grads = trainable * 4 / opt_shard
        optimizer = 0 if s.offload else trainable * 8 / opt_shard
    if s.offload and s.zero_stage == 3:
        weights = _layer_working_set(shape, w)  # parameters stream in from CPU one layer at a time
    activations = _activations(shape, s)
    logits = _logits(shape, s)
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
             "logits": logits}
    total = sum(parts.values()) * ALLOCATOR_SLACK + CUDA_CONTEXT_BYTES
    return {**parts, "overhead": total - sum(parts.values()), "total": total}


def _layer_working_set(shape: ModelShape, w: int) -> float:
    per_layer = (shape.linear_params + shape.other_params) / max(1, shape.num_layers)
    return (2 * per_layer + shape.embedding_params) * w


def _activations(shape: ModelShape, s: Setup) -> float:
    """bf16 activations kept for backward. One decoder layer keeps ~ (8 d + 4 ff) values per token (attention in,
    q/k/v/out, norms, gate/up/act/product); LoRA adds its dropout-masked inputs. With gradient checkpointing only the
    layer inputs stay, plus one layer recomputed during backward."""
    d, ff, layers, t = shape.hidden_size, shape.intermediate_size, shape.num_layers, s.micro_batch_tokens
    per_layer = (8 * d + 4 * ff + (4 * d if s.mode != "full" else 0)) * 2
    if s.gradient_checkpointing:
        return t * (layers * d * 2 + per_layer)
    return t * layers * per_layer


def _logits(shape: ModelShape, s: Setup) -> float:
    """bf16 logits + their fp32 copy + log-softmax kept for backward: ~10 bytes per vocabulary entry per token."""
    from chattune.loss import chunk_tokens

    tokens = s.micro_batch_tokens
    if s.fused_ce:
        tokens = min(tokens, chunk_tokens(tokens, shape.vocab_size, shape.hidden_size))
    return tokens * shape.vocab_size * 10


def cheapest_fix(shape: ModelShape, s: Setup, card_gb: int) -> str | None:
    """None if the estimate fits `card_gb`; else the changes, applied in order of their cost to the user (memory
    savers first, then sharding, smaller micro-batches, LoRA, Q-LoRA, CPU offload), that make it fit."""
    limit = card_gb * GB
    if estimate(shape, s)["total"] <= limit:
        return None
    steps: list[tuple[str, Any]] = [
        ("--gradient_checkpointing True", lambda x: replace(x, gradient_checkpointing=True)),
        ("--fused_ce auto", lambda x: replace(x, fused_ce=True)),
    ]
    if s.gpus > 1:
        steps.append(("--deepspeed ds_configs/zero3.json", lambda x: replace(x, zero_stage=3)))
    tokens = s.micro_batch_tokens
    while tokens > 1024:
        tokens //= 2
        steps.append((f"{tokens}-token micro-batches (x{s.micro_batch_tokens // tokens} gradient accumulation)",
                      lambda x, t=tokens: replace(x, micro_batch_tokens=t)))
    if s.mode == "full":
        steps.append(("--use_lora", lambda x: replace(x, mode="lora")))
    if s.mode in ("full", "lora"):
        steps.append(("--use_lora --q_lora", lambda x: replace(x, mode="qlora")))
    if s.gpus > 1:
        steps.append(("--deepspeed ds_configs/zero3_offload.json", lambda x: replace(x, zero_stage=3, offload=True)))
    applied: list[str] = []
    current = s
    for label, change in steps:
        changed = change(current)
        if changed == current:
            continue
        current = changed
        applied = [a for a in applied if not _superseded(a, label)] + [label]
        if estimate(shape, current)["total"] <= limit:
            return ", ".join(applied)
    return "does not fit even with Q-LoRA and small micro-batches: use more GPUs or a smaller model"


def _superseded(earlier: str, later: str) -> bool:
    same_kind = ("micro-batches", "--deepspeed", "--use_lora")
    return any(k in earlier and k in later for k in same_kind)


def format_estimate(shape: ModelShape, s: Setup, name: str) -> str:
    parts = estimate(shape, s)
    zero = f"ZeRO-{s.zero_stage}{' + offload' if s.offload else ''}" if s.zero_stage else "no DeepSpeed"
    lines = [
        f"memory estimate per GPU: {name}, {shape.total / 1e9:.2f}B parameters, {s.mode}, {s.gpus} GPU(s), {zero},",
        f"  {s.micro_batch_tokens} tokens per micro-batch, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}, fused loss {'on' if s.fused_ce else 'off'}",
    ]
    for key in ("weights", "gradients", "optimizer", "activations", "logits", "overhead"):
        lines.append(f"  {key:<12} {parts[key] / GB:7.1f} GB")
    lines.append(f"  {'total':<12} {parts['total'] / GB:7.1f} GB")
    for card in CARDS:
        fix = cheapest_fix(shape, s, card)
        lines.append(f"  {card} GB card: " + ("fits" if fix is None else f"does not fit; cheapest changes: {fix}"))
    return "\n".join(lines)


def zero_setup_from_config(path: str | None) -> tuple[int, bool]:
    """(ZeRO stage, offload) from a DeepSpeed config file."""
    if not path:
        return 0, False
    import json

    config = json.loads(open(path).read()) if isinstance(path, str) else path
    zero = config.get("zero_optimization", {})
    offload = any(str(zero.get(k, {}).get("device", "none")) == "cpu" for k in ("offload_optimizer", "offload_param"))
    return int(zero.get("stage", 0)), offload


def run_setup(training_args: Any, lora_args: Any, mode: str, gpus: int) -> Setup:
    """The planner's view of a finetune.py command line."""
    stage, offload = zero_setup_from_config(training_args.deepspeed)
    return Setup(
        mode=mode, gpus=gpus, zero_stage=stage, offload=offload,
        micro_batch_tokens=training_args.micro_batch_tokens(),
        gradient_checkpointing=bool(training_args.gradient_checkpointing), fused_ce=training_args.fused_ce != "none",
        lora_r=lora_args.lora_r, train_embeddings=lora_args.lora_modules_to_save not in ("auto", "none"),
        bytes_per_weight=2 if (training_args.bf16 or training_args.fp16) else 4,
    )
