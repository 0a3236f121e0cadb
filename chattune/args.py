"""The one configuration surface: dataclasses parsed by HfArgumentParser.

Qwen's `finetune.py` flags keep their names, defaults and meaning (a Qwen launch line runs unchanged); every other
field extends them. All of HF `TrainingArguments` is accepted too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Optional

import transformers

from chattune.errors import ConfigError


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default="Qwen/Qwen-7B", metadata={"help": "Model directory or hub id."})
    trust_remote_code: bool = field(
        default=True,
        metadata={"help": "Run the model's own code (Qwen-7B-Chat, ChatGLM need it; Qwen's script always sets it)."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto (flash_attention_2 if installed on CUDA, else sdpa) | sdpa | eager | "
                          "flash_attention_2 | flex_attention."},
    )


@dataclass
class DataArguments:
    data_path: Optional[str] = field(
        default=None, metadata={"help": "Training data: file(s) comma separated, or a directory (JSON/JSONL/parquet)."}
    )
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same formats."})
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "Accepted for Qwen compatibility. Data is always tokenized once into a memory-mapped cache."},
    )
    template: str = field(
        default="auto",
        metadata={"help": "Chat template: auto (the tokenizer's own) | chatml | qwen | deepseek | llama3 | llama2."},
    )
    template_kwargs: Optional[str] = field(
        default=None, metadata={"help": 'JSON of extra template variables, e.g. \'{"enable_thinking": false}\'.'}
    )
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Drop invalid records (the count is reported) instead of stopping."}
    )
    preview_data: int = field(default=1, metadata={"help": "Print this many rendered samples, trained part marked."})
    dump_tokenized: Optional[str] = field(
        default=None,
        metadata={"help": "Write the tokenized training samples as JSONL {input_ids, labels} here and exit "
                          "(no weights are loaded)."},
    )
    data_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where tokenized data is cached (default ~/.cache/chattune/tokenized)."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Tokenizer processes (default: cores, for 4000+ conversations)."}
    )

    def parsed_template_kwargs(self) -> dict:
        if not self.template_kwargs:
            return {}
        try:
            value = json.loads(self.template_kwargs)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"--template_kwargs is not valid JSON ({e}); example: '{{\"enable_thinking\": false}}'") from None
        if not isinstance(value, dict):
            raise ConfigError("--template_kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
        return value


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hugging Face cache for model downloads."})
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(
        default=8192,
        metadata={"help": "Maximum sequence length; longer samples are truncated (counted in the data report)."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    packing: str = field(
        default="auto",
        metadata={"help": "Padding-free packing of samples into token-budget micro-batches: auto (on when the "
                          "attention kernel skips other samples: flash-attention, or flex_attention on CUDA) | "
                          "true | false."},
    )
    max_tokens_per_batch: int = field(
        default=0,
        metadata={"help": "Token budget of a packed micro-batch per device (default per_device_train_batch_size x "
                          "model_max_length, the padded worst case)."},
    )
    fused_ce: str = field(
        default="auto",
        metadata={"help": "Loss without full-vocabulary logits: auto (Liger on CUDA, else chunked) | liger | "
                          "chunked | none."},
    )
    liger_kernels: str = field(
        default="auto",
        metadata={"help": "Liger's RMSNorm/SwiGLU/RoPE kernels: auto (on CUDA when liger-kernel is installed) | "
                          "true | false."},
    )
    estimate_memory: bool = field(
        default=False,
        metadata={"help": "Print the per-GPU memory estimate for this run (config only, no weights) and exit."},
    )
    estimate_gpus: int = field(
        default=0, metadata={"help": "GPU count for --estimate_memory (default: the processes of this launch)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start fresh even when output_dir holds checkpoints (by default a re-run resumes)."},
    )


    def micro_batch_tokens(self) -> int:
        """Tokens per device micro-batch: --max_tokens_per_batch, else the padded worst case (batch x max length)."""
        return self.max_tokens_per_batch or self.per_device_train_batch_size * self.model_max_length


@dataclass
class LoraArguments:
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt, or all-linear (every linear layer of the decoder, MoE experts too)."},
    )
    lora_weight_path: str = ""
    lora_bias: str = "none"
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: 4-bit NF4 base (or a GPTQ int4 base) + LoRA."})
    lora_modules_to_save: str = field(
        default="auto",
        metadata={"help": "Modules trained in full next to LoRA: auto (input embeddings + output layer when the "
                          "template uses tokens the base model never learned) | none | comma-separated names."},
    )


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)

# Flags of Qwen's launch lines that transformers 5 renamed: old -> new. warmup_steps takes a ratio as a float < 1.
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}


def rename_flags(argv: list[str]) -> list[str]:
    """Map renamed flags to their new names, where the installed transformers no longer knows the old one."""
    import dataclasses

    known = {f"--{f.name}" for f in dataclasses.fields(transformers.TrainingArguments)}
    renames = {old: new for old, new in RENAMED_FLAGS.items() if old not in known}
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(renames[name] + eq + value if name in renames else arg)
    return out


def flag(value: str, name: str) -> str:
    """Normalize an auto/true/false flag."""
    v = str(value).strip().lower()
    if v in ("auto", "true", "false"):
        return v
    if v in ("1", "yes", "on"):
        return "true"
    if v in ("0", "no", "off"):
        return "false"
    raise ConfigError(f"--{name} {value!r}: choose auto, true or false")


def parse_args(argv: list[str] | None = None):
    """Parse the command line into (model, data, training, lora) arguments; unknown flags are an error."""
    argv = rename_flags(list(sys.argv[1:] if argv is None else argv))
    if "--estimate_memory" in argv and "--use_cpu" not in argv:
        import torch

        if not torch.cuda.is_available():  # planning on a machine without the GPUs: nothing trains here
            argv += ["--use_cpu", "True"]
    parser = transformers.HfArgumentParser(ALL_ARGUMENTS)
    try:
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            method = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
            return tuple(method(argv[0], allow_extra_keys=False))
        model, data, training, lora, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as e:  # TrainingArguments.__post_init__ rejects inconsistent flags with a ValueError
        raise ConfigError(str(e)) from None
    if unknown:
        raise ConfigError(f"unknown arguments: {' '.join(unknown)} (see python finetune.py --help)")
    return model, data, training, lora
