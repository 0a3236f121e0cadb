"""Load the model for the chosen mode: full, LoRA, or Q-LoRA (bitsandbytes NF4, or a GPTQ int4 base)."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

from chattune.args import LoraArguments, ModelArguments, TrainingArguments
from chattune.errors import ConfigError


@dataclass
class ModelInfo:
    mode: str  # "full" | "lora" | "qlora"
    dtype: torch.dtype  # compute dtype
    attn_implementation: str
    modules_to_save: list[str]
    modules_to_save_reason: str
    trainable_params: int = 0
    total_params: int = 0
    packing: str = "padded"
    fused_ce: str = "none"


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def mode_of(training_args: TrainingArguments, lora_args: LoraArguments) -> str:
    if lora_args.q_lora:
        return "qlora"
    return "lora" if training_args.use_lora else "full"


def resolve_attn_implementation(requested: str, packing: bool = False) -> str:
    """auto: flash-attention 2 when installed on CUDA, else flex_attention for packed CUDA batches, else sdpa."""
    choices = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
    if requested not in choices:
        raise ConfigError(f"--attn_implementation {requested!r}: choose one of {', '.join(choices)}")
    if requested != "auto":
        if requested.startswith("flash_attention") and not importlib.util.find_spec("flash_attn"):
            raise ConfigError(f"--attn_implementation {requested} needs the flash-attn package: pip install flash-attn")
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    if packing and torch.cuda.is_available():
        return "flex_attention"
    return "sdpa"


def resolve_packing(requested: str, attn_requested: str) -> bool:
    """auto: pack when an attention kernel skips the other samples of a packed row (flash-attention on CUDA, or
    flex_attention on CUDA). sdpa/eager keep samples apart too, through a dense block mask, but gain little."""
    if requested != "auto":
        return requested == "true"
    if not torch.cuda.is_available():
        return False
    return attn_requested in ("auto", "flash_attention_2", "flash_attention_3", "flex_attention")


def validate_mode(training_args: TrainingArguments, lora_args: LoraArguments) -> None:
    if lora_args.q_lora and not training_args.use_lora:
        raise ConfigError("--q_lora trains a LoRA adapter on a 4-bit base: add --use_lora (as Qwen's script needs)")
    if lora_args.lora_bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"--lora_bias {lora_args.lora_bias!r}: choose none, all or lora_only")
    if lora_args.q_lora and not training_args.use_cpu and not torch.cuda.is_available():
        raise ConfigError("--q_lora needs a CUDA GPU (or --use_cpu True for a slow CPU run)")


def _quantization_config(model_path: str, lora_args: LoraArguments, dtype: torch.dtype, cache_dir, trust) -> Any:
    if not lora_args.q_lora:
        return None
    from transformers import AutoConfig, BitsAndBytesConfig

    existing = getattr(AutoConfig.from_pretrained(model_path, cache_dir=cache_dir, trust_remote_code=trust),
                       "quantization_config", None)
    if existing:  # a GPTQ int4 base (Qwen-7B-Chat-Int4): train LoRA on it as it is
        return None
    if not importlib.util.find_spec("bitsandbytes"):
        raise ConfigError("--q_lora needs bitsandbytes: pip install bitsandbytes")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # 4-bit weights stored in the compute dtype so ZeRO-3 can shard them like any other parameter
        bnb_4bit_quant_storage=dtype,
    )


def load_model(model_args: ModelArguments, training_args: TrainingArguments, lora_args: LoraArguments,
               packing: bool = False) -> tuple[Any, ModelInfo]:
    """The base model, in the dtype and attention implementation of the run, before any adapter."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    validate_mode(training_args, lora_args)
    mode = mode_of(training_args, lora_args)
    dtype = compute_dtype(training_args)
    attn = resolve_attn_implementation(model_args.attn_implementation, packing)
    # Full fine-tuning keeps fp32 master weights (autocast does the bf16 math) unless DeepSpeed keeps them itself.
    load_dtype = torch.float32 if mode == "full" and not training_args.deepspeed else dtype
    kwargs: dict[str, Any] = dict(
        dtype=load_dtype,
        attn_implementation=attn,
        cache_dir=training_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
    )
    quant = _quantization_config(model_args.model_name_or_path, lora_args, dtype, training_args.cache_dir,
                                 model_args.trust_remote_code)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not is_deepspeed_zero3_enabled():
            kwargs["device_map"] = {"": training_args.device}
    if is_deepspeed_zero3_enabled():
        _attach_deepspeed_comm()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except OSError as e:
        raise ConfigError(f"cannot load the model {model_args.model_name_or_path!r}: {e}") from None
    model.config.use_cache = False  # training: a KV cache wastes memory and breaks packed-sequence detection
    return model, ModelInfo(mode, dtype, attn, [], "")


def _attach_deepspeed_comm() -> None:
    """Start deepspeed.comm on the process group that is already running.

    With `--use_cpu True` transformers starts torch.distributed (gloo) but not deepspeed.comm, so ZeRO-3's zero.Init
    (inside from_pretrained) sees a world of one process and rejects the train_batch_size transformers filled in for
    all of them. On GPUs accelerate has already done this and the call is a no-op.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def resize_for_new_tokens(model: Any, tokenizer: Any) -> int:
    """Grow the embeddings when the template added tokens; new rows start at the mean of the old ones."""
    old = embedding_rows(model)
    if len(tokenizer) <= old:
        return 0
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
    return embedding_rows(model) - old


def embedding_rows(model: Any) -> int:
    """Vocabulary rows of the input embedding; under ZeRO-3 the local weight is an empty shard, ds_shape is the
    real one (reading .shape there would 'grow' the vocabulary to len(tokenizer), i.e. shrink it)."""
    weight = model.get_input_embeddings().weight
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]


def untrained_control_tokens(model: Any, tokenizer: Any, tokens: list[str]) -> list[str]:
    """Control tokens whose input embedding looks never trained (norm far below the vocabulary's median).

    Base models keep template tokens such as <|im_start|> at their initial (tiny or zero) values; a LoRA adapter
    alone cannot teach them, so the embeddings and output layer must train too (Qwen's rule for base models).
    """
    weight = model.get_input_embeddings().weight
    if weight.numel() == 0 or weight.dim() != 2:  # partitioned by ZeRO-3: cannot be inspected here
        return []
    ids = [i for i in tokenizer.convert_tokens_to_ids(tokens) if i is not None and 0 <= i < weight.shape[0]]
    if not ids:
        return []
    with torch.no_grad():
        norms = weight.float().norm(dim=-1)
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
    return [], "auto: the template's tokens are all trained already"


def expert_parameter_names(model: Any) -> list[str]:
    """Fused MoE expert weights (3-D parameters, e.g. mlp.experts.gate_up_proj) that LoRA should adapt too."""
    names = set()
    for module_name, module in model.named_modules():
        if not type(module).__name__.endswith("Experts"):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3:
                names.add(re.sub(r"^.*?layers\.\d+\.", "", f"{module_name}.{pname}"))
    return sorted(names)


def apply_lora(model: Any, training_args: TrainingArguments, lora_args: LoraArguments,
               modules_to_save: list[str]) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = lora_args.lora_target_modules
    all_linear = targets in (["all-linear"], ["all_linear"], ["all"])
    # Fused MoE experts are 3-D parameters, not nn.Linear: name them so all-linear covers them on every MoE model.
    # Upstream: for MoE types peft converts from transformers v4 (DeepseekV2, Qwen2-MoE, Mixtral), peft 0.21 also
    # rewrites gate_proj/up_proj/down_proj targets to the experts, so dense and shared-expert MLPs get no adapter
    # (https://github.com/huggingface/peft/issues/3711). Saving and loading stay consistent; tests pin the behaviour.
    experts = expert_parameter_names(model) if all_linear else []
    dropout = lora_args.lora_dropout
    if experts and dropout:
        # peft's LoRA on fused 3-D expert weights (ParamWrapper) rejects dropout.
        print(f"lora_dropout {dropout} -> 0: LoRA on the fused MoE expert weights ({', '.join(experts)}) supports no "
              "dropout; name --lora_target_modules explicitly to keep dropout and leave the experts frozen",
              file=sys.stderr)
        dropout = 0.0
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if all_linear else targets,
        target_parameters=experts or None,
        bias=lora_args.lora_bias,
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save or None,
    )
    if lora_args.q_lora or getattr(model, "quantization_method", None) == "gptq":
        _prepare_quantized(model, training_args)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks see a grad-requiring input
    if lora_args.lora_weight_path:
        return PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name that matches nothing
        raise ConfigError(f"LoRA: {e} (check --lora_target_modules)") from None


def _prepare_quantized(model: Any, training_args: TrainingArguments) -> None:
    """peft's prepare_model_for_kbit_training without its fp32 upcast of every non-4-bit weight.

    The upcast doubles the memory of the 152k-row embeddings and output layer of Qwen models for no gain when they
    are frozen; keep them in the compute dtype and only freeze.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.is_parallelizable = True
    model.model_parallel = True


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        # bitsandbytes packs two 4-bit values per byte of storage dtype
        if p.__class__.__name__ == "Params4bit":
            n = n * 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
