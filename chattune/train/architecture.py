"""What a model's architecture declares, read from its config before any weight loads (its class, the attention
kernels it supports, whether samples packed in one row stay apart, a quantized checkpoint), and the attention
implementation and packing chosen from that."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from chattune.errors import ConfigError

if TYPE_CHECKING:
    from chattune.train.args import LoraArguments, TrainingArguments


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


ATTN_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", "torch_varlen")


@dataclass(frozen=True)
class ModelClass:
    """What the model's class declares about attention, read before any weight loads."""

    name: str
    remote_code: bool  # the model's own code (trust_remote_code): builds its own masks, ignores packed position_ids
    sdpa: bool = True
    flash: bool = False
    flex: bool = False
    proven: bool = False  # packed rows keep their samples apart: shown by chattune.train.packing_proof
    packing_why: str = ""  # the proof's finding (the measured leak, or why the class is unproven)
    linear_attention: bool = False  # Gated DeltaNet layers: packed rows carry their sample boundaries to them
    logits_to_keep: bool = True  # its forward can skip the logits (a fused loss takes its hidden states instead)
    quantized: str | None = None  # the checkpoint's quantization method (gptq, awq, ...), None for float weights
    vision_language: bool = False  # a vision-language checkpoint (Qwen3.5): its own class, the text path trained
    router_aux: float | None = None  # MoE: the config's load-balancing coefficient, where the class computes that loss
    experts: bool = False  # fused MoE experts whose implementation transformers can set (grouped_mm, eager, ...)

    @property
    def packs(self) -> bool:
        """Whether samples packed in one row stay apart, proven for this class (remote code never is: it builds its
        own masks and ignores packed position_ids)."""
        return not self.remote_code and self.proven


def model_class(config: Any, trust_remote_code: bool) -> ModelClass:
    """The class `AutoModelForCausalLM` will instantiate for `config`, and its declared attention support."""
    return dataclasses.replace(_model_class(config, trust_remote_code), quantized=existing_quantization(config))


def checkpoint_class(config: Any) -> type | None:
    """The vision-language class a checkpoint names in `architectures` (Qwen3.5's Qwen3_5ForConditionalGeneration,
    which AutoModelForCausalLM would load as its text-only class, dropping the vision tower): trained in its own class
    so its adapter, merge and quantized model keep the checkpoint's layout. None for a text-only checkpoint."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    )

    if getattr(config, "vision_config", None) is None:
        return None
    try:
        cls = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    except KeyError:
        return None
    return cls if cls.__name__ in (getattr(config, "architectures", None) or []) else None


def load_class(config: Any) -> Any:
    """The transformers auto class that loads the checkpoint as chattune trains it."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if checkpoint_class(config) is not None else AutoModelForCausalLM


def _model_class(config: Any, trust_remote_code: bool) -> ModelClass:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        reference = str(auto_map["AutoModelForCausalLM"])
        return ModelClass(reference.split(".")[-1], remote_code=True,
                          logits_to_keep=_remote_keeps_logits(reference, getattr(config, "_name_or_path", "")))
    cls = checkpoint_class(config) or MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        return ModelClass(type(config).__name__, remote_code=False, packing_why="not a causal-LM class")
    from chattune.train.linear_attention import GATED_DELTANET_MODULES
    from chattune.train.packing_proof import verdict

    packing = verdict(cls)
    return ModelClass(cls.__name__, remote_code=False, sdpa=bool(cls._supports_sdpa),
                      flash=bool(cls._supports_flash_attn), flex=bool(cls._supports_flex_attn),
                      proven=packing.packs, packing_why=packing.why,
                      linear_attention=getattr(config.get_text_config(), "model_type", "") in GATED_DELTANET_MODULES,
                      logits_to_keep=_keeps_logits(cls), vision_language=checkpoint_class(config) is not None,
                      router_aux=_router_aux(cls, config), experts=_has_settable_experts(cls, config))


def _has_settable_experts(cls: Any, config: Any) -> bool:
    """An MoE class whose fused experts take transformers' `experts_implementation` (@use_experts_implementation)."""
    return bool(routed_expert_count(config.get_text_config()) and cls._can_set_experts_implementation())


def config_count(text_config: Any, *names: str) -> int | None:
    """The first of `names` the config sets to a positive int (families name the same count differently)."""
    return next((v for n in names if isinstance(v := getattr(text_config, n, None), int) and v > 0), None)


def routed_expert_count(text_config: Any) -> int | None:
    """The routed experts of an MoE layer, from the config; None for a dense model."""
    return config_count(text_config, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _router_aux(cls: Any, config: Any) -> float | None:
    """The config's router_aux_loss_coef where the class returns its routers' load-balancing loss (`aux_loss`, asked
    for with `output_router_logits`): Qwen2/3/3.5-MoE, Mixtral, OLMoE, ... None for a dense model, and for an MoE
    class that computes none (DeepSeek-V2)."""
    import inspect
    import sys

    module = sys.modules.get(cls.__module__)
    if "output_router_logits" not in inspect.signature(cls.forward).parameters or not hasattr(
            module, "load_balancing_loss_func"):
        return None
    return float(getattr(config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)


def _keeps_logits(cls: Any) -> bool:
    """Whether the class's forward computes logits for the last positions only (remote-code models predating
    `logits_to_keep` do not, and then need their own full-logits loss) and exposes its decoder."""
    import inspect

    return "logits_to_keep" in inspect.signature(cls.forward).parameters and hasattr(cls, "get_decoder")


def _remote_keeps_logits(reference: str, path: str) -> bool:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        return _keeps_logits(get_class_from_dynamic_module(reference, path))
    except Exception:  # noqa: BLE001 - code that cannot be read here: the model's own logits, which always work
        return False


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
                     flash_problem: str | None, varlen_problem: str | None = "no CUDA GPU") -> AttentionChoice:
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
               else cls.packing_why)
        raise ConfigError(f"--packing true: {cls.name} cannot train on packed rows ({why}); samples would attend to "
                          "each other. Use --packing false (or auto).")
    if cls.remote_code:
        if requested_attn != "auto":
            notes.append(f"--attn_implementation {requested_attn} passed to the model's own code")
        else:
            notes.append(f"{cls.name} runs its own (remote) code: its attention, padded batches")
        return AttentionChoice(None if requested_attn == "auto" else requested_attn, False, tuple(notes))
    # torch_varlen takes the sample boundaries as flash-attention's kwargs: classes that support flash-attention
    supported = {"sdpa": cls.sdpa, "eager": True, "flash_attention_2": cls.flash, "flash_attention_3": cls.flash,
                 "flex_attention": cls.flex, "torch_varlen": cls.flash and cls.packs}
    if requested_attn != "auto":
        if not supported[requested_attn]:
            raise ConfigError(f"--attn_implementation {requested_attn}: {cls.name} does not support it; use auto")
        if requested_attn.startswith("flash") and flash_problem:
            raise ConfigError(f"--attn_implementation {requested_attn}: {flash_problem}")
        if requested_attn == "torch_varlen" and varlen_problem:
            raise ConfigError(f"--attn_implementation torch_varlen: {varlen_problem}")
        if requested_attn == "torch_varlen" and requested_packing == "false":
            raise ConfigError("--attn_implementation torch_varlen attends within packed rows: drop --packing false")
        attn = requested_attn
    elif cuda and cls.flash and flash_problem is None:
        attn = "flash_attention_2"
    elif cuda and cls.flex and requested_packing != "false" and cls.packs:
        attn = "flex_attention"
    else:
        attn = "sdpa" if cls.sdpa else "eager"
    # Linear-attention layers cost the same per token packed or padded; packing removes their padding, whatever the
    # full-attention layers' kernel does with the rest.
    skips_blocks = cuda and (attn in ("flash_attention_2", "flash_attention_3", "flex_attention", "torch_varlen")
                             or cls.linear_attention)
    if requested_packing == "auto":
        packing = skips_blocks and cls.packs
        if not packing:
            if not cuda:
                notes.append("padded batches: packing pays only with a CUDA attention kernel (--packing true to force)")
            elif not cls.packs:
                notes.append(f"padded batches: {cls.name} cannot train on packed rows ({cls.packing_why})")
            else:
                notes.append(f"padded batches: {attn} computes the masked blocks of a packed row (no gain)")
    else:
        packing = requested_packing == "true"
    return AttentionChoice(attn, packing, tuple(notes))


def existing_quantization(config: Any) -> str | None:
    """The quantization method a checkpoint was saved with (gptq, awq, bitsandbytes...), or None for float weights."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")
