"""Adapters -> merged models, and loading any output of a run (adapter, merged or GPTQ) for inference."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from chattune.data.split import carry_held_out
from chattune.errors import ConfigError

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def run_info(path: str) -> dict[str, Any]:
    """chattune.json of a training output (template, template variables, mode, base), or {}."""
    file = os.path.join(path, "chattune.json")
    return json.loads(open(file).read()) if os.path.isfile(file) else {}


def add_trust_remote_code_flag(parser: Any) -> None:
    """--trust_remote_code true|false for the scripts after training, with finetune.py's default (Qwen's: true)."""
    parser.add_argument("--trust_remote_code", default="true", type=str.lower, choices=("true", "false"),
                        help="run the model's own code (Qwen-7B-Chat, ChatGLM need it); default true, as finetune.py")


def parse_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def base_of(adapter_path: str, base: str | None) -> str:
    from chattune.hub import model_source_problem

    if not base:
        config = json.loads(open(os.path.join(adapter_path, "adapter_config.json")).read())
        base = config.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter_path}/adapter_config.json names no base model; pass --base_model_name_or_path")
    problem = model_source_problem(base, "--base_model_name_or_path")
    if problem:
        raise ConfigError(problem)
    return base


def check_same_base(adapter_path: str, base: str) -> None:
    """An adapter on a base of the same shapes but other weights loads without a word and serves nonsense: refused
    when the run recorded its base's weight fingerprint (chattune.json) and `base` has another."""
    from chattune.train.layout import base_fingerprint

    info = run_info(adapter_path)
    recorded = info.get("base_fingerprint")
    found = base_fingerprint(base) if recorded else None
    if recorded and found and found != recorded:
        raise ConfigError(
            f"{adapter_path} was trained on {info.get('base_model') or 'another base'}, whose "
            f"weights differ from {base}'s (weight fingerprint {recorded} vs {found}): pass "
            "--base_model_name_or_path with the model it was trained from")


def _refuse_quantized_base(base: str, trust_remote_code: bool) -> None:
    """Merging into 4-bit (or GPTQ) weights would round the adapter away or fail: merge into full precision."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise ConfigError(
            f"{base} is a quantized ({method}) model: merging a (Q-)LoRA adapter into quantized weights loses it. "
            "Merge into the full-precision base model instead (--base_model_name_or_path /path/to/bf16-model); "
            "quantize the merged model afterwards with run_gptq.py"
        )


def load_tokenizer_for(path: str, trust_remote_code: bool = False) -> Any:
    from chattune.data.tokenizer import load_tokenizer

    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def load_adapter_model(adapter_path: str, base: str | None = None, dtype: Any = "auto",
                       device_map: Any = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Base model + adapter (unmerged), with the adapter's tokenizer (which carries the training template)."""
    from peft import PeftModel

    from chattune.train.hf import keep_linear_moe_targets

    keep_linear_moe_targets()  # peft#3711: load the dense and shared-expert MLP adapters of an MoE model too
    base = base_of(adapter_path, base)
    check_same_base(adapter_path, base)
    tokenizer = load_tokenizer_for(adapter_path, trust_remote_code)
    model = model_loader(base, trust_remote_code).from_pretrained(base, dtype=dtype, device_map=device_map,
                                                                  trust_remote_code=trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # the run added template tokens: the adapter carries the grown embeddings (modules_to_save)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter_path), tokenizer


def merge_adapter(adapter_path: str, base: str | None = None, dtype: Any = "auto",
                  trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Fold the adapter into full-precision base weights; refuses a quantized base and an adapter with no effect."""
    base = base_of(adapter_path, base)
    _refuse_quantized_base(base, trust_remote_code)
    model, tokenizer = load_adapter_model(adapter_path, base, dtype, trust_remote_code=trust_remote_code)
    if not any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n):
        raise ConfigError(f"{adapter_path}: every lora_B weight is zero, so the merged model would equal its base "
                          "(the adapter was never trained, or saved empty)")
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    return merged, tokenizer


def check_output_path(out: str, source: str) -> None:
    """The merged model replaces `out` when that is a model (a merge run again); anything else there is refused."""
    if os.path.abspath(out) == os.path.abspath(source):
        raise ConfigError(f"--output_path {out} is the adapter's own directory: choose a new one")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
        raise ConfigError(f"--output_path {out} exists and holds something other than a model, which the merged model "
                          "would replace: choose a new directory or remove it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output_path {out} is a file: choose a directory")


def save_model(model: Any, tokenizer: Any, out: str, source: str, max_shard_size: str = "5GB",
               base: str | None = None) -> list[str]:
    """Safetensors shards + tokenizer (with chat template) + generation config and chattune.json from the run; with
    `base`, completed to the base checkpoint's layout (chattune.train.layout). Returns the base tensors copied."""
    from transformers import GenerationConfig

    os.makedirs(out, exist_ok=True)
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        pass
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    info = run_info(source)
    if info:
        info["merged_from"] = os.path.abspath(source)
        with open(os.path.join(out, "chattune.json"), "w") as f:
            json.dump(info, f, indent=1)
    carry_held_out(source, out)  # the run's val.jsonl goes with the model: run_gptq.py evaluates on it
    if base is None:
        return []
    from chattune.train.layout import complete_from_base, skipped_on_load

    return complete_from_base(out, base, carry=skipped_on_load(model))


def load_for_inference(path: str, adapter_path: str | None = None, base: str | None = None, dtype: Any = "auto",
                       merge: bool = False, device_map: Any = None, trust_remote_code: bool = False
                       ) -> tuple[Any, Any]:
    """Any run output: a merged/full/GPTQ model directory, or an adapter directory (or model + --adapter_path).

    Returns (model, tokenizer) ready for generation; with `merge`, an adapter is folded in memory (as run_gptq.py
    needs a plain model).
    """
    if adapter_path is None and is_adapter_dir(path):
        adapter_path, base = path, base
    elif adapter_path is not None:
        base = path
    if adapter_path is not None:
        if merge:
            return merge_adapter(adapter_path, base, dtype, trust_remote_code)
        model, tokenizer = load_adapter_model(adapter_path, base, dtype, device_map, trust_remote_code)
        return model.eval(), tokenizer
    tokenizer = load_tokenizer_for(path, trust_remote_code)
    model = model_loader(path, trust_remote_code).from_pretrained(path, dtype=dtype, device_map=device_map,
                                                                  trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def model_loader(path: str, trust_remote_code: bool) -> Any:
    """The auto class that loads `path` as training does: a vision-language checkpoint in its own class (so the
    vision tower comes along and adapter names match), any other as a causal LM."""
    from transformers import AutoConfig

    from chattune.train.architecture import load_class
    from chattune.train.hf import install_packed_linear_attention

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    install_packed_linear_attention(getattr(config.get_text_config(), "model_type", ""))  # the CPU fallback, too
    return load_class(config)
