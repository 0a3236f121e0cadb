"""Per-GPU memory estimate from the model config alone (no weights), with a verdict per card and the cheapest fix;
the time estimate, and the disk the checkpoints need.

The model is built on the meta device to count parameters by kind (decoder linear layers, embeddings/output layer,
the rest), so MoE, GLM and remote-code models are counted as they are. Then, per GPU:

    weights + gradients + optimizer states   by mode (full/LoRA/Q-LoRA), dtype, ZeRO stage, offload, GPU count
    activations                              per token and layer; with gradient checkpointing one layer input each
    logits                                   full vocabulary for the micro-batch, or one chunk with a fused loss
    overhead                                 CUDA context and allocator slack

The estimate is a planning tool, checked against published measurements (tests/test_memory.py states the band).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from chattune.train.architecture import config_count, routed_expert_count
from chattune.train.checkpoints import size_text
from chattune.train.experts4bit import BITS_PER_WEIGHT

GB = 2**30
CARDS = (24, 40, 80)
# Calibrated on Qwen's published profile (tests/published_profiles.py; README "Memory and time"), physics first:
# every term above is counted from the config; these constants stand for what cannot be counted.
RUNTIME_RESERVE = 2.0 * GB  # CUDA context, cuBLAS/NCCL workspaces, cached blocks reserved but not in use
PERSISTENT_SLACK = 0.20  # allocator rounding of the many parameter/state tensors, buckets, what is not counted
LOGIT_FRAGMENTATION = 0.5  # the caching allocator's extra reserve around the logits' large short-lived blocks
FUSED_LOGIT_BYTES = 2  # per vocabulary entry and token of one chunk of Liger's fused loss (ops/fused_linear_cross_entropy)
LOGIT_BYTES = 8  # per vocabulary entry and token without a fused loss (bf16 logits, fp32 log-softmax), fitted
ZERO3_MAX_LIVE_PARAMETERS = 1e9  # stage3_max_live_parameters of ds_configs/zero3.json
DEEPSPEED_SUB_GROUP = 1e9  # sub_group_size of the ZeRO configs
NF4_EXPERT_BYTES = BITS_PER_WEIGHT / 8  # per weight of a 4-bit fused expert stack (chattune.train.experts4bit)


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
    attention_layers: int | None = None  # layers with softmax attention (None: all); linear-attention ones cost
    #                                      linear time and memory in the sequence length
    routed_expert_params: int = 0  # MoE: the routed experts' weights (fused 3-D or per-expert layers)
    routed_in_linear: int = 0  # the part of those counted in linear_params (experts as nn.Linear layers)
    active_expert_fraction: float = 1.0  # experts per token / experts (top-k of E)

    @property
    def total(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params

    @property
    def active_matmul_params(self) -> float:
        """Decoder matmul weights one token passes through: dense layers, and only its top-k routed experts."""
        return self.linear_params - self.routed_in_linear + self.routed_expert_params * self.active_expert_fraction


@dataclass(frozen=True)
class Setup:
    mode: str  # full | lora | qlora
    gpus: int = 1
    zero_stage: int = 0  # 0 (no DeepSpeed), 2 or 3
    offload: bool = False  # ZeRO-3 offload of optimizer (and parameters) to CPU
    micro_batch_tokens: int = 4096
    gradient_checkpointing: bool = True
    checkpoint_every: int = 1  # with gradient checkpointing: every n-th decoder layer is recomputed (1: all)
    offload_activations: bool = False  # the recomputed layers' inputs kept in host memory
    fused_ce: bool = True
    lora_r: int = 64
    train_embeddings: bool = False  # LoRA with modules_to_save embed_tokens + lm_head
    bytes_per_weight: int = 2  # compute dtype: bf16/fp16 = 2, fp32 = 4
    reference_copy: bool = False  # full-parameter DPO/IPO: a frozen copy of the base in the compute dtype
    nf4_experts: bool | None = None  # Q-LoRA: fused experts in 4 bits (experts4bit); None: as Q-LoRA does by default


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
    linear = embedding = other = lora_per_rank = routed = routed_in_linear = 0
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            expert = ".experts." in f".{name}." and not type(module).__name__.startswith("Shared")
            routed += p.numel() if expert else 0
            if id(module) in embeddings:
                embedding += p.numel()
            elif isinstance(module, torch.nn.Linear) and p.dim() == 2:
                linear += p.numel()
                routed_in_linear += p.numel() if expert else 0
                lora_per_rank += module.in_features + module.out_features
            else:
                other += p.numel()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        linear_params=linear, embedding_params=embedding, other_params=other,
        hidden_size=text.hidden_size, intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_layers=text.num_hidden_layers, vocab_size=text.vocab_size, lora_params_per_rank=lora_per_rank,
        attention_layers=attention_layer_count(text), routed_expert_params=routed, routed_in_linear=routed_in_linear,
        active_expert_fraction=active_expert_fraction(text) if routed else 1.0,
    )


def attention_layer_count(text_config: Any) -> int:
    """Layers with softmax attention: all, unless the config's layer_types name others (linear attention, conv,
    state-space layers)."""
    types = getattr(text_config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or not types:
        return text_config.num_hidden_layers
    return sum("attention" in str(kind) and "linear" not in str(kind) for kind in types)


def active_expert_fraction(text_config: Any) -> float:
    """Routed experts a token uses over the routed experts there are (top-k / E), from the config."""
    k = config_count(text_config, "num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k")
    experts = routed_expert_count(text_config)
    return min(1.0, k / experts) if k and experts else 1.0


def estimate(shape: ModelShape, s: Setup) -> dict[str, float]:
    """Bytes per GPU by component and the total: the peak the CUDA caching allocator reserves, which is what decides
    an out-of-memory error (see the constants above for what each term stands for and how they were calibrated).

    persistent  weights + gradients + optimizer states (+ under ZeRO-3 the parameters gathered for compute)
    transient   the larger of: activations + logits x (1 + LOGIT_FRAGMENTATION) (forward/backward), and the
                optimizer step's temporaries
    total       persistent x (1 + PERSISTENT_SLACK) + transient + RUNTIME_RESERVE
    """
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
        step = _step_temporaries(trainable / opt_shard, 4, s)
    else:
        frozen_linear = shape.linear_params * (0.5 + 1 / 64 + 1 / 256) if s.mode == "qlora" else shape.linear_params * w
        # fused 3-D expert stacks (not nn.Linear): NF4 codes + an fp32 scale per 64 values under Q-LoRA (experts4bit)
        fused = shape.routed_expert_params - shape.routed_in_linear
        four_bit = s.mode == "qlora" and s.nf4_experts is not False and s.zero_stage != 3
        frozen_fused = fused * (NF4_EXPERT_BYTES if four_bit else w)
        weights = (frozen_linear + frozen_fused + (shape.embedding_params + shape.other_params - fused) * w) / shard
        adapters = shape.lora_params_per_rank * s.lora_r  # fp32 (peft casts adapters up), Adam moments in fp32
        weights += adapters * 4 / shard
        grads = adapters * 4 / opt_shard
        optimizer = 0 if s.offload else adapters * 8 / opt_shard
        step = _step_temporaries(adapters / opt_shard, 4, s)
        if s.train_embeddings:  # modules_to_save: a trainable copy in the compute dtype, beside the frozen original
            copies = shape.embedding_params
            if s.zero_stage:  # DeepSpeed keeps an fp32 master and fp32 moments for every trainable parameter
                weights += copies * w / shard
                grads += copies * w / opt_shard
                optimizer += 0 if s.offload else copies * 12 / opt_shard
            else:  # torch AdamW keeps the moments in the parameter's dtype
                weights += copies * w
                grads += copies * w
                optimizer += copies * 2 * w
            step = max(step, _step_temporaries(copies / opt_shard, w, s))
    if s.reference_copy:  # compute dtype; partitioned under ZeRO-3, else whole on every GPU
        weights += shape.total * w / shard
    if s.offload and s.zero_stage == 3:
        weights = _layer_working_set(shape, w)  # parameters stream in from CPU one layer at a time
    elif s.zero_stage == 3:  # parameters gathered for the layers being computed (and prefetched)
        weights += min(ZERO3_MAX_LIVE_PARAMETERS, shape.total) * w
    activations = _activations(shape, s)
    logits = _logits(shape, s)
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
             "logits": logits}
    persistent = weights + grads + optimizer
    transient = max(activations + logits * (1 + LOGIT_FRAGMENTATION), step)
    total = persistent * (1 + PERSISTENT_SLACK) + transient + RUNTIME_RESERVE
    return {**parts, "overhead": total - sum(parts.values()), "total": total}


def _step_temporaries(trainable: float, dtype_bytes: int, s: Setup) -> float:
    """What the optimizer step allocates on top of the states: torch's foreach AdamW one temporary per parameter
    (the denominator), DeepSpeed the fp32 gradients of one sub-group (sub_group_size 1e9)."""
    if s.zero_stage:
        return 0 if s.offload else min(trainable, DEEPSPEED_SUB_GROUP) * 4
    return trainable * dtype_bytes


def _layer_working_set(shape: ModelShape, w: int) -> float:
    per_layer = (shape.linear_params + shape.other_params) / max(1, shape.num_layers)
    return (2 * per_layer + shape.embedding_params) * w


def _activations(shape: ModelShape, s: Setup) -> float:
    """bf16 activations kept for backward. One decoder layer keeps ~ (8 d + 4 ff) values per token (attention in,
    q/k/v/out, norms, gate/up/act/product); LoRA adds its dropout-masked inputs. With gradient checkpointing only the
    layer inputs stay, plus one layer recomputed during backward."""
    d, ff, layers, t = shape.hidden_size, shape.intermediate_size, shape.num_layers, s.micro_batch_tokens
    per_layer = (8 * d + 4 * ff + (4 * d if s.mode != "full" else 0)) * 2
    recomputed = recomputed_layers(layers, s)
    if not recomputed:
        return t * layers * per_layer
    inputs = 0 if s.offload_activations else recomputed * d * 2
    return t * (inputs + (layers - recomputed) * per_layer + per_layer)


def recomputed_layers(layers: int, s: Setup) -> int:
    """Decoder layers whose activations are recomputed in backward: none, every n-th (transformers checkpoints
    layers 0, n, 2n, ...), or all."""
    return -(-layers // max(1, s.checkpoint_every)) if s.gradient_checkpointing else 0


def _logits(shape: ModelShape, s: Setup) -> float:
    """bf16 logits + their fp32 copy + log-softmax kept for backward, and the gradient being formed: LOGIT_BYTES
    per vocabulary entry per token. A fused loss holds one chunk of logits instead: Liger's kernel (the CUDA default)
    one bf16 buffer, its gradient written in place (FUSED_LOGIT_BYTES). Both fused paths form the gradients in the
    forward: the hidden states' (bf16) until backward, and a trained output layer's summed in fp32."""
    from chattune.train.loss import chunk_tokens

    if s.fused_ce:
        chunk = min(s.micro_batch_tokens, chunk_tokens(shape.vocab_size)) * shape.vocab_size * FUSED_LOGIT_BYTES
        head_trained = s.mode == "full" or s.train_embeddings
        return chunk + s.micro_batch_tokens * shape.hidden_size * 2 + (
            shape.vocab_size * shape.hidden_size * 4 if head_trained else 0)
    return s.micro_batch_tokens * shape.vocab_size * LOGIT_BYTES


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


# The recompute the plan chooses from, least first: (every n-th layer recomputed, 0 = none; inputs offloaded)
RECOMPUTE_OPTIONS = ((0, False), (4, False), (3, False), (2, False), (1, False), (1, True))
RECOMPUTE_HEADROOM = 0.9  # of the GPU's memory the estimate may fill without recomputing more


def with_recompute(s: Setup, every: int, offload: bool) -> Setup:
    return replace(s, gradient_checkpointing=every > 0, checkpoint_every=max(1, every), offload_activations=offload)


def least_recompute(shape: ModelShape, s: Setup, gpu_gb: float) -> tuple[int, bool, float]:
    """(every, offload, estimated GB) of the least recompute whose estimate fits RECOMPUTE_HEADROOM of `gpu_gb`; the
    most there is when none does."""
    for every, offload in RECOMPUTE_OPTIONS:
        gb = estimate(shape, with_recompute(s, every, offload))["total"] / GB
        if gb <= RECOMPUTE_HEADROOM * gpu_gb:
            break
    return every, offload, gb


def recompute_words(every: int, offload: bool) -> str:
    if every <= 0:
        return "off"
    words = "all layers" if every == 1 else f"every {every}{'nd' if every == 2 else 'rd' if every == 3 else 'th'} layer"
    return words + (", their inputs in host memory" if offload else "")


def format_estimate(shape: ModelShape, s: Setup, name: str, planned_recompute: bool = False) -> str:
    """The estimate's breakdown and a verdict per card. With `planned_recompute` (no --gradient_checkpointing given)
    each card gets the recompute the plan would pick for it."""
    parts = estimate(shape, s)
    zero = f"ZeRO-{s.zero_stage}{' + offload' if s.offload else ''}" if s.zero_stage else "no DeepSpeed"
    recompute = ("planned per card (the breakdown: all layers)" if planned_recompute
                 else "on" if s.gradient_checkpointing else "off")
    lines = [
        f"memory estimate per GPU: {name}, {shape.total / 1e9:.2f}B parameters, {s.mode}, {s.gpus} GPU(s), {zero},",
        f"  {s.micro_batch_tokens} tokens per micro-batch, gradient checkpointing {recompute}, "
        f"fused loss {'on' if s.fused_ce else 'off'}",
    ]
    for key in ("weights", "gradients", "optimizer", "activations", "logits", "overhead"):
        lines.append(f"  {key:<12} {parts[key] / GB:7.1f} GB")
    lines.append(f"  {'total':<12} {parts['total'] / GB:7.1f} GB")
    for card in CARDS:
        chosen, plan = s, ""
        if planned_recompute:
            every, offload, _ = least_recompute(shape, s, card)
            chosen, plan = with_recompute(s, every, offload), f" (recompute {recompute_words(every, offload)})"
        fix = cheapest_fix(shape, chosen, card)
        lines.append(f"  {card} GB card: " + ("fits" if fix is None else f"does not fit; cheapest changes: {fix}")
                     + plan)
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


def recompute_asked(training_args: Any) -> bool | None:
    """--gradient_checkpointing as given (True/False), or None where it was not (the plan decides)."""
    asked = getattr(training_args, "recompute_requested", "unknown")
    return bool(training_args.gradient_checkpointing) if asked == "unknown" else asked


def run_setup(training_args: Any, lora_args: Any, mode: str, gpus: int) -> Setup:
    """The planner's view of a finetune.py command line."""
    stage, offload = zero_setup_from_config(training_args.deepspeed)
    return Setup(
        mode=mode, gpus=gpus, zero_stage=stage, offload=offload,
        micro_batch_tokens=training_args.micro_batch_tokens(),
        # not given: the plan picks the recompute after the micro-batch, which is sized with all of it
        gradient_checkpointing=recompute_asked(training_args) is not False,
        fused_ce=training_args.fused_ce != "none",
        lora_r=lora_args.lora_r, train_embeddings=lora_args.lora_modules_to_save not in ("auto", "none"),
        bytes_per_weight=2 if (training_args.bf16 or training_args.fp16) else 4,
        reference_copy=bool(getattr(training_args, "pairs", False)) and mode == "full"
        and training_args.pref_loss in ("sigmoid", "ipo"),
    )


def checkpoint_bytes(mode: str, shape: ModelShape, lora_r: int, fp32: bool, deepspeed: bool) -> tuple[int, int]:
    """Rough (result, checkpoint) sizes in bytes: the saved weights, plus Adam's two fp32 moments per trainable
    parameter (and DeepSpeed's fp32 master copy) in a checkpoint."""
    trainable = shape.total if mode == "full" else shape.lora_params_per_rank * lora_r
    result = shape.total * (4 if fp32 or not deepspeed else 2) if mode == "full" else trainable * 4
    return result, result + trainable * (12 if deepspeed else 8)


def disk_warning(training_args: Any, lora_args: Any, mode: str, shape: ModelShape, steps: int, free: int
                  ) -> str | None:
    """A warning when the output directory's filesystem cannot hold the checkpoints the run keeps and its result."""
    strategy = str(getattr(training_args.save_strategy, "value", training_args.save_strategy))
    every = training_args.save_steps if training_args.save_steps >= 1 else training_args.save_steps * steps
    saves = {"steps": int(steps // max(1, every)), "epoch": math.ceil(training_args.num_train_epochs)}.get(strategy, 0)
    kept = min(saves, training_args.save_total_limit) if training_args.save_total_limit else saves
    fp32 = not (training_args.bf16 or training_args.fp16)
    result, checkpoint = checkpoint_bytes(mode, shape, lora_args.lora_r, fp32, bool(training_args.deepspeed))
    need = kept * checkpoint + result
    if need <= free:
        return None
    gb = size_text
    return (f"WARNING: {training_args.output_dir} has {gb(free)} free; {kept} checkpoints of ~{gb(checkpoint)} and "
            f"the result (~{gb(result)}) need ~{gb(need)}: free space, lower --save_total_limit, or choose another "
            "--output_dir")
