"""Load the model for the chosen mode: full, LoRA, or Q-LoRA (bitsandbytes NF4, or a GPTQ int4 base)."""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from dataclasses import dataclass, field
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
    logit_transform: str = "none"
    evaluation: str = "none"
    notes: list[str] = field(default_factory=list)


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


ATTN_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class ModelClass:
    """What the model's class declares about attention, read before any weight loads."""

    name: str
    remote_code: bool  # the model's own code (trust_remote_code): builds its own masks, ignores packed position_ids
    sdpa: bool = True
    flash: bool = False
    flex: bool = False
    attention_backend: bool = False  # uses transformers' attention interface and mask utilities (packing-aware)

    @property
    def packs(self) -> bool:
        """Whether samples packed in one row stay apart: transformers' own mask code detects restarting position_ids;
        remote code and classes outside the attention interface do not."""
        return not self.remote_code and self.attention_backend


def model_class(config: Any, trust_remote_code: bool) -> ModelClass:
    """The class `AutoModelForCausalLM` will instantiate for `config`, and its declared attention support."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return ModelClass(str(auto_map["AutoModelForCausalLM"]).split(".")[-1], remote_code=True)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        return ModelClass(type(config).__name__, remote_code=False, attention_backend=False)
    return ModelClass(cls.__name__, remote_code=False, sdpa=bool(cls._supports_sdpa),
                      flash=bool(cls._supports_flash_attn), flex=bool(cls._supports_flex_attn),
                      attention_backend=bool(getattr(cls, "_supports_attention_backend", False)))


def flash_attn_problem(dtype: torch.dtype) -> str | None:
    """Why flash-attention cannot run here, or None: it must import (a broken build is not "installed"), run on an
    Ampere or newer GPU, and compute in fp16/bf16."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # ImportError, or an undefined symbol of a build for another torch
        return f"flash-attn does not import ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"flash-attention needs an Ampere or newer GPU (compute capability {torch.cuda.get_device_capability()})"
    if dtype not in (torch.float16, torch.bfloat16):
        return "flash-attention computes in fp16/bf16: add --bf16 True"
    return None


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str | None  # passed to from_pretrained; None lets remote code choose its own
    packing: bool
    notes: tuple[str, ...] = ()


def choose_attention(requested_attn: str, requested_packing: str, cls: ModelClass, *, cuda: bool,
                     flash_problem: str | None) -> AttentionChoice:
    """Attention implementation and packing, from the flags and what the model class declares (pure: tests call it
    with a pretended CUDA device).

    auto: flash-attention 2 where it runs and the class supports it; else flex_attention on CUDA for packed batches
    where the class supports it; else sdpa (eager where the class has no sdpa). Packing (auto) is on only where an
    attention kernel skips other samples' blocks (flash, flex) and the class keeps packed samples apart.
    """
    notes: list[str] = []
    if requested_attn not in ATTN_CHOICES:
        raise ConfigError(f"--attn_implementation {requested_attn!r}: choose one of {', '.join(ATTN_CHOICES)}")
    if requested_packing == "true" and not cls.packs:
        why = ("its own (remote) code builds attention masks and ignores packed position_ids" if cls.remote_code
               else "it does not use transformers' attention interface, which keeps packed samples apart")
        raise ConfigError(f"--packing true: {cls.name} cannot train on packed rows ({why}); samples would attend to "
                          "each other. Use --packing false (or auto).")
    if cls.remote_code:
        if requested_attn != "auto":
            notes.append(f"--attn_implementation {requested_attn} passed to the model's own code")
        else:
            notes.append(f"{cls.name} runs its own (remote) code: its attention, padded batches")
        return AttentionChoice(None if requested_attn == "auto" else requested_attn, False, tuple(notes))
    supported = {"sdpa": cls.sdpa, "eager": True, "flash_attention_2": cls.flash, "flash_attention_3": cls.flash,
                 "flex_attention": cls.flex}
    if requested_attn != "auto":
        if not supported[requested_attn]:
            raise ConfigError(f"--attn_implementation {requested_attn}: {cls.name} does not support it; use auto")
        if requested_attn.startswith("flash") and flash_problem:
            raise ConfigError(f"--attn_implementation {requested_attn}: {flash_problem}")
        attn = requested_attn
    elif cuda and cls.flash and flash_problem is None:
        attn = "flash_attention_2"
    elif cuda and cls.flex and requested_packing != "false" and cls.packs:
        attn = "flex_attention"
    else:
        attn = "sdpa" if cls.sdpa else "eager"
    skips_blocks = cuda and attn in ("flash_attention_2", "flash_attention_3", "flex_attention")
    if requested_packing == "auto":
        packing = skips_blocks and cls.packs
        if not packing:
            if not cuda:
                notes.append("padded batches: packing pays only with a CUDA attention kernel (--packing true to force)")
            elif not cls.packs:
                notes.append(f"padded batches: {cls.name} cannot keep packed samples apart")
            else:
                notes.append(f"padded batches: {attn} computes the masked blocks of a packed row (no gain)")
    else:
        packing = requested_packing == "true"
    return AttentionChoice(attn, packing, tuple(notes))


def use_common_dtype_in_flex_attention() -> None:
    """flex_attention with fp32 master weights under bf16 autocast gets fp32 query/key (RoPE multiplies them by the
    fp32 cos/sin of the fp32 residual stream) and a bf16 value; torch before 2.10 rejects mixed dtypes, and flex is
    not an autocast op. Cast all three to the autocast dtype (or the value's) before the kernel, as sdpa is cast.
    Registered once, through transformers' AttentionInterface, over its own flex_attention function."""
    from transformers import AttentionInterface

    current = AttentionInterface._global_mapping["flex_attention"]
    if getattr(current, "casts_to_common_dtype", False):
        return

    def flex_attention_common_dtype(module, query, key, value, *args, **kwargs):
        device = query.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
        return current(module, query.to(dtype), key.to(dtype), value.to(dtype), *args, **kwargs)

    flex_attention_common_dtype.casts_to_common_dtype = True
    AttentionInterface.register("flex_attention", flex_attention_common_dtype)


def existing_quantization(config: Any) -> str | None:
    """The quantization method a checkpoint was saved with (gptq, awq, bitsandbytes...), or None for float weights."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def _quantization_config(config: Any, lora_args: LoraArguments, dtype: torch.dtype) -> Any:
    """How to load the base: NF4 for Q-LoRA on float weights; for a GPTQ checkpoint, a kernel that has a backward."""
    method = existing_quantization(config)
    if method == "gptq":
        from transformers import GPTQConfig

        quant = config.quantization_config
        bits = quant.get("bits", 4) if isinstance(quant, dict) else quant.bits
        # gptqmodel's "auto" picks Marlin/Machete/ExLlama on CUDA, whose train() raises NotImplementedError (Qwen's
        # script passed disable_exllama for the same reason), and TorchAtenLinear on CPU, which fixes an int4 no-grad
        # path on its first forward if that runs in eval mode. gptq_torch (dequantize + matmul) has a backward on
        # every device and is what the trainable kernels run in training mode anyway. Only `backend` of this config
        # is used: transformers copies the loading attributes onto the checkpoint's own quantization_config.
        return GPTQConfig(bits=bits, backend="gptq_torch")
    if method or not lora_args.q_lora:
        return None
    if not importlib.util.find_spec("bitsandbytes"):
        raise ConfigError("--q_lora needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # 4-bit weights stored in the compute dtype so ZeRO-3 can shard them like any other parameter
        bnb_4bit_quant_storage=dtype,
    )


def check_quantized_base(config: Any, training_args: TrainingArguments, name: str) -> None:
    method = existing_quantization(config)
    if method and not training_args.use_lora:
        raise ConfigError(f"{name} is a {method}-quantized model: its weights cannot be fine-tuned in full. Train a "
                          "LoRA adapter on it (--use_lora --q_lora), or fine-tune the full-precision model")
    if method and method != "gptq":
        raise ConfigError(f"{name} is a {method}-quantized model; chattune trains LoRA on float, NF4 (--q_lora) and "
                          "GPTQ bases. Use the full-precision model with --q_lora")


def enable_tf32() -> None:
    """TF32 matmuls on Ampere and newer (fp32 parts of mixed precision: master-weight math, fp32 heads), unless the
    user chose with --tf32."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def load_model(model_args: ModelArguments, training_args: TrainingArguments, lora_args: LoraArguments,
               config: Any, attention: AttentionChoice) -> tuple[Any, ModelInfo]:
    """The base model, in the dtype and attention implementation of the run, before any adapter."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    check_quantized_base(config, training_args, model_args.model_name_or_path)
    quantized = existing_quantization(config)
    mode = "qlora" if quantized else mode_of(training_args, lora_args)
    dtype = compute_dtype(training_args)
    if training_args.tf32 is None:
        enable_tf32()
    # Full fine-tuning keeps fp32 master weights (autocast does the bf16 math) unless DeepSpeed keeps them itself.
    load_dtype = torch.float32 if mode == "full" and not training_args.deepspeed else dtype
    kwargs: dict[str, Any] = dict(
        dtype=load_dtype,
        cache_dir=training_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
    )
    if attention.implementation is not None:
        kwargs["attn_implementation"] = attention.implementation
    if attention.implementation == "flex_attention":
        use_common_dtype_in_flex_attention()
    quant = _quantization_config(config, lora_args, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if (quant is not None or quantized) and not is_deepspeed_zero3_enabled():
        # Quantized weights are placed on this rank's device while loading (kernels are chosen for that device);
        # the Trainer does not move a quantized model.
        kwargs["device_map"] = {"": training_args.device}
    if is_deepspeed_zero3_enabled():
        _attach_deepspeed_comm()
    try:
        with warnings.catch_warnings():
            # the GPTQ loading attributes above replace the checkpoint's on purpose (transformers warns every time)
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except OSError as e:
        raise ConfigError(f"cannot load the model {model_args.model_name_or_path!r}: {e}") from None
    model.config.use_cache = False  # training: a KV cache wastes memory and breaks packed-sequence detection
    implementation = attention.implementation or getattr(model.config, "_attn_implementation", None) or "model's own"
    info = ModelInfo(mode, dtype, implementation, [], "", notes=list(attention.notes))
    if quantized:
        info.notes.append(f"{quantized} base: LoRA on its quantized linear layers")
    return model, info


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
            if p.dim() == 3:
                names.add(re.sub(r"^.*?layers\.\d+\.", "", f"{module_name}.{pname}"))
    return sorted(names)


def apply_lora(model: Any, training_args: TrainingArguments, lora_args: LoraArguments,
               modules_to_save: list[str]) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = lora_args.lora_target_modules
    all_linear = targets in (["all-linear"], ["all_linear"], ["all"])
    quantized = quantized_linear_names(model)
    if all_linear and quantized:
        # peft's all-linear matches nn.Linear only; GPTQ layers are not nn.Linear and would leave nothing to adapt.
        targets, all_linear = quantized, False
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


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        # bitsandbytes packs two 4-bit values per byte of storage dtype
        if p.__class__.__name__ == "Params4bit":
            n = n * 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    for module in model.modules():  # GPTQ weights are int32 buffers, 32 / bits values each
        qweight = getattr(module, "qweight", None)
        if torch.is_tensor(qweight) and getattr(module, "bits", None):
            total += qweight.numel() * (32 // module.bits)
    return trainable, total
