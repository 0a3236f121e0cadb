"""The one configuration surface: dataclasses parsed by HfArgumentParser.

Qwen's `finetune.py` flags keep their names, defaults and meaning (a Qwen launch line runs unchanged); every other
field extends them. All of HF `TrainingArguments` is accepted too.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import transformers

from chattune.data.chat_templates import BUILTIN_TEMPLATES
from chattune.errors import ConfigError


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default="Qwen/Qwen-7B", metadata={"help": "Model directory or hub id."})
    trust_remote_code: bool = field(
        default=True,
        metadata={"help": "Run the model's own code (Qwen-7B-Chat, ChatGLM need it; Qwen's script always sets it)."},
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                 "flex_attention", "torch_varlen"] = field(
        default="auto",
        metadata={"help": "auto: flash_attention_2 where it runs (CUDA, Ampere+, bf16/fp16) and the model supports it, "
                          "else flex_attention for packed batches on CUDA, else sdpa. Remote-code models use their "
                          "own. torch_varlen: torch's own flash kernels for packed rows (CUDA, torch 2.10+; opt-in)."},
    )
    experts_implementation: Literal["auto", "grouped_mm", "batched_mm", "eager", "nf4"] = field(
        default="auto",
        metadata={"help": "MoE models: how the experts run. auto: nf4 under --q_lora, else grouped_mm (transformers' "
                          "grouped GEMM over all experts at once) | batched_mm | eager (a loop over the experts) | nf4 "
                          "(Q-LoRA: experts stored in 4 bits, dequantized one at a time). Naming another under --q_lora "
                          "keeps the experts in bf16."},
    )


@dataclass
class DataArguments:
    data_path: Optional[str] = field(
        default=None, metadata={"help": "Training data: file(s) comma separated, or a directory (JSON/JSONL/parquet)."}
    )
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same formats."})
    val_size: str = field(
        default="0",
        metadata={"help": "Hold out this share of the training conversations for evaluation: a fraction (0.05) or a "
                          "count (200); seeded by --seed, written to output_dir/val.jsonl (+ val_ids.json)."},
    )
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "Accepted for Qwen compatibility. Data is always tokenized once into a memory-mapped cache."},
    )
    template: str = field(
        default="auto",
        metadata={"help": "Chat template: auto (the tokenizer's own) or a built-in one.",
                  "choices": ["auto", *BUILTIN_TEMPLATES]},
    )
    template_kwargs: Optional[str] = field(
        default=None, metadata={"help": 'JSON of extra template variables, e.g. \'{"enable_thinking": false}\'.'}
    )
    train_on: Literal["all", "last"] = field(
        default="all",
        metadata={"help": "Which assistant turns are trained: all (default) or the last one of each conversation. "
                          "Turns marked \"train\": false (or \"loss\": false, \"weight\": 0) are never trained."},
    )
    special_tokens_in_content: Literal["error", "text"] = field(
        default="error",
        metadata={"help": "Turn-structure tokens of the template (<|im_end|>, eos, ...) written inside a message: "
                          "error (default: the records are listed) or text (encoded as plain text, counted)."},
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
    optim: str = field(
        default="auto",
        metadata={"help": "auto: fused AdamW (adamw_torch_fused) on CUDA, adamw_torch elsewhere and with ZeRO-Offload; "
                          "or any transformers optimizer name."},
    )
    model_max_length: int = field(
        default=8192,
        metadata={"help": "Maximum sequence length; longer samples are truncated (counted in the data report)."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    packing: Literal["auto", "true", "false"] = field(
        default="auto",
        metadata={"help": "Padding-free packing of samples into token-budget micro-batches: auto (on when the "
                          "attention kernel skips other samples: flash-attention, or flex_attention on CUDA) | "
                          "true | false."},
    )
    max_tokens_per_batch: int = field(
        default=0,
        metadata={"help": "Token budget of a packed micro-batch per device (default: the planner picks the largest "
                          "that fits the GPU, up to 16384; without a known GPU per_device_train_batch_size x "
                          "model_max_length). It changes no number: a step holds the same samples however they are "
                          "cut into micro-batches."},
    )
    tokens_per_step: int = field(
        default=0,
        metadata={"help": "Cut optimizer steps by tokens instead of samples: about this many tokens (all processes) per "
                          "step, nanochat-style; samples per step then vary with their lengths. Default 0: every step "
                          "holds per_device_train_batch_size x gradient_accumulation_steps x processes samples."},
    )
    stage: Literal["sft", "dpo"] = field(
        default="sft",
        metadata={"help": "sft: imitate every trained assistant turn | dpo: preference optimization on pairs (a prompt "
                          "with a chosen and a rejected final answer), with the loss --pref_loss."},
    )
    pref_loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = field(
        default="sigmoid",
        metadata={"help": "--stage dpo: sigmoid (DPO) | ipo | simpo (reference-free, length-normalized) | orpo "
                          "(reference-free, odds ratio + SFT on chosen)."},
    )
    pref_beta: float | None = field(
        default=None,
        metadata={"help": "--stage dpo: beta, the reward scale (default 0.1; simpo 2.0). ORPO's weight is "
                          "--orpo_alpha."},
    )
    simpo_gamma: float = field(default=1.0, metadata={"help": "SimPO's target reward margin gamma (default 1.0)."})
    orpo_alpha: float = field(default=0.1, metadata={"help": "ORPO's weight of the odds-ratio term (lambda, 0.1)."})
    pref_sft_weight: float = field(
        default=0.0,
        metadata={"help": "--stage dpo: add this weight x the chosen answer's mean token NLL to every pair's loss."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "MoE models: weight of the routers' load-balancing loss added to the cross-entropy. Default: "
                          "the model config's router_aux_loss_coef where its class computes one (Qwen-MoE: 0.001), "
                          "else off. 0 turns it off."},
    )
    fused_ce: Literal["auto", "liger", "chunked", "none"] = field(
        default="auto",
        metadata={"help": "Loss without full-vocabulary logits: auto (Liger on CUDA, else chunked) | liger | "
                          "chunked | none (the model's own logits). Checked against the model's own loss on the "
                          "first micro-batch."},
    )
    compile_layers: bool = field(
        default=False,
        metadata={"help": "Compile each decoder layer with torch.compile (regional: one graph per layer kind, compiled "
                          "once; dynamic shapes). Opt-in until a GPU measurement shows it pays."},
    )
    liger_kernels: Literal["auto", "true", "false"] = field(
        default="auto",
        metadata={"help": "Liger's RMSNorm/SwiGLU/RoPE kernels: auto (on CUDA when liger-kernel is installed) | "
                          "true | false."},
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Stop after this many evaluations without a lower eval_loss (needs evaluation data: "
                          "--val_size or --eval_data_path); the best checkpoint is loaded at the end."},
    )
    estimate_memory: bool = field(
        default=False,
        metadata={"help": "Print the per-GPU memory and the time estimate for this run (config only, no weights; with "
                          "--data_path from the real lengths of the data) and exit."},
    )
    estimate_gpus: int = field(
        default=0, metadata={"help": "GPU count for --estimate_memory (default: the processes of this launch)."}
    )
    stop_on_save_error: bool = field(
        default=False,
        metadata={"help": "Stop when a checkpoint cannot be written (full disk, no permission). By default the error "
                          "is reported, the partial files removed, and training goes on; the next save tries again."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start fresh even when output_dir holds checkpoints (by default a re-run resumes)."},
    )

    def __post_init__(self) -> None:
        # Qwen's flag names (the wrappers pass --gradient_checkpointing True) are transformers' deprecated aliases:
        # given under the new names, so every run does not print a deprecation warning caused by our own defaults.
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new, None) is None and getattr(self, old, None) is not None:
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        # None where neither flag was given: the plan picks the recompute for the GPU
        self.recompute_requested = None if self.activation_checkpointing is None else bool(self.activation_checkpointing)
        self.optim_requested = str(getattr(self.optim, "value", self.optim))  # the plan decides what auto is
        if self.optim_requested == "auto":
            self.optim = "adamw_torch"  # a valid name for the parse; the Trainer gets the plan's
        if self.early_stopping_patience > 0:
            self.load_best_model_at_end = True  # stopping early keeps the best checkpoint, not the last one
            # the count of evaluations without improvement survives a resume (Trainer restores it only when asked)
            self.restore_callback_states_from_checkpoint = True
        save = str(getattr(self.save_strategy, "value", self.save_strategy))
        if self.load_best_model_at_end and save in ("steps", "epoch") and \
                str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
            # evaluate with every checkpoint, as Trainer requires for picking the best (validate checks for eval data)
            self.eval_strategy = save
            if save == "steps":
                self.eval_steps = self.save_steps
        super().__post_init__()

    @property
    def pairs(self) -> bool:
        """Whether the data is preference pairs (--stage dpo): every sample is a chosen and a rejected sequence."""
        return self.stage == "dpo"

    def micro_batch_tokens(self) -> int:
        """Tokens per device micro-batch: --max_tokens_per_batch, else the padded worst case (batch x max length, of
        preference pairs x 2)."""
        sequences = self.per_device_train_batch_size * (2 if self.pairs else 1)  # a pair: chosen and rejected
        return self.max_tokens_per_batch or sequences * self.model_max_length


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
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: 4-bit NF4 base (or a GPTQ int4 base) + LoRA."})
    lora_modules_to_save: str = field(
        default="auto",
        metadata={"help": "Modules trained in full next to LoRA: auto (input embeddings + output layer when the "
                          "template uses tokens the base model never learned) | none | comma-separated names."},
    )


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)

# Flags of Qwen's launch lines that transformers 5 renamed: old -> new. warmup_steps takes a ratio as a float < 1.
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}
# auto/true/false flags: the spellings people use for booleans (True, 1, yes, on) are accepted.
TRISTATE_FLAGS = ("--packing", "--liger_kernels")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def rename_flags(argv: list[str]) -> list[str]:
    """Map renamed flags to their new names (where the installed transformers no longer knows the old one), and the
    boolean spellings of auto/true/false flags to true/false."""
    import dataclasses

    known = {f"--{f.name}" for f in dataclasses.fields(transformers.TrainingArguments)}
    renames = {old: new for old, new in RENAMED_FLAGS.items() if old not in known}
    out: list[str] = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in renames:
            arg = renames[name] + eq + value
        if eq and name in TRISTATE_FLAGS:
            arg = name + "=" + _tristate(value)
        elif i > 0 and argv[i - 1] in TRISTATE_FLAGS:
            arg = _tristate(arg)
        out.append(arg)
    return out


def _tristate(value: str) -> str:
    v = value.strip().lower()
    return "true" if v in _TRUE else "false" if v in _FALSE else v


def _field_names() -> set[str]:
    import dataclasses

    return {f.name for cls in ALL_ARGUMENTS for f in dataclasses.fields(cls)}


def config_file_argv(path: str) -> list[str]:
    """A JSON/YAML file of flags as command-line arguments, so it goes through the same renames and checks as the
    command line, and flags after it override it."""
    import os

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path}: no such file")
    import yaml  # a dependency of transformers

    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path}: not valid JSON ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot be read ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping of flag names to values, "
                          f"got {type(values).__name__}")
    known = _field_names() | {old.lstrip("-") for old in RENAMED_FLAGS}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)} (see python finetune.py --help)")
    argv: list[str] = []
    choices = choices_by_flag()
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):  # YAML reads `no`, `off`, `yes`, `on` as booleans: an enumerated flag means the word
            flag = RENAMED_FLAGS.get(f"--{key}", f"--{key}")
            options = choices.get(flag) or _enum_values(flag)
            value = next((word for word in (_TRUE if value else _FALSE) if word in options), value)
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _enum_values(flag: str) -> tuple[str, ...]:
    """The values of a flag typed as an Enum (transformers' `eval_strategy: IntervalStrategy | str`), else ()."""
    import dataclasses
    import enum
    import typing

    for cls in ALL_ARGUMENTS:
        if flag[2:] in {f.name for f in dataclasses.fields(cls)}:
            hint = typing.get_type_hints(cls).get(flag[2:])
            for kind in (hint, *typing.get_args(hint)):
                if isinstance(kind, type) and issubclass(kind, enum.Enum):
                    return tuple(str(member.value) for member in kind)
    return ()


class _Parser(transformers.HfArgumentParser):
    """argparse errors as ConfigError (one line, no usage dump of 200 flags, no traceback)."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see python finetune.py --help)")


def choices_by_flag() -> dict[str, tuple[str, ...]]:
    """--flag -> its allowed values, for every enumerated flag (Literal types and `choices` metadata)."""
    import dataclasses
    import typing

    out = {}
    for cls in ALL_ARGUMENTS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints.get(f.name)
            if typing.get_origin(hint) is Literal:
                out[f"--{f.name}"] = tuple(str(a) for a in typing.get_args(hint))
            elif "choices" in f.metadata:
                out[f"--{f.name}"] = tuple(f.metadata["choices"])
    return out


def split_bad_choices(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without enumerated flags whose value is not a choice, one problem line per such flag)."""
    choices = choices_by_flag()
    kept: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in choices and (eq or i + 1 < len(argv)):
            value = value if eq else argv[i + 1]
            width = 1 if eq else 2
            if value not in choices[name]:
                problems.append(f"{name} {value!r}: choose one of {', '.join(choices[name])}")
            else:
                kept += argv[i:i + width]
            i += width
            continue
        kept.append(argv[i])
        i += 1
    return kept, problems


def deepspeed_file_problems(argv: list[str]) -> list[str]:
    """--deepspeed FILE that is missing or not JSON, named with its line and column (transformers parses it while the
    flags are parsed and says only "Expecting property name ...")."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name != "--deepspeed":
            continue
        path = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if not path or path.lstrip().startswith("{"):  # a JSON string, as transformers also takes
            return []
        if not os.path.isfile(path):
            return [f"--deepspeed {path}: no such file (the configs are in ds_configs/: zero2.json, zero3.json, "
                    "zero3_offload.json)"]
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            return [f"--deepspeed {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"]
        except (OSError, UnicodeDecodeError) as e:
            return [f"--deepspeed {path}: cannot be read ({e})"]
        if not isinstance(config, dict):
            return [f"--deepspeed {path}: expected a JSON object of DeepSpeed settings, got {type(config).__name__}"]
    return []


def parse_args(argv: list[str] | None = None):
    """Parse the command line (optionally a JSON/YAML config file first, then flags that override it) into (model,
    data, training, lora) arguments, then check them all (`chattune.train.validate`); every problem is reported at once."""
    from chattune.train.validate import validate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        argv = config_file_argv(argv[0]) + argv[1:]
    argv, problems = split_bad_choices(rename_flags(argv))
    problems += deepspeed_file_problems(argv)
    if problems and any(p.startswith("--deepspeed") for p in problems):
        raise ConfigError("\n".join(problems))  # transformers would parse it next, with a bare JSON message
    if "--estimate_memory" in argv and "--use_cpu" not in argv:
        import torch

        if not torch.cuda.is_available():  # planning on a machine without the GPUs: nothing trains here
            argv += ["--use_cpu", "True"]
    parser = _Parser(ALL_ARGUMENTS)
    try:
        model, data, training, lora, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as e:  # TrainingArguments.__post_init__ rejects inconsistent flags with a ValueError
        raise ConfigError("\n".join([*problems, str(e)])) from None
    if unknown:
        problems.append(f"unknown arguments: {' '.join(unknown)} (see python finetune.py --help)")
    validate(model, data, training, lora, problems)
    return model, data, training, lora
