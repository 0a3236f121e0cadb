"""A training run, top to bottom: tokenizer -> data -> plan -> model -> trainer -> train -> save -> report.

`run` lists the stages; each stage is a function that takes what the earlier ones produced. Every decision is made
once, in the plan (chattune.train.plan); the stages carry it out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from typing import Any

import torch
import transformers
from transformers import EarlyStoppingCallback

from chattune.cli import log
from chattune.errors import ConfigError
from chattune.train import checkpoints, experts4bit
from chattune.train.args import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainingArguments,
)
from chattune.train.batches import StepSampler, pair_lengths, sample_lengths
from chattune.train.callbacks import (
    CheckpointFilesCallback,
    EpochCallback,
    LastStepLogCallback,
    LossPlotCallback,
    PreemptionCallback,
    ThroughputCallback,
)
from chattune.train.hf import apply_liger_kernel_to_instance
from chattune.train.inputs import (
    Data,
    build_data,
    dump_tokenized,
    memory_estimate,
    model_shape,
    preview,
    read_model,
    run_tokenizer,
)
from chattune.train.layout import base_fingerprint
from chattune.train.lora import adapter_summary, apply_lora, resolve_modules_to_save
from chattune.train.loss import logit_transform
from chattune.train.model import (
    compile_decoder_layers,
    count_parameters,
    load_model,
    resize_for_new_tokens,
)
from chattune.train.plan import (
    Hardware,
    OutputDir,
    Plan,
    check_model_flags,
    make_plan,
    trainer_arguments,
)
from chattune.train.pref_trainer import PreferenceTrainer, turn_off_dropout
from chattune.train.preference import PrefLoss
from chattune.train.report import format_done, run_report
from chattune.train.save import (
    finish_distributed,
    save_final,
    set_trained_stops,
    stop_preempted,
    write_run_files,
)
from chattune.train.signals import RunSignals
from chattune.train.trainer import ChatTrainer, Diverged, LossSetup, padding_collator


def run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
        lora_args: LoraArguments) -> Any:
    """Run the job; returns the Trainer after training (None for --dump_tokenized / --estimate_memory)."""
    if training_args.estimate_memory:
        print(memory_estimate(model_args, data_args, training_args, lora_args))
        return None
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(RunSignals())
        if not data_args.dump_tokenized and training_args.process_index == 0:
            stack.enter_context(checkpoints.owned(training_args.output_dir))  # one run at a time writes there
        return _run(model_args, data_args, training_args, lora_args, signals)


def _run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
         lora_args: LoraArguments, signals: RunSignals) -> Any:
    tokenizer, template = run_tokenizer(model_args, data_args, training_args)
    hardware = Hardware.here(training_args)
    if not data_args.dump_tokenized:
        config, cls = read_model(model_args, training_args)
        check_model_flags(model_args, training_args, lora_args, cls, hardware)
    data = build_data(tokenizer, template, data_args, training_args.model_max_length,
                      main_process_first=training_args.main_process_first,
                      main=training_args.local_process_index == 0, seed=training_args.seed,
                      output_dir=training_args.output_dir, first=training_args.process_index == 0,
                      overwrite=training_args.overwrite_output_dir, pairs=training_args.pairs)
    show_data(data, tokenizer, data_args.preview_data, training_args.process_index == 0)
    if data_args.dump_tokenized:
        if training_args.process_index == 0:
            dump_tokenized(data.train, data_args.dump_tokenized)
        return None
    plan = make_plan(model_args, data_args, training_args, lora_args, cls, train_lengths(data, training_args),
                     hardware, read_output_dir(training_args), has_eval=data.eval is not None,
                     transform=logit_transform(config), shape=model_shape(config, model_args.trust_remote_code))
    tidy_output_dir(plan, training_args)
    fingerprint = base_fingerprint(plan.model)
    if plan.resume.source:
        problem = checkpoints.resume_problem(plan.resume.source, plan.mode, plan.model, fingerprint)
        if problem:
            raise ConfigError(problem)
    transformers.set_seed(training_args.seed)  # before the adapter is created: its init must follow --seed
    model, adapted = build_model(model_args, training_args, lora_args, plan, tokenizer, template, data, config)
    reference = reference_model(model, plan, training_args,
                                lambda: build_reference(model_args, training_args, lora_args, plan, tokenizer, config))
    plan = plan.with_model(**adapted)
    trainer, clock, preemption = build_trainer(model, plan, training_args, tokenizer, data, template, data_args,
                                               reference)
    trainer.base_fingerprint = fingerprint
    if training_args.process_index == 0:
        log(plan.format())
    train(trainer, plan, preemption, signals)
    expert_load = trainer.expert_load_report()  # every rank: summed over them
    if plan.schedule.evaluate_after_training:
        trainer.evaluate()
    save_final(trainer, tokenizer, template, data_args, training_args, plan)
    if trainer.is_world_process_zero():
        write_report(trainer, clock, plan, data, training_args.output_dir, expert_load)
        if signals.received:
            log(f"{signal.Signals(signals.received).name} arrived after the last step: the finished result is saved")
    finish_distributed()
    return trainer


# --------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------


def train_lengths(data: Data, training_args: TrainingArguments) -> Any:
    """What the steps are cut from: the training samples' lengths, or of preference pairs both sides' together."""
    lengths = sample_lengths(data.train.dataset)
    return pair_lengths(lengths) if training_args.pairs else lengths


def reference_model(model: Any, plan: Plan, training_args: TrainingArguments, load: Any) -> Any:
    """Full fine-tuning with a loss that compares against a reference: a frozen copy of the base, in the compute
    dtype, taken before any training (a resumed run loads its checkpoint into the policy only); under ZeRO-3 loaded
    again (`load`), partitioned like the policy. None otherwise: a LoRA run's reference is its base with the adapter
    disabled."""
    if plan.objective is None or plan.mode != "full" or plan.objective.why.startswith("none"):
        return None
    import copy

    from transformers.integrations import is_deepspeed_zero3_enabled

    from chattune.train.architecture import compute_dtype

    if is_deepspeed_zero3_enabled():  # a partitioned model cannot be copied; the engine places it (PreferenceTrainer)
        return load().requires_grad_(False).eval()
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    return reference.to(device=training_args.device, dtype=compute_dtype(training_args))


def build_reference(model_args, training_args, lora_args, plan: Plan, tokenizer, config: Any) -> Any:
    """The base loaded again as the policy was (the same seed before it: new token rows start the same)."""
    transformers.set_seed(training_args.seed)
    reference = load_model(model_args, training_args, lora_args, config, plan)
    resize_for_new_tokens(reference, tokenizer)
    return reference


def show_data(data: Data, tokenizer: Any, samples: int, main: bool) -> None:
    if main:
        log(data.train.report.format())
        if data.eval is not None:
            log("eval " + data.eval.report.format())
        preview(tokenizer, data.train, samples)


def read_output_dir(training_args: TrainingArguments) -> OutputDir:
    """What the output directory holds, read by every rank before the main process tidies it (so every rank plans
    the same resume)."""
    output = OutputDir.read(training_args.output_dir)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return output


def tidy_output_dir(plan: Plan, training_args: TrainingArguments) -> None:
    """What the plan's resume says to remove and to set aside: done by the main process, the others wait."""
    with training_args.main_process_first(local=False, desc="checking checkpoints"):
        if training_args.process_index == 0:
            tidy(plan.resume, log)


def tidy(resume: Any, say: Any) -> None:
    """Remove an unfinished save (with --overwrite_output_dir also the old run's checkpoints) and rename incomplete
    checkpoints to broken_checkpoint-N (never deleted), saying what and why."""
    for path in resume.remove:
        shutil.rmtree(path, ignore_errors=True)
        say(f"removed {path}" + (": an unfinished checkpoint save of an earlier run (stopped while saving)"
                                 if path.endswith(checkpoints.STAGING) else " (--overwrite_output_dir)"))
    for path, why in resume.set_aside:
        moved = checkpoints.move_aside(path)
        say(f"WARNING: {path} is incomplete ({why}): moved to {moved}; resuming from the checkpoint before it")


def build_model(model_args, training_args, lora_args, plan: Plan, tokenizer, template, data: Data, config: Any
                ) -> tuple[Any, dict[str, Any]]:
    """The model as the plan says: loaded, Liger's kernels patched in, embeddings grown for new tokens, the adapter
    on it. Returns it with what the plan reports about it."""
    model = load_model(model_args, training_args, lora_args, config, plan)
    if training_args.liger_kernels != "false":
        apply_liger_kernels(model, required=training_args.liger_kernels == "true")
    grown = resize_for_new_tokens(model, tokenizer)
    if grown:
        log(f"embeddings grown by {grown} rows for the template's new tokens {', '.join(template.added_tokens)}")
    adapted: dict[str, Any] = {}
    if training_args.use_lora:
        modules, why = resolve_modules_to_save(lora_args.lora_modules_to_save, model, tokenizer,
                                               template.added_tokens, control_tokens_in_use(tokenizer, data.train))
        adapted.update(modules_to_save=modules, modules_to_save_reason=why)
        model = apply_lora(model, training_args, lora_args, modules, recompute=plan.recompute.every > 0)
        adapted["adapters"] = adapter_summary(model)
    if plan.experts is not None and plan.experts.choice == experts4bit.IMPLEMENTATION:
        experts4bit.finish(model)  # after the adapter: it found the 4-bit stacks by their placeholders
    if plan.objective is not None and turn_off_dropout(model):
        log("dropout off (--stage dpo): the chosen and rejected log-probs, and the policy's against the reference's, "
            "come from the same function")
    adapted["trainable_params"], adapted["total_params"] = count_parameters(model)
    if training_args.compile_layers:
        log(f"torch.compile: {compile_decoder_layers(model)} decoder layers (compiled on first use)")
    return model, adapted


def control_tokens_in_use(tokenizer: Any, prepared: Any) -> list[str]:
    """Special tokens the rendered template actually uses (looked up in the first samples)."""
    special, used, dataset = set(tokenizer.all_special_ids), set(), prepared.dataset
    for row in dataset.select(range(min(8, len(dataset)))):
        used.update(i for i in row["input_ids"] if i in special)
    return tokenizer.convert_ids_to_tokens(sorted(used))


def apply_liger_kernels(model: Any, required: bool) -> None:
    """Liger's fused RMSNorm/SwiGLU/RoPE kernels, patched into the model before any adapter wraps it (CUDA only:
    under the Triton interpreter its RMSNorm and SwiGLU kernels fail, liger-kernel 0.8.5 + triton 3.9). The patch
    changes the model's classes process-wide."""
    import importlib.util

    if not (torch.cuda.is_available() and importlib.util.find_spec("liger_kernel")):
        if required:
            raise ConfigError("--liger_kernels true needs liger-kernel on a CUDA GPU (pip install liger-kernel)")
        return
    try:
        apply_liger_kernel_to_instance(model)
    except Exception as e:  # noqa: BLE001 - an architecture Liger does not know: the plain modules stay
        if required:
            raise ConfigError(f"--liger_kernels true: {e}") from None
        log(f"liger kernels not applied: {e}")


def build_trainer(model, plan: Plan, training_args, tokenizer, data: Data, template, data_args, reference: Any = None
                  ) -> tuple[ChatTrainer, ThroughputCallback, PreemptionCallback]:
    args = trainer_arguments(plan, training_args)
    steps = StepSampler(train_lengths(data, training_args), plan.batch.shape, plan.batch.micro_batches_per_step,
                        rank=args.process_index, pairs=training_args.pairs)
    preemption, clock = PreemptionCallback(), ThroughputCallback()
    kind, extra = ChatTrainer, {}
    if plan.objective is not None:
        kind, extra = PreferenceTrainer, {"objective": PrefLoss.from_args(training_args), "ref_model": reference}
    trainer = kind(
        model=model, args=args, train_dataset=data.train.dataset,
        eval_dataset=data.eval.dataset if data.eval else None, data_collator=padding_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=[preemption, clock, EpochCallback(steps), LastStepLogCallback(), LossPlotCallback(),
                   *([EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience > 0 else [])],
        loss=LossSetup(plan.loss.choice, training_args.fused_ce, plan.logit_transform, plan.router_aux),
        steps=steps,
        boundaries=plan.sample_boundaries, stop_on_save_error=args.stop_on_save_error, **extra,
    )
    set_trained_stops(model, tokenizer, template)
    trainer.add_callback(CheckpointFilesCallback(
        lambda folder: write_run_files(folder, trainer, template, data_args, plan.mode, replace_generation_config=False)))
    return trainer, clock, preemption


def train(trainer: ChatTrainer, plan: Plan, preemption: PreemptionCallback, signals: RunSignals) -> None:
    """Train from the plan's resume source; stopped by a signal, the checkpoint is named and the process exits 143."""
    if plan.resume.source and trainer.is_world_process_zero():
        log(f"resuming from {plan.resume.source}")
    try:
        trainer.train(resume_from_checkpoint=plan.resume.source)
        signals.finished_training = True  # before the run's own handlers are back: no gap without one
    finally:
        preemption.restore_handlers()
    if trainer.divergence.step is not None:
        raise Diverged(trainer.divergence.step, trainer.args.output_dir)
    if preemption.stopped_early:
        stop_preempted(trainer, preemption)
    if preemption.signal and trainer.is_world_process_zero():
        log(f"signal {preemption.signal} received after the last step: saving the finished result")


def write_report(trainer: ChatTrainer, clock: ThroughputCallback, plan: Plan, data: Data, output_dir: str,
                 expert_load: dict[str, Any] | None = None) -> None:
    report = run_report(trainer, clock, plan, data, expert_load)
    with open(os.path.join(output_dir, "run_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(format_done(output_dir, report))
