"""What a training run reads before any weight loads: the tokenizer with its template, the data (split, prepared,
cached), the model's class, and --estimate_memory, which needs nothing more."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from chattune.cli import log
from chattune.data.chat_templates import TemplateSetup, bake_template_kwargs
from chattune.data.prepare import Prepared, prepare_files
from chattune.data.report import format_preview
from chattune.data.tokenizer import prepare_tokenizer
from chattune.errors import ConfigError, UserError
from chattune.train.architecture import ModelClass, mode_of, model_class
from chattune.train.args import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainingArguments,
)
from chattune.train.batches import pair_lengths, sample_lengths
from chattune.train.memory import (
    ModelShape,
    format_estimate,
    recompute_asked,
    run_setup,
    shape_from_config,
)
from chattune.train.plan import Decision, plan_batch
from chattune.train.timing import format_time


@dataclass
class Data:
    train: Prepared
    eval: Prepared | None


def build_data(tokenizer: Any, setup: TemplateSetup, data_args: DataArguments, max_length: int,
               main_process_first: Any = None, main: bool = True, seed: int = 42, output_dir: str | None = None,
               first: bool = True, overwrite: bool = False, pairs: bool = False) -> Data:
    """Read, validate and tokenize the data in bounded memory (chattune.data.prepare). In a distributed run the main process
    of each node prepares it first; the other ranks (`main` false) then memory-map its cache without opening the
    data files. With --val_size the training data is split first (chattune.data.split) and the held-out part is the
    evaluation data; the process that is `first` of the job copies it into `output_dir`."""
    if not data_args.data_path:
        raise ConfigError("--data_path is required (a JSON/JSONL/parquet file, several comma separated, or a folder)")
    from chattune.data.split import parse_val_size, publish, split_data

    val_size = parse_val_size(data_args.val_size)
    if val_size is not None:
        with main_process_first(desc="splitting data") if main_process_first else contextlib.nullcontext():
            split = split_data(data_args.data_path, val_size, seed, data_args.data_cache_dir,
                               data_args.skip_invalid_records, main=main, pairs=pairs)
        if first:
            if output_dir:
                publish(split, output_dir, overwrite)
            unit = "preference pairs" if pairs else "conversations"
            log(f"held out {split.held_out:,} of {split.conversations:,} {unit} for evaluation (--val_size "
                f"{data_args.val_size}, seed {seed})" + (f"; written to {output_dir}/val.jsonl" if output_dir else "")
                + (f"; {split.copies_left_out:,} copies of held-out {unit} left out of training"
                   if split.copies_left_out else ""))
        held = replace(data_args, data_path=str(split.train), eval_data_path=str(split.val), val_size="0",
                       skip_invalid_records=False)
        try:
            data = build_data(tokenizer, setup, held, max_length, main_process_first, main, pairs=pairs)
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
            special_tokens_in_content=data_args.special_tokens_in_content, main=main, what=what, pairs=pairs,
        )

    # The evaluation data first: usually small, and its problems show before the long preparation of the training data.
    with main_process_first(desc="preparing data") if main_process_first else contextlib.nullcontext():
        evaluation = prepare(data_args.eval_data_path, "evaluation") if data_args.eval_data_path else None
        train = prepare(data_args.data_path, "training")
    return Data(train, evaluation)


def preview(tokenizer: Any, prepared: Prepared, n: int) -> None:
    """The first `n` samples with their trained part marked; of preference data the first `n` pairs, both sides."""
    color = sys.stderr.isatty()
    pairs = bool(prepared.report.pairs)
    for i in range(min(n * (2 if pairs else 1), len(prepared.dataset))):
        row = prepared.dataset[i]
        text = format_preview(tokenizer, row["input_ids"], row["labels"], color)
        name = f"pair {i // 2}, {'rejected' if i % 2 else 'chosen'}" if pairs else f"sample {i}"
        log(f"--- {name} (trained part in ⟦ ⟧) ---\n{text}")


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


def read_model(model_args: ModelArguments, training_args: TrainingArguments) -> tuple[Any, ModelClass]:
    """The model's config and what its class declares (no weights): problems show before any data is tokenized."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir,
                                            trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the config of {model_args.model_name_or_path!r}: {e}") from None
    return config, model_class(config, model_args.trust_remote_code)


def model_shape(config: Any, trust_remote_code: bool) -> ModelShape | None:
    """Parameter counts by kind for the planner; None for an architecture that cannot be built on the meta device."""
    try:
        return shape_from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - no estimate for this architecture, never a failed run
        return None


def memory_estimate(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                    lora_args: LoraArguments) -> str:
    """--estimate_memory: the per-GPU memory and the time, from the config alone; with --data_path from the real
    lengths of the tokenized data too (prepared and cached as training would, batched as the plan batches them:
    packed on a CUDA run unless --packing false)."""
    config, cls = read_model(model_args, training_args)
    gpus = training_args.estimate_gpus or training_args.world_size
    setup = run_setup(training_args, lora_args, mode_of(training_args, lora_args), gpus)
    if model_args.experts_implementation not in ("auto", "nf4"):  # named under --q_lora: the experts stay in bf16
        setup = replace(setup, nf4_experts=False)
    shape = shape_from_config(config, trust_remote_code=model_args.trust_remote_code)
    summary, epochs = None, training_args.num_train_epochs
    if data_args.data_path:
        tokenizer, template = run_tokenizer(model_args, data_args, training_args)
        train = build_data(tokenizer, template, replace(data_args, eval_data_path=None),
                           training_args.model_max_length, seed=training_args.seed, pairs=training_args.pairs).train
        log(train.report.format())
        lengths = np.asarray(sample_lengths(train.dataset), dtype=np.int64)
        lengths = pair_lengths(lengths) if training_args.pairs else lengths  # a pair computes both its sides
        packing = training_args.packing != "false"
        budget = training_args.micro_batch_tokens() if packing else 0
        batch = plan_batch(training_args, lengths, gpus, Decision("packed" if packing else "padded", ""), budget)
        summary = batch.data_summary(lengths)
        setup = replace(setup, micro_batch_tokens=batch.peak_micro_batch_tokens)
        epochs = batch.epochs
    planned = recompute_asked(training_args) is None
    return "\n".join([format_estimate(shape, setup, model_args.model_name_or_path, planned_recompute=planned),
                      format_time(shape, setup, summary, epochs)])
