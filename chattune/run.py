"""The training run, top to bottom: tokenizer -> data -> model -> train -> save."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch

from chattune.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments
from chattune.cli import log
from chattune.errors import ConfigError, UserError
from chattune.prepare import Prepared, format_preview
from chattune.stream import prepare_files
from chattune.template import TemplateSetup, bake_template_kwargs
from chattune.tokenizer import prepare_tokenizer


@dataclass
class Data:
    train: Prepared
    eval: Prepared | None


def build_data(tokenizer: Any, setup: TemplateSetup, data_args: DataArguments, max_length: int,
               main_process_first: Any = None, main: bool = True, seed: int = 42, output_dir: str | None = None,
               first: bool = True, overwrite: bool = False) -> Data:
    """Read, validate and tokenize the data in bounded memory (chattune.stream). In a distributed run the main process
    of each node prepares it first; the other ranks (`main` false) then memory-map its cache without opening the
    data files. With --val_size the training data is split first (chattune.split) and the held-out part is the
    evaluation data; the process that is `first` of the job copies it into `output_dir`."""
    if not data_args.data_path:
        raise ConfigError("--data_path is required (a JSON/JSONL/parquet file, several comma separated, or a folder)")
    from chattune.split import parse_val_size, publish, split_data

    val_size = parse_val_size(data_args.val_size)
    if val_size is not None:
        with main_process_first(desc="splitting data") if main_process_first else contextlib.nullcontext():
            split = split_data(data_args.data_path, val_size, seed, data_args.data_cache_dir,
                               data_args.skip_invalid_records, main=main)
        if first:
            if output_dir:
                publish(split, output_dir, overwrite)
            log(f"held out {split.held_out:,} of {split.conversations:,} conversations for evaluation (--val_size "
                f"{data_args.val_size}, seed {seed})" + (f"; written to {output_dir}/val.jsonl" if output_dir else "")
                + (f"; {split.copies_left_out:,} copies of held-out conversations left out of training"
                   if split.copies_left_out else ""))
        held = replace(data_args, data_path=str(split.train), eval_data_path=str(split.val), val_size="0",
                       skip_invalid_records=False)
        try:
            data = build_data(tokenizer, setup, held, max_length, main_process_first, main)
        except UserError as e:  # name the user's file and record, not the split's copy
            raise type(e)(split.original_place(str(e))) from None
        report = data.train.report
        report.files, report.skipped_records = split.files, split.skipped_records
        report.skipped_examples, report.ignored = split.skipped_examples, split.ignored
        data.eval.report.files = [f"held out of {', '.join(split.files)} ({split.ids.name})"]
        return data
    template_kwargs = data_args.parsed_template_kwargs()

    def prepare(path: str, what: str) -> Prepared:
        return prepare_files(
            path, tokenizer, stop_tokens=setup.stop_tokens, max_length=max_length, template_kwargs=template_kwargs,
            cache_dir=data_args.data_cache_dir, num_proc=data_args.preprocessing_num_workers,
            skip_invalid=data_args.skip_invalid_records, train_on=data_args.train_on,
            special_tokens_in_content=data_args.special_tokens_in_content, main=main, what=what,
        )

    # The evaluation data first: usually small, and its problems show before the long preparation of the training data.
    with main_process_first(desc="preparing data") if main_process_first else contextlib.nullcontext():
        evaluation = prepare(data_args.eval_data_path, "evaluation") if data_args.eval_data_path else None
        train = prepare(data_args.data_path, "training")
    return Data(train, evaluation)


def preview(tokenizer: Any, prepared: Prepared, n: int) -> None:
    color = sys.stderr.isatty()
    for i in range(min(n, len(prepared.dataset))):
        row = prepared.dataset[i]
        text = format_preview(tokenizer, row["input_ids"], row["labels"], color)
        log(f"--- sample {i} (trained part in ⟦ ⟧) ---\n{text}")


def dump_tokenized(prepared: Prepared, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in prepared.dataset.select_columns(["input_ids", "labels"]):
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    log(f"wrote {len(prepared.dataset)} tokenized samples to {path}")


def run_tokenizer(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
                  ) -> tuple[Any, TemplateSetup]:
    """The run's tokenizer and template. Every tokenizer the run saves (checkpoints, result; merged and GPTQ models
    copy it) renders, without being told, the prompt training used: --template_kwargs are baked into its chat
    template, and the data is tokenized with that template."""
    tokenizer, setup = prepare_tokenizer(model_args.model_name_or_path, data_args.template,
                                         cache_dir=training_args.cache_dir,
                                         trust_remote_code=model_args.trust_remote_code)
    tokenizer.chat_template = bake_template_kwargs(tokenizer.chat_template, data_args.parsed_template_kwargs())
    return tokenizer, setup


def memory_estimate(model_args: ModelArguments, training_args: TrainingArguments, lora_args: LoraArguments,
                    data_args: DataArguments | None = None) -> str:
    """--estimate_memory: the per-GPU memory and the time, from the config alone; with --data_path from the real
    lengths of the tokenized data too (prepared and cached as training would)."""
    from transformers import AutoConfig

    from chattune.collate import sample_lengths
    from chattune.memory import data_plan, format_estimate, format_time, run_setup, shape_from_config
    from chattune.model import mode_of

    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir,
                                            trust_remote_code=model_args.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"cannot read the config of {model_args.model_name_or_path!r}: {e}") from None
    setup = run_setup(training_args, lora_args, mode_of(training_args, lora_args),
                      training_args.estimate_gpus or training_args.world_size)
    shape = shape_from_config(config, trust_remote_code=model_args.trust_remote_code)
    plan = None
    if data_args is not None and data_args.data_path:
        # prepared as training prepares it (baked template, --val_size split): training reuses the cache entry
        tokenizer, template = run_tokenizer(model_args, data_args, training_args)
        train = build_data(tokenizer, template, replace(data_args, eval_data_path=None),
                           training_args.model_max_length, seed=training_args.seed).train
        log(train.report.format())
        lengths = sample_lengths(train.dataset)  # collate's reader: what training packs
        packing, budget = training_args.packing != "false", training_args.micro_batch_tokens()
        if packing and lengths and max(lengths) > budget:
            raise ConfigError(f"--max_tokens_per_batch {budget} is below the longest sample ({max(lengths)} tokens): "
                              "it would fit no micro-batch; raise it to at least --model_max_length")
        # auto packs on a CUDA run (flash-attention or flex_attention); only --packing false pads
        plan = data_plan(lengths, training_args.per_device_train_batch_size, budget, packing=packing,
                         seed=training_args.seed)
        setup = replace(setup, micro_batch_tokens=plan.peak_micro_batch_tokens)
    epochs = training_args.num_train_epochs
    if plan is not None and training_args.max_steps > 0:
        per_step = training_args.gradient_accumulation_steps * setup.gpus
        epochs = training_args.max_steps * per_step / max(plan.micro_batches, 1)
    return "\n".join([format_estimate(shape, setup, model_args.model_name_or_path),
                      format_time(shape, setup, plan, epochs)])


def model_config_and_attention(model_args: ModelArguments, training_args: TrainingArguments) -> tuple[Any, Any]:
    """The model's config (no weights) and the attention/packing decision its class allows: errors come before any
    data is tokenized."""
    from transformers import AutoConfig

    from chattune.model import choose_attention, compute_dtype, flash_attn_problem, model_class

    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir,
                                            trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the config of {model_args.model_name_or_path!r}: {e}") from None
    cuda = torch.cuda.is_available() and not training_args.use_cpu
    attention = choose_attention(
        model_args.attn_implementation, training_args.packing, model_class(config, model_args.trust_remote_code),
        cuda=cuda, flash_problem=flash_attn_problem(compute_dtype(training_args)) if cuda else "no CUDA GPU",
    )
    return config, attention


def run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
        lora_args: LoraArguments) -> Any:
    """Run the job; returns the Trainer after training (None for --dump_tokenized / --estimate_memory)."""
    if training_args.estimate_memory:
        print(memory_estimate(model_args, training_args, lora_args, data_args))
        return None
    tokenizer, setup = run_tokenizer(model_args, data_args, training_args)
    config, attention = (None, None) if data_args.dump_tokenized else model_config_and_attention(model_args,
                                                                                                 training_args)
    data = build_data(tokenizer, setup, data_args, training_args.model_max_length,
                      main_process_first=training_args.main_process_first,
                      main=training_args.local_process_index == 0, seed=training_args.seed,
                      output_dir=training_args.output_dir, first=training_args.process_index == 0,
                      overwrite=training_args.overwrite_output_dir)
    if training_args.process_index == 0:
        log(data.train.report.format())
        if data.eval is not None:
            log("eval " + data.eval.report.format())
        preview(tokenizer, data.train, data_args.preview_data)
    if data_args.dump_tokenized:
        if training_args.process_index == 0:
            dump_tokenized(data.train, data_args.dump_tokenized)
        return None
    from chattune.train import train_and_save

    return train_and_save(model_args, data_args, training_args, lora_args, tokenizer, setup, data, config, attention)
