"""Load the model for the chosen mode: full, LoRA, or Q-LoRA (bitsandbytes NF4, or a GPTQ int4 base)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

import torch

from chattune.errors import ConfigError
from chattune.train import experts4bit
from chattune.train.architecture import compute_dtype, existing_quantization, load_class
from chattune.train.hf import (
    install_packed_linear_attention,
    keep_used_weight_conversions,
    use_common_dtype_in_flex_attention,
)

if TYPE_CHECKING:
    from chattune.train.args import LoraArguments, ModelArguments, TrainingArguments


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


def enable_tf32() -> None:
    """TF32 matmuls on Ampere and newer (fp32 parts of mixed precision: master-weight math, fp32 heads), unless the
    user chose with --tf32."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def load_model(model_args: ModelArguments, training_args: TrainingArguments, lora_args: LoraArguments,
               config: Any, plan: Any) -> Any:
    """The base model, in the plan's dtype, mode and attention implementation, before any adapter."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    quantized = existing_quantization(config)
    dtype = compute_dtype(training_args)
    install_packed_linear_attention(getattr(config.get_text_config(), "model_type", config.model_type))
    if training_args.tf32 is None:
        enable_tf32()
    # Full fine-tuning keeps fp32 master weights (autocast does the bf16 math) unless DeepSpeed keeps them itself.
    load_dtype = torch.float32 if plan.mode == "full" and not training_args.deepspeed else dtype
    kwargs: dict[str, Any] = dict(dtype=load_dtype, cache_dir=training_args.cache_dir,
                                  trust_remote_code=model_args.trust_remote_code)
    if not plan.attention.choice.startswith("the model's own"):
        kwargs["attn_implementation"] = plan.attention.choice
    if plan.experts is not None:
        kwargs["experts_implementation"] = plan.experts.choice
    if plan.attention.choice == "flex_attention":
        use_common_dtype_in_flex_attention()
    if plan.attention.choice == "torch_varlen":
        from chattune.train.varlen import register

        register()
    quant = _quantization_config(config, lora_args, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if (quant is not None or quantized) and not is_deepspeed_zero3_enabled():
        # Quantized weights are placed on this rank's device while loading (kernels are chosen for that device);
        # the Trainer does not move a quantized model.
        kwargs["device_map"] = {"": training_args.device}
    if is_deepspeed_zero3_enabled():
        _attach_deepspeed_comm()
    four_bit_experts = plan.experts is not None and plan.experts.choice == experts4bit.IMPLEMENTATION
    if four_bit_experts:
        experts4bit.register()
    try:
        with warnings.catch_warnings(), (experts4bit.quantizing_experts_while_loading()
                                         if four_bit_experts else contextlib.nullcontext()):
            # the GPTQ loading attributes above replace the checkpoint's on purpose (transformers warns every time)
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = load_class(config).from_pretrained(model_args.model_name_or_path, **kwargs)
    except OSError as e:
        raise ConfigError(f"cannot load the model {model_args.model_name_or_path!r}: {e}") from None
    if is_deepspeed_zero3_enabled():
        keep_used_weight_conversions(model)
    if four_bit_experts:
        late = experts4bit.quantize_experts(model)
        if late:
            print(f"note: {late} MoE expert stacks were quantized to 4 bits after loading, not while loading (this "
                  "transformers loads another way): the load needed their bf16 size", file=sys.stderr)
    model.config.use_cache = False  # training: a KV cache wastes memory and breaks packed-sequence detection
    model.config.get_text_config().use_cache = False
    for p in non_text_parameters(model):
        p.requires_grad_(False)  # the text path is trained; the vision tower stays the base's
    return model


def non_text_parameters(model: Any) -> list[Any]:
    """Parameters outside the text path of a vision-language model (its vision tower): never trained."""
    return [p for name, p in model.named_parameters() if ".visual." in f".{name}."]


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


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        # bitsandbytes packs two 4-bit values per byte of storage dtype
        if p.__class__.__name__ == "Params4bit":
            n = n * 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    for module in model.modules():  # 4-bit MoE expert stacks (chattune.train.experts4bit): their codes are buffers
        total += sum(getattr(module, f"{name}_nf4").shape[0] * torch.Size(shape).numel()
                     for name, (shape, _) in getattr(module, "nf4_stacks", {}).items()
                     if name not in module._parameters)  # after experts4bit.finish: no placeholder counts them
    for module in model.modules():  # GPTQ weights are int32 buffers, 32 / bits values each
        qweight = getattr(module, "qweight", None)
        if torch.is_tensor(qweight) and getattr(module, "bits", None):
            total += qweight.numel() * (32 // module.bits)
    return trainable, total


def compile_decoder_layers(model: Any) -> int:
    """torch.compile each decoder layer in place (regional compilation: the layers share one compiled graph, so the
    compile time is one layer's, not the model's), with dynamic shapes so that micro-batches of new lengths do not
    compile again. Returns how many layers were compiled."""
    from chattune.train.loss import base_model

    layers = getattr(base_model(model).get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"--compile_layers: {type(base_model(model)).__name__} has no decoder `layers` to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
