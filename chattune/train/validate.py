"""One pass over the parsed flags, before any data or weights are read: every problem collected, raised once."""

from __future__ import annotations

import os
from typing import Any

import torch

from chattune.errors import ConfigError


def validate(model_args: Any, data_args: Any, training_args: Any, lora_args: Any, problems: list[str] | None = None
             ) -> None:
    """Raise one ConfigError listing every problem with the flags (plus `problems` found while parsing)."""
    from chattune.hub import model_source_problem
    from chattune.train.hf import surface_problems

    problems = list(problems or []) + [f"this transformers ({_version('transformers')}) cannot run chattune: {p}"
                                        for p in surface_problems(("transformers",))]
    source = model_source_problem(model_args.model_name_or_path, cache_dir=training_args.cache_dir)
    problems += [source] if source else []
    if training_args.estimate_memory:  # reads only the model config: data and runtime do not matter
        _raise(problems)
        return
    problems += _data_problems(data_args)
    problems += _mode_problems(training_args, lora_args)
    problems += _kernel_problems(model_args, training_args)
    problems += _build_lock_problems(training_args)
    problems += _deepspeed_config_problems(training_args)
    problems += hf_cache_problems()
    problems += _batch_problems(data_args, training_args)
    problems += _preference_problems(data_args, training_args)
    problems += _continued_adapter_problems(training_args, lora_args)
    problems += _number_problems(training_args, lora_args)
    if not data_args.dump_tokenized:
        problems += _output_problems(training_args.output_dir)
    _raise(problems)


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems with the arguments:\n" + "\n".join(f"  {p}" for p in problems))


def _path_problems(flag: str, value: str) -> list[str]:
    """What the data reader would refuse about the paths themselves (missing, a link loop, given twice, a directory
    without data files), said now, before the model is read."""
    from chattune.data.sources import expand_sources

    return [f"{flag} {problem}" for problem in expand_sources(value).problems]


def _dump_problems(path: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return [f"--dump_tokenized {path}: is a directory; give the path of a file to write (e.g. {path}/tokens.jsonl)"]
    if not os.path.isdir(folder):
        return [f"--dump_tokenized {path}: its directory {folder} does not exist; create it first"]
    if not os.access(folder, os.W_OK):
        return [f"--dump_tokenized {path}: its directory {folder} cannot be written"]
    return []


def _data_problems(data_args: Any) -> list[str]:
    problems = []
    if not data_args.data_path:
        problems.append("--data_path is required (a JSON/JSONL/parquet file, several comma separated, or a folder)")
    else:
        problems += _path_problems("--data_path", data_args.data_path)
    if data_args.eval_data_path:
        problems += _path_problems("--eval_data_path", data_args.eval_data_path)
    if data_args.dump_tokenized:
        problems += _dump_problems(data_args.dump_tokenized)
    try:
        data_args.parsed_template_kwargs()
    except ConfigError as e:
        problems.append(str(e))
    if data_args.preview_data < 0:
        problems.append(f"--preview_data {data_args.preview_data}: use 0 (no preview) or more")
    return problems


def _mode_problems(training_args: Any, lora_args: Any) -> list[str]:
    problems = []
    if lora_args.q_lora and not training_args.use_lora:
        problems.append("--q_lora trains a LoRA adapter on a 4-bit base: add --use_lora (as Qwen's script needs)")
    if lora_args.q_lora and not training_args.use_cpu and not torch.cuda.is_available():
        problems.append("--q_lora needs a CUDA GPU (or --use_cpu True for a slow CPU run)")
    if training_args.use_lora:
        if lora_args.lora_r < 1:
            problems.append(f"--lora_r {lora_args.lora_r}: the LoRA rank must be at least 1 (Qwen uses 64)")
        if not 0 <= lora_args.lora_dropout < 1:
            problems.append(f"--lora_dropout {lora_args.lora_dropout}: use a value in [0, 1)")
    if lora_args.lora_weight_path and not os.path.isdir(lora_args.lora_weight_path):
        problems.append(f"--lora_weight_path {lora_args.lora_weight_path}: no such adapter directory")
    if getattr(training_args, "n_gpu", 1) > 1:
        problems.append(f"{training_args.n_gpu} GPUs are visible to a single process (torch DataParallel, slow and "
                        "not supported): launch one process per GPU (bash finetune/finetune_lora_ds.sh, or torchrun "
                        "--nproc_per_node N), or pick one GPU with CUDA_VISIBLE_DEVICES=0")
    return problems


def _kernel_problems(model_args: Any, training_args: Any) -> list[str]:
    from chattune.train.architecture import compute_dtype, flash_attn_problem
    from chattune.train.loss import liger_runs_here

    problems = []
    if training_args.fused_ce == "liger":
        why = liger_runs_here()
        if training_args.pairs:  # the plan says so too; here before anything loads
            problems.append("--fused_ce liger: preference losses need every sequence's log-prob, and Liger's fused "
                            "kernel gives one sum; use --fused_ce auto or chunked")
        elif why:
            problems.append(f"--fused_ce liger: {why}; use --fused_ce auto or chunked")
    if training_args.liger_kernels == "true" and (liger_runs_here() or not torch.cuda.is_available()):
        problems.append("--liger_kernels true needs liger-kernel on a CUDA GPU (pip install liger-kernel)")
    if model_args.attn_implementation.startswith("flash_attention"):
        why = flash_attn_problem(compute_dtype(training_args))
        if why:
            problems.append(f"--attn_implementation {model_args.attn_implementation}: {why}")
    return problems


# DeepSpeed settings the trainer fills from its own flags (and the plan's batch): a fixed value that differs fails
# at trainer start with a traceback. "auto" lets the flags decide.
_FILLED_BY_FLAGS = (("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                    ("gradient_clipping", "max_grad_norm"))


def _deepspeed_config_problems(training_args: Any) -> list[str]:
    """A DeepSpeed config that contradicts itself or the flags, found now instead of at trainer start."""
    import json

    path = training_args.deepspeed
    if not isinstance(path, str) or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    problems = []
    enabled = [k for k in ("bf16", "fp16") if isinstance(config.get(k), dict) and config[k].get("enabled") is True]
    if len(enabled) == 2:
        problems.append(f"--deepspeed {path}: enables both bf16 and fp16; set one (or both to \"auto\", which follows "
                        "--bf16/--fp16)")
    for key, flag in _FILLED_BY_FLAGS:
        value, ours = config.get(key), getattr(training_args, flag)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != ours:
            problems.append(f"--deepspeed {path}: {key} is {value}, --{flag} is {ours}: set it to \"auto\" (the "
                            "flag and chattune's plan decide it), or give the flag the same value")
    return problems


def hf_cache_problems() -> list[str]:
    """The Hugging Face cache folders must exist or be creatable: the libraries create them on import even when the
    model is a local directory (GPTQModel's tokenicer, imported by peft while it wraps the layers, makes HF_HOME and
    its subfolders), and fail with a traceback mid-run where they cannot."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    folders = {"HF_HOME": home,
               "HF_HUB_CACHE": os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"),
               "HF_MODULES_CACHE": os.environ.get("HF_MODULES_CACHE") or os.path.join(home, "modules")}
    problems = []
    for variable, folder in folders.items():
        if os.path.isdir(folder):
            continue
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            problems.append(f"{variable} {folder}: cannot be created ({e.strerror}); the Hugging Face libraries write "
                            f"there even for a local model: set {variable} (or HF_HOME) to a writable directory")
            break  # the others are under it, as a rule: one line
    return problems


def _build_lock_problems(training_args: Any) -> list[str]:
    """A DeepSpeed op build killed midway leaves a lock every later build waits on forever: say so now."""
    if not training_args.deepspeed:
        return []
    from chattune.launch import stale_build_locks

    return [f"--deepspeed: {lock} is the lock of an op build that was killed (no process is building there); every "
            f"DeepSpeed run would wait on it forever. Remove it (rm {lock}) and run again"
            for lock in stale_build_locks()]


def _batch_problems(data_args: Any, training_args: Any) -> list[str]:
    problems = []
    if training_args.model_max_length < 2:
        problems.append(f"--model_max_length {training_args.model_max_length}: too short to hold a prompt and answer")
    budget = training_args.max_tokens_per_batch
    if training_args.packing == "true" and budget and budget < training_args.model_max_length:
        problems.append(f"--max_tokens_per_batch {budget} is below --model_max_length {training_args.model_max_length}:"
                        " the longest samples would fit no micro-batch")
    elif training_args.packing == "true" and budget and training_args.pairs and \
            budget < 2 * training_args.model_max_length:
        problems.append(f"--max_tokens_per_batch {budget} is below twice --model_max_length "
                        f"{training_args.model_max_length}: the longest preference pairs (two sequences) would fit no "
                        "micro-batch")
    from chattune.data.split import parse_val_size

    try:
        val_size = parse_val_size(data_args.val_size)
    except ConfigError as e:
        problems.append(str(e))
        val_size = None
    if val_size is not None and data_args.eval_data_path:
        problems.append(f"--val_size {data_args.val_size} and --eval_data_path both give evaluation data: use one")
    has_eval = bool(data_args.eval_data_path) or val_size is not None
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no" and not has_eval:
        problems.append(f"--eval_strategy {strategy}: add --val_size or --eval_data_path (the data to evaluate on)")
    for flag, given in (("--load_best_model_at_end", training_args.load_best_model_at_end),
                        (f"--early_stopping_patience {training_args.early_stopping_patience}",
                         training_args.early_stopping_patience > 0)):
        if given and not has_eval:
            problems.append(f"{flag}: needs evaluation data; add --val_size 0.05 (or --eval_data_path)")
        save = str(getattr(training_args.save_strategy, "value", training_args.save_strategy))
        implied = flag == "--load_best_model_at_end" and training_args.early_stopping_patience > 0
        if given and not implied and save not in ("steps", "epoch"):
            why = "writes no checkpoint to pick from" if save == "no" else "is not supported with it"
            problems.append(f"{flag}: the best model is picked among the checkpoints, and --save_strategy {save} "
                            f"{why}; use --save_strategy steps (the default) or epoch")
    if training_args.early_stopping_patience < 0:
        problems.append(f"--early_stopping_patience {training_args.early_stopping_patience}: give 0 (off) or more")
    return problems


def _preference_problems(data_args: Any, training_args: Any) -> list[str]:
    """Preference flags without --stage dpo (they would be ignored), and numbers outside their range."""
    t = training_args
    given = [flag for flag, value, default in (
        ("--pref_loss", t.pref_loss, "sigmoid"), ("--pref_beta", t.pref_beta, None), ("--simpo_gamma", t.simpo_gamma, 1.0),
        ("--orpo_alpha", t.orpo_alpha, 0.1), ("--pref_sft_weight", t.pref_sft_weight, 0.0)) if value != default]
    if t.stage != "dpo":
        return [f"{flag} applies to preference training only: add --stage dpo (with pairs as data)" for flag in given]
    problems = []
    if t.pref_beta is not None and not t.pref_beta > 0:
        problems.append(f"--pref_beta {t.pref_beta}: beta must be above 0 (DPO uses 0.1)")
    for flag, value in (("--simpo_gamma", t.simpo_gamma), ("--orpo_alpha", t.orpo_alpha),
                        ("--pref_sft_weight", t.pref_sft_weight)):
        if not value >= 0:
            problems.append(f"{flag} {value}: give 0 or more")
    wrong = {"--simpo_gamma": "simpo", "--orpo_alpha": "orpo"}
    problems += [f"{flag} applies to --pref_loss {loss} only (this run uses {t.pref_loss})"
                 for flag, loss in wrong.items() if flag in given and t.pref_loss != loss]
    if t.pref_beta is not None and t.pref_loss == "orpo":
        problems.append("--pref_beta: ORPO has no beta; its odds-ratio weight is --orpo_alpha")
    if data_args.train_on != "all":
        problems.append(f"--train_on {data_args.train_on}: a preference pair compares its final answers only; leave "
                        "--train_on out with --stage dpo")
    return problems


def _continued_adapter_problems(training_args: Any, lora_args: Any) -> list[str]:
    """DPO/IPO continuing an adapter (an SFT one): its reference would be the base with the adapter disabled, not
    the model the preference training starts from."""
    if training_args.stage != "dpo" or not lora_args.lora_weight_path or training_args.pref_loss in ("simpo", "orpo"):
        return []
    return [f"--lora_weight_path with --stage dpo --pref_loss {training_args.pref_loss}: the reference would be the "
            "base without that adapter, not the model preference training starts from. Merge the adapter first "
            "(python merge_lora.py --adapter_path ADAPTER --output_path MERGED) and train on the merged model, or use "
            "a reference-free loss (--pref_loss simpo or orpo)"]


def _number_problems(training_args: Any, lora_args: Any) -> list[str]:
    """Numbers out of their range, named before anything loads (torch, numpy and the trainer would raise a
    traceback deep inside, or train nothing and save it as the result)."""
    t = training_args
    checks = [
        ("--learning_rate", t.learning_rate, t.learning_rate > 0, "give a positive rate, e.g. 2e-4 (LoRA) or 1e-5"),
        ("--per_device_train_batch_size", t.per_device_train_batch_size, t.per_device_train_batch_size >= 1,
         "give 1 or more"),
        ("--per_device_eval_batch_size", t.per_device_eval_batch_size, t.per_device_eval_batch_size >= 1,
         "give 1 or more"),
        ("--gradient_accumulation_steps", t.gradient_accumulation_steps, t.gradient_accumulation_steps >= 1,
         "give 1 or more"),
        ("--seed", t.seed, 0 <= t.seed < 2**32, "give a whole number from 0 to 4294967295"),
        ("--weight_decay", t.weight_decay, t.weight_decay >= 0, "give 0 (off) or more"),
        ("--max_grad_norm", t.max_grad_norm, t.max_grad_norm is None or t.max_grad_norm >= 0,
         "give 0 (no clipping) or more"),
        ("--warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "give steps (>= 1) or a ratio of the run (< 1)"),
        ("--save_steps", t.save_steps, t.save_steps > 0, "give steps (>= 1) or a ratio of the run (< 1)"),
        ("--eval_steps", t.eval_steps, t.eval_steps is None or t.eval_steps > 0,
         "give steps (>= 1) or a ratio of the run (< 1)"),
        ("--logging_steps", t.logging_steps, t.logging_steps > 0, "give steps (>= 1) or a ratio of the run (< 1)"),
        ("--save_total_limit", t.save_total_limit, t.save_total_limit is None or t.save_total_limit >= 1,
         "give 1 or more (omit it to keep every checkpoint)"),
    ]
    if t.max_steps <= 0:  # the run's length is counted in epochs
        checks.append(("--num_train_epochs", t.num_train_epochs, t.num_train_epochs > 0,
                       "nothing would be trained and the base model saved as the result; give 1 or more (or "
                       "--max_steps)"))
    if training_args.use_lora:
        checks += [("--lora_alpha", lora_args.lora_alpha, lora_args.lora_alpha > 0, "give a positive scale, e.g. 32")]
    return [f"{flag} {value:g}: {fix}" if isinstance(value, float) else f"{flag} {value}: {fix}"
            for flag, value, ok, fix in checks if not ok]


def _output_problems(output_dir: str) -> list[str]:
    """--output_dir must be a directory this process can write, checked now rather than after training."""
    import tempfile

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return [f"--output_dir {output_dir}: is a file, not a directory; choose a directory"]
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".chattune-write-test-"):
            pass
    except OSError as e:
        return [f"--output_dir {output_dir}: cannot be written ({e.strerror or e}); choose a directory you can "
                "write, or fix its permissions"]
    return []
