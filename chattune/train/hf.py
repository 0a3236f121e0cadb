"""Every place chattune reaches into a library's private surface, in one registry (SURFACE), each with why and the
upstream line it depends on (transformers 5.23.0, liger-kernel 0.8.5). The code lives here, except the chat
templating that data preparation uses: chattune/data/hf.py (the data layer may not import this one).

`HfTrainer` overrides the private `transformers.Trainer` hooks and hands each to a public method of ours
(`ChatTrainer` implements them); nothing else in chattune overrides or calls a private Trainer method.
`surface_problems()` lists what an installed version no longer provides (tests/test_hf_surface.py runs it, and
finetune.py's flag check refuses to train on a transformers that lacks one), so an upgrade that removes a hook fails
loudly instead of silently training with the stock behaviour.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import transformers

from chattune.data.hf import SURFACE as DATA_SURFACE

# (object path, parameters the override or call relies on, why). Parameters are checked by name, in order.
SURFACE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("transformers.Trainer._get_num_items_in_batch", ("self", "batch_samples", "device"),
     "the loss is normalised by our own count of the global batch's trained tokens (trainer.py L2298)"),
    ("transformers.Trainer.loss_is_scaled_for_ga", (),
     "compute_loss already divides by the global count; without it training_step divides by the accumulation "
     "again (trainer.py L2103)"),
    ("transformers.Trainer._get_output_dir", ("self", "trial"),
     "checkpoints are written under a staging directory, then committed by one rename (trainer.py L3336)"),
    ("transformers.Trainer._save_checkpoint", ("self", "model", "trial"),
     "the stock checkpoint, staged and committed atomically; a full disk does not end the run (trainer.py L3355)"),
    ("transformers.Trainer._prepare_inputs", ("self", "inputs"),
     "our evaluation loop moves its batches to the device as training does (trainer.py L2379)"),
    ("transformers.AttentionInterface._global_mapping", (),
     "flex_attention is wrapped to cast query/key/value to one dtype under autocast (integrations: the registry)"),
    ("liger_kernel.ops.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyFunction.forward",
     ("ctx", "_input", "weight", "target", "bias", "ce_weight", "ignore_index", "lse_square_scale", "label_smoothing",
      "reduction", "softcap", "return_z_loss", "accum_dtype", "use_token_scaling", "return_token_accuracy",
      "return_predicted_tokens", "ce_impl", "ce_mode", "chunk_mem_const"),
     "the fused loss calls it by position with chunk_mem_const (chunks sized in tokens) and an fp32 accum_dtype, "
     "which LigerFusedLinearCrossEntropyLoss does not pass (chattune.train.loss.liger_loss_sum)"),
    ("liger_kernel.transformers._apply_liger_kernel_to_instance", ("model",),
     "Liger's RMSNorm/SwiGLU/RoPE kernels patched into a loaded model, whatever its architecture"),
    *((f"{module}.{function}", params,
       "Gated DeltaNet layers call it as a module global: replaced by a version that keeps packed samples apart")
      for module in ("transformers.models.qwen3_5.modeling_qwen3_5", "transformers.models.qwen3_5_moe."
                     "modeling_qwen3_5_moe", "transformers.models.qwen3_next.modeling_qwen3_next")
      for function, params in (("causal_conv1d_fn", ("hidden_states", "weight", "bias", "activation")),
                               ("torch_chunk_gated_delta_rule", ("query", "key", "value", "g", "beta", "chunk_size")),
                               ("torch_recurrent_gated_delta_rule", ("query", "key", "value", "g", "beta")))),
    ("peft.utils.transformers_weight_conversion._convert_peft_config_moe", ("peft_config", "model"),
     "on MoE models converted from transformers v4 it moves gate/up/down_proj targets to the fused experts, so dense "
     "and shared-expert MLPs go unadapted (peft#3711): wrapped to keep the ones naming nn.Linear layers"),
    ("transformers.core_model_loading.set_param_for_module",
     ("model", "target_name", "param_value", "loading_info", "hf_quantizer"),
     "Q-LoRA on MoE: wrapped while loading, so that each fused expert stack is quantized to 4 bits as it is set "
     "(chattune.train.experts4bit; core_model_loading.py L1426)"),
    ("transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS", (),
     "the 4-bit experts' forward registered as experts implementation \"nf4\" (integrations/moe.py L546)"),
    ("peft.tuners.lora.layer.ParamWrapper.get_delta_factors", ("self", "adapter_name"),
     "4-bit experts apply peft's adapter per expert from its low-rank factors (lora/layer.py L2525); the "
     "wrapper's own forward, which adds the delta to the whole stack, is bypassed"),
    ("transformers.core_model_loading.WeightTransform.was_used", ("self",),
     "under ZeRO-3 the model keeps every weight conversion of its type for the save, not only the used ones: "
     "filtered as the plain load filters (keep_used_weight_conversions; integrations/deepspeed.py L485)"),
    *DATA_SURFACE,  # chat templating, used by data preparation (chattune/data/hf.py, which data/ may import)
)


def _resolve(path: str) -> Any:
    import importlib

    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def surface_problems(libraries: tuple[str, ...] = ("transformers", "liger_kernel", "peft"),
                     optional: tuple[str, ...] = ("liger_kernel",)) -> list[str]:
    """What the installed `libraries` no longer provide of SURFACE (a missing optional library is no problem)."""
    problems = []
    for path, params, why in SURFACE:
        if path.split(".")[0] not in libraries:
            continue
        try:
            obj = _resolve(path)
        except (ImportError, AttributeError) as e:
            if isinstance(e, ImportError) and path.split(".")[0] in optional:
                continue
            problems.append(f"{path} is gone ({type(e).__name__}); chattune relies on it: {why}")
            continue
        obj = getattr(obj, "original", obj)  # ours, installed over the library's (install_packed_linear_attention)
        if isinstance(obj, torch.nn.Module) or hasattr(obj, "__wrapped__"):  # a kernel wrapper around a function
            obj = _torch_function(obj)
        if params:
            have = tuple(inspect.signature(obj).parameters)[:len(params)]
            if have != params:
                problems.append(f"{path} now takes {have}, chattune expects {params}: {why}")
    if "loss_is_scaled_for_ga" not in inspect.getsource(transformers.Trainer.training_step):
        problems.append("transformers.Trainer.training_step no longer reads loss_is_scaled_for_ga: the loss would be "
                        "divided by the gradient accumulation twice")
    return problems


class HfTrainer(transformers.Trainer):
    """The private Trainer hooks chattune overrides, each handed to a public method of the subclass."""

    # compute_loss returns sum / (trained tokens of the global batch) * ranks: already scaled for accumulation
    loss_is_scaled_for_ga = True

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        return self.count_trained_tokens(batch_samples, device)

    def _get_output_dir(self, trial) -> str:
        return self.staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        self.save_checkpoint_atomically(lambda: super(HfTrainer, self)._save_checkpoint(model, trial))

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self._prepare_inputs(inputs)

    # implemented by ChatTrainer
    staging_dir: str | None = None

    def count_trained_tokens(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        raise NotImplementedError

    def save_checkpoint_atomically(self, save: Callable[[], None]) -> None:
        raise NotImplementedError


def use_common_dtype_in_flex_attention() -> None:
    """flex_attention with fp32 master weights under bf16 autocast gets fp32 query/key (RoPE multiplies them by the
    fp32 cos/sin of the fp32 residual stream) and a bf16 value; torch before 2.10 rejects mixed dtypes, and flex is
    not an autocast op. Cast all three to the autocast dtype (or the value's) before the kernel, as sdpa is cast.
    Registered once, through transformers' AttentionInterface, over its own flex_attention function (read from the
    registry's private mapping: the public interface has no getter)."""
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


def apply_liger_kernel_to_instance(model: Any) -> None:
    """Liger's kernels (RMSNorm, SwiGLU, RoPE) patched into `model`; the loss stays ours (no fused CE here)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


def _torch_function(function: Callable) -> Callable:
    """The pure torch function behind transformers' kernel wrapper (`use_kernel_func_from_hub_with_fallback` wraps
    it with functools.wraps; with the `kernels` package the module global is a `Func` module around the wrapper)."""
    if isinstance(function, torch.nn.Module):
        function = inspect.getclosurevars(type(function).forward).nonlocals.get("func", function)
    return getattr(function, "__wrapped__", function)


def install_packed_linear_attention(model_type: str) -> bool:
    """Make the Gated DeltaNet layers of `model_type` keep the samples of a packed row apart: their modeling module's
    `causal_conv1d_fn` and `torch_chunk_gated_delta_rule` globals (which the layer's forward looks up at call time)
    are replaced by chattune.train.linear_attention's boundary-aware versions, and the decode-time recurrent rule
    runs the torch path on CPU tensors (transformers picks flash-linear-attention at import even on a machine with no
    GPU, where its kernel cannot run). Without boundaries the replacements compute what the originals do. Returns
    whether `model_type` has such layers (packed rows must then carry their boundaries); idempotent."""
    import importlib

    from chattune.train.linear_attention import (
        GATED_DELTANET_MODULES,
        packed_causal_conv1d,
        packed_chunk_gated_delta_rule,
    )

    name = GATED_DELTANET_MODULES.get(model_type)
    if name is None:
        return False
    module = importlib.import_module(name)
    if getattr(module.causal_conv1d_fn, "keeps_packed_samples_apart", False):
        return True
    conv, rule = _torch_function(module.causal_conv1d_fn), _torch_function(module.torch_chunk_gated_delta_rule)
    recurrent, torch_recurrent = module.torch_recurrent_gated_delta_rule, _torch_function(
        module.torch_recurrent_gated_delta_rule)

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        return packed_causal_conv1d(conv, hidden_states, weight, bias, activation, **kwargs)

    def torch_chunk_gated_delta_rule(*args, **kwargs):
        return packed_chunk_gated_delta_rule(rule, *args, **kwargs)

    def torch_recurrent_gated_delta_rule(query, *args, **kwargs):
        return (recurrent if query.is_cuda else torch_recurrent)(query, *args, **kwargs)

    for function, original in ((causal_conv1d_fn, module.causal_conv1d_fn),
                               (torch_chunk_gated_delta_rule, module.torch_chunk_gated_delta_rule),
                               (torch_recurrent_gated_delta_rule, recurrent)):
        function.keeps_packed_samples_apart, function.original = True, original
    module.causal_conv1d_fn = causal_conv1d_fn
    module.torch_chunk_gated_delta_rule = torch_chunk_gated_delta_rule
    module.torch_recurrent_gated_delta_rule = torch_recurrent_gated_delta_rule
    return True


def keep_linear_moe_targets() -> None:
    """Work around https://github.com/huggingface/peft/issues/3711 (peft 0.21.2; the fix is peft PR 3715, unreleased).

    For MoE model types transformers v5 converts from v4 checkpoints (Qwen3-MoE, DeepSeek-V2/V3, GLM-4-MoE, ...), peft
    rewrites LoRA targets named gate_proj/up_proj/down_proj into targets of the fused expert parameters and drops
    them from target_modules, although the same names also name the nn.Linear layers of dense MLPs (DeepSeek's first
    layers, Qwen3-MoE's mlp_only_layers) and of shared experts: those would train no adapter, with nothing said. As
    PR 3715 does, the targets that name an nn.Linear layer are kept, by their full names. peft runs the conversion
    when an adapter is created and again when one is loaded, so every load of ours installs this first; a plain
    peft 0.21 load of such an adapter loses those layers' weights (README, troubleshooting). Idempotent."""
    import peft.utils.transformers_weight_conversion as conversion
    from peft.tuners.tuners_utils import (
        _maybe_include_all_linear_layers,
        check_target_module_exists,
    )

    convert = conversion._convert_peft_config_moe
    if getattr(convert, "keeps_linear_targets", False):
        return

    def convert_keeping_linear_targets(peft_config, model):
        import copy

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        mapping = conversion._MOE_TARGET_MODULE_MAPPING.get(conversion._MODEL_TO_CONVERSION_PATTERN.get(model_type))
        resolved = peft_config
        if isinstance(peft_config.target_modules, str) and peft_config.target_modules.lower() == "all-linear":
            resolved = _maybe_include_all_linear_layers(copy.copy(peft_config), model)
        keep = set()
        if mapping and resolved.target_modules:
            for name, module in model.named_modules():
                old = name.rsplit(".", 1)[-1]
                # moved to a parameter of another module (gate_proj -> experts.gate_up_proj), not to this module's own
                # weight (the router: gate -> gate.weight)
                moved = old in mapping and "." not in mapping[old]
                if moved and isinstance(module, torch.nn.Linear) and check_target_module_exists(resolved, name):
                    keep.add(name)
        convert(peft_config, model)
        if keep:
            peft_config.target_modules = set(peft_config.target_modules or ()) | keep

    convert_keeping_linear_targets.keeps_linear_targets = True
    convert_keeping_linear_targets.original = convert
    conversion._convert_peft_config_moe = convert_keeping_linear_targets


def kept_linear_moe_targets(model: Any, target_modules: Any) -> list[str]:
    """The adapted nn.Linear layers that plain peft 0.21.2 would have moved to the fused experts (peft#3711): the
    targets named like an expert projection, of a model type peft converts. Empty for other models (peft writes
    all-linear as full names for every model, so a full name alone says nothing)."""
    import peft.utils.transformers_weight_conversion as conversion

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mapping = conversion._MOE_TARGET_MODULE_MAPPING.get(conversion._MODEL_TO_CONVERSION_PATTERN.get(model_type))
    if not mapping:
        return []
    moved = {old for old, new in mapping.items() if "." not in new}
    return sorted(t for t in target_modules or () if "." in t and t.rsplit(".", 1)[-1] in moved)


def keep_used_weight_conversions(model: Any) -> None:
    """After a ZeRO-3 load: keep only the weight conversions that renamed a checkpoint tensor, as the plain load
    does (core_model_loading.py L1876). transformers 5.23's ZeRO-3 load keeps all of its model type's
    (integrations/deepspeed.py L485, from huggingface/transformers#43303), and save_pretrained reverses them: for
    Qwen3.5's vision-language class the unused PrefixChange(prefix_to_remove="language_model") saved every text
    tensor as model.language_model.model.language_model.* (test_qwen35's ZeRO-3 full fine-tuning test)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]
