"""LoRA on the loaded model: targets (every decoder linear layer, fused MoE experts, GPTQ layers), the modules trained
in full beside it (embeddings and output layer when the base never learned the template's tokens)."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any

import torch

from chattune.errors import ConfigError

if TYPE_CHECKING:
    from chattune.train.args import LoraArguments, TrainingArguments


def embedding_norms(model: Any, chunk_rows: int = 8192) -> torch.Tensor:
    """L2 norm of every input-embedding row. Under ZeRO-3 the weight is partitioned (each rank holds an empty local
    tensor): it is gathered for the reading, which every rank must take part in. Rows are converted to fp32 in chunks
    so a 152k-row embedding is never copied whole."""
    weight = model.get_input_embeddings().weight
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return _row_norms(weight, chunk_rows)
    return _row_norms(weight, chunk_rows)


def _row_norms(weight: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([weight[i:i + chunk_rows].float().norm(dim=-1).cpu()
                          for i in range(0, weight.shape[0], chunk_rows)])


def untrained_control_tokens(model: Any, tokenizer: Any, tokens: list[str]) -> list[str]:
    """Control tokens whose input embedding looks never trained (norm far below the vocabulary's median).

    Base models keep template tokens such as <|im_start|> at their initial (tiny or zero) values; a LoRA adapter
    alone cannot teach them, so the embeddings and output layer must train too (Qwen's rule for base models).
    """
    norms = embedding_norms(model)
    ids = [i for i in tokenizer.convert_tokens_to_ids(tokens) if i is not None and 0 <= i < norms.shape[0]]
    if not ids:
        return []
    median = norms.median()
    return [tokenizer.convert_ids_to_tokens(i) for i in ids if norms[i] < 0.1 * median]


def embedding_module_names(model: Any) -> list[str]:
    """Names (relative to the model) of the input embedding and output layer, for modules_to_save."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return [name.split(".")[-1] for name, module in model.named_modules() if id(module) in wanted]


def resolve_modules_to_save(spec: str, model: Any, tokenizer: Any, added_tokens: tuple[str, ...],
                            control_tokens: list[str]) -> tuple[list[str], str]:
    """`auto`: train embeddings + output layer when the template uses tokens the base model never learned."""
    if spec == "none":
        return [], "none (--lora_modules_to_save none)"
    if spec != "auto":
        return [s.strip() for s in spec.split(",") if s.strip()], "given by --lora_modules_to_save"
    if added_tokens:
        return embedding_module_names(model), f"auto: the template added tokens {', '.join(added_tokens)}"
    untrained = untrained_control_tokens(model, tokenizer, control_tokens)
    if untrained:
        return embedding_module_names(model), f"auto: the base model never learned {', '.join(untrained)}"
    if not control_tokens:
        return [], "auto: the template uses no special tokens (nothing to check)"
    return [], f"auto: the base model's embeddings of {', '.join(control_tokens)} are trained (checked)"


def expert_parameter_names(model: Any) -> list[str]:
    """Fused MoE expert weights (3-D parameters, e.g. mlp.experts.gate_up_proj) that LoRA should adapt too."""
    names = set()
    for module_name, module in model.named_modules():
        if not type(module).__name__.endswith("Experts"):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if len(getattr(p, "ds_shape", p.shape)) == 3:  # ZeRO-3 partitions it at load: its full shape
                names.add(re.sub(r"^.*?layers\.\d+\.", "", f"{module_name}.{pname}"))
    return sorted(names)


def apply_lora(model: Any, training_args: TrainingArguments, lora_args: LoraArguments,
               modules_to_save: list[str], recompute: bool = False) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    from chattune.train.hf import keep_linear_moe_targets, kept_linear_moe_targets

    targets = lora_args.lora_target_modules
    all_linear = targets in (["all-linear"], ["all_linear"], ["all"])
    quantized = quantized_linear_names(model)
    if all_linear and quantized:
        # peft's all-linear matches nn.Linear only; GPTQ layers are not nn.Linear and would leave nothing to adapt.
        targets, all_linear = quantized, False
    # Fused MoE experts are 3-D parameters, not nn.Linear: name them so all-linear covers them on every MoE model.
    keep_linear_moe_targets()  # and keep dense and shared-expert MLPs adapted (peft#3711)
    experts = expert_parameter_names(model) if all_linear else []
    dropout = lora_args.lora_dropout
    if experts and dropout:
        # peft's LoRA on fused 3-D expert weights (ParamWrapper) rejects dropout.
        print(f"lora_dropout {dropout} -> 0: LoRA on the fused MoE expert weights ({', '.join(experts)}) supports no "
              "dropout; name --lora_target_modules explicitly to keep dropout and leave the experts frozen",
              file=sys.stderr)
        dropout = 0.0
    text_only = text_path_targets(model) if all_linear else None
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=dropout,
        target_modules=text_only or ("all-linear" if all_linear else targets),
        target_parameters=experts or None,
        bias=lora_args.lora_bias,
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save or None,
    )
    if lora_args.q_lora or getattr(model, "quantization_method", None) == "gptq":
        _prepare_quantized(model, training_args)
    if recompute:  # the plan's activation checkpointing
        model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks see a grad-requiring input
    if lora_args.lora_weight_path:
        return PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    try:
        adapted = get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name that matches nothing
        raise ConfigError(f"LoRA: {e} (check --lora_target_modules)") from None
    kept = kept_linear_moe_targets(adapted.get_base_model(), adapted.peft_config["default"].target_modules)
    if kept:
        print(f"note: {len(kept)} dense/shared-expert MLP layers of this MoE model are adapted; plain peft 0.21.2 "
              "loads the adapter without them (peft#3711): load it with chattune's tools, or merge it",
              file=sys.stderr)
    return adapted


ADAPTER_KINDS = ("attention", "dense MLP", "shared experts", "routed experts", "router", "other")


def adapter_kind(name: str) -> str:
    """What an adapted module (or fused parameter) of the decoder is, from its name."""
    name = re.sub(r"(\.base_layer)+$", "", name)
    if re.search(r"\.shared_experts?(\.|_gate$)", name):
        return "shared experts"
    if re.search(r"\.experts(\.|$)", name):
        return "routed experts"
    if re.search(r"\.(mlp|block_sparse_moe|feed_forward)\.(gate|router)$", name):
        return "router"
    if re.search(r"\.(mlp|feed_forward|ffn)\.", name):
        return "dense MLP"
    if re.search(r"attn|attention", name):
        return "attention"
    return "other"


def adapter_summary(model: Any) -> list[dict[str, Any]]:
    """What LoRA adapts, per kind of module: how many modules (a fused expert parameter counts once, holding all its
    experts) and the adapter's parameters. Read from the adapted model, so it is what trains, not what was asked."""
    from peft.tuners.lora import LoraLayer

    kinds: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        params = sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions them: their full size
                     for adapter in (module.lora_A, module.lora_B) for layer in adapter.values()
                     for p in layer.parameters())
        if params:
            counts = kinds.setdefault(adapter_kind(name), [0, 0])
            counts[0] += 1
            counts[1] += params
    return [{"kind": kind, "modules": kinds[kind][0], "params": kinds[kind][1]} for kind in ADAPTER_KINDS
            if kind in kinds]


def text_path_targets(model: Any) -> str | None:
    """For a vision-language model, every linear layer of its decoder (not the vision tower, whose linear layers peft's
    all-linear would adapt too), as a pattern of full module names; None for a text-only model."""
    import re

    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not any(".visual." in f".{name}." for name in names):
        return None
    output = {id(model.get_output_embeddings())}
    decoder = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and ".visual." not in f".{name}." and id(module) not in output]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in decoder})
    prefixes = sorted({re.sub(r"\.layers\.\d+\..*$", "", name) for name in decoder if ".layers." in name})
    return rf"^({'|'.join(map(re.escape, prefixes))})\.layers\.\d+\..*\.({'|'.join(leaves)})$"


def quantized_linear_names(model: Any) -> list[str]:
    """Names (last component) of the GPTQ linear layers inside the decoder blocks, for LoRA targets."""
    skip = {id(model.get_output_embeddings()), id(model.get_input_embeddings())}
    names = set()
    for name, module in model.named_modules():
        if id(module) in skip or not hasattr(module, "qweight"):  # gptqmodel's quantized linears hold `qweight`
            continue
        if any(part.isdigit() for part in name.split(".")):  # inside layers.N
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _prepare_quantized(model: Any, training_args: TrainingArguments) -> None:
    """peft's prepare_model_for_kbit_training without its fp32 upcast of every non-4-bit weight.

    The upcast doubles the memory of the 152k-row embeddings and output layer of Qwen models for no gain when they
    are frozen; keep them in the compute dtype and only freeze.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.is_parallelizable = True
    model.model_parallel = True
