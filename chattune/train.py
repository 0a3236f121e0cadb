"""The training stage, top to bottom: batches -> model -> loss -> trainer -> train -> save (or stop for preemption).

Each stage is a function that takes what the previous ones produced; `train_and_save` only lists them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import EarlyStoppingCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import IntervalStrategy

from chattune import __version__, checkpoints
from chattune.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments
from chattune.callbacks import (
    CheckpointFilesCallback,
    EpochCallback,
    LossPlotCallback,
    PreemptionCallback,
    ThroughputCallback,
)
from chattune.cli import log
from chattune.collate import PackedBatchSampler, sample_lengths
from chattune.errors import ConfigError
from chattune.loss import accepts_logits_to_keep, base_model, logit_transform, resolve_fused_ce
from chattune.model import (
    AttentionChoice,
    ModelInfo,
    apply_lora,
    count_parameters,
    load_model,
    resize_for_new_tokens,
    resolve_modules_to_save,
)
from chattune.report import format_done, format_plan, plan, run_report
from chattune.trainer import SAVE_ERRNOS, ChatTrainer, LossSetup, SaveError, padding_collator

EXIT_PREEMPTED = 143  # 128 + SIGTERM: schedulers read it as "terminated", the checkpoint is on disk


def train_and_save(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                   lora_args: LoraArguments, tokenizer: Any, setup: Any, data: Any, config: Any,
                   attention: AttentionChoice) -> transformers.Trainer:
    evaluation = configure_trainer_args(training_args, has_eval=data.eval is not None)
    batches = plan_batches(training_args, attention, data.train.dataset)
    transformers.set_seed(training_args.seed)  # before the adapter is created: its init must follow --seed
    model, info = build_model(model_args, training_args, lora_args, tokenizer, setup, data.train.dataset, config,
                              attention)
    loss = choose_loss(training_args, model, config)
    info.packing, info.fused_ce, info.evaluation = batches.description, loss.kind, evaluation
    info.logit_transform = loss.transform.describe()
    trainer, clock, preemption = build_trainer(model, training_args, tokenizer, data, batches, loss, info)
    set_trained_stops(model, tokenizer, setup)
    trainer.add_callback(CheckpointFilesCallback(
        lambda folder: write_run_files(folder, trainer, setup, data_args, info,
                                       replace_generation_config=False)))
    the_plan = plan(info, model_args, training_args, lora_args, data, training_args.world_size, model.config,
                    micro_batches=len(batches.sampler) if batches.sampler else None)
    space = disk_space_warning(training_args, info, the_plan["steps"])
    if space:
        the_plan["notes"].append(space)
    if training_args.process_index == 0:
        log(format_plan(the_plan))
    try:
        train(trainer, training_args)
    finally:
        preemption.restore_handlers()
    if preemption.stopped_early:
        stop_preempted(trainer, preemption)
    if preemption.signal and training_args.process_index == 0:
        log(f"signal {preemption.signal} received after the last step: saving the finished result")
    if evaluation == "once, after training":
        trainer.evaluate()
    save_final(trainer, tokenizer, setup, data_args, training_args, info)
    if trainer.is_world_process_zero():
        report = run_report(trainer, clock, the_plan, data)
        with open(os.path.join(training_args.output_dir, "run_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        log(format_done(training_args.output_dir, report))
    finish_distributed()
    return trainer


# --------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------


def configure_trainer_args(training_args: TrainingArguments, has_eval: bool) -> str:
    """Settings this data pipeline needs, whatever the user passed; returns when evaluation happens."""
    training_args.remove_unused_columns = False  # our columns are named for the collator, not the model signature
    training_args.label_names = ["labels"]  # a PeftModel hides the signature Trainer infers label names from
    if training_args.activation_checkpointing and training_args.activation_checkpointing_kwargs is None:
        # Trainer reads the new name; the old one mirrors it for code that still reads it.
        training_args.activation_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs = {
            "use_reentrant": False}
    if training_args.include_num_input_tokens_seen in (False, "no"):
        training_args.include_num_input_tokens_seen = "non_padding"
    return configure_evaluation(training_args, has_eval)


def configure_evaluation(training_args: TrainingArguments, has_eval: bool) -> str:
    """Eval data given means evaluation happens: as --eval_strategy says, else at every checkpoint, else once at the
    end of training."""
    if not has_eval:
        return "none"
    strategy = IntervalStrategy(training_args.eval_strategy)
    if strategy == IntervalStrategy.STEPS:
        return f"every {training_args.eval_steps} steps"
    if strategy == IntervalStrategy.EPOCH:
        return "every epoch"
    save = getattr(training_args.save_strategy, "value", training_args.save_strategy)
    training_args.do_eval = True
    if save == "steps":
        training_args.eval_strategy, training_args.eval_steps = IntervalStrategy.STEPS, training_args.save_steps
        return f"every {training_args.save_steps} steps (with each checkpoint)"
    if save == "epoch":
        training_args.eval_strategy = IntervalStrategy.EPOCH
        return "every epoch (with each checkpoint)"
    return "once, after training"


@dataclass
class Batches:
    sampler: PackedBatchSampler | None  # packed micro-batches, or None for padded batches
    budget: int  # tokens per packed micro-batch (0 when padded)
    description: str


def plan_batches(training_args: TrainingArguments, attention: AttentionChoice, dataset: Any) -> Batches:
    if not attention.packing:
        return Batches(None, 0, "padded")
    budget = training_args.micro_batch_tokens()
    if budget < training_args.model_max_length:
        raise ConfigError(f"--max_tokens_per_batch {budget} is below --model_max_length "
                          f"{training_args.model_max_length}: the longest samples would fit no micro-batch")
    training_args.include_num_input_tokens_seen = "all"  # no padding in packed rows
    sampler = PackedBatchSampler(sample_lengths(dataset), budget, seed=training_args.data_seed or training_args.seed)
    return Batches(sampler, budget, f"packed, {budget} tokens per micro-batch")


def build_model(model_args, training_args, lora_args, tokenizer, setup, train_dataset, config: Any,
                attention: AttentionChoice) -> tuple[Any, ModelInfo]:
    model, info = load_model(model_args, training_args, lora_args, config, attention)
    if training_args.liger_kernels != "false":
        apply_liger_kernels(model, required=training_args.liger_kernels == "true")
    grown = resize_for_new_tokens(model, tokenizer)
    if grown:
        log(f"embeddings grown by {grown} rows for the template's new tokens {', '.join(setup.added_tokens)}")
    if training_args.use_lora:
        info.modules_to_save, info.modules_to_save_reason = resolve_modules_to_save(
            lora_args.lora_modules_to_save, model, tokenizer, setup.added_tokens,
            control_tokens_in_use(tokenizer, train_dataset),
        )
        model = apply_lora(model, training_args, lora_args, info.modules_to_save)
    info.trainable_params, info.total_params = count_parameters(model)
    return model, info


def control_tokens_in_use(tokenizer: Any, dataset: Any) -> list[str]:
    """Special tokens the rendered template actually uses (looked up in the first samples)."""
    special = set(tokenizer.all_special_ids)
    used: set[int] = set()
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
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    try:
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as e:  # an architecture Liger does not know: the plain modules stay
        if required:
            raise ConfigError(f"--liger_kernels true: {e}") from None
        log(f"liger kernels not applied: {e}")


def choose_loss(training_args: TrainingArguments, model: Any, config: Any) -> LossSetup:
    """The loss path: fused (Liger/chunked) where the model lets us compute logits from its hidden states, else the
    model's own logits. The model's logit transform (soft-capping, logit scale) goes with it."""
    requested = training_args.fused_ce
    kind = resolve_fused_ce(requested, model.get_output_embeddings(), is_deepspeed_zero3_enabled(),
                            use_cpu=training_args.use_cpu)
    if kind != "none" and not (accepts_logits_to_keep(model) and hasattr(base_model(model), "get_decoder")):
        if requested != "auto":
            raise ConfigError(f"--fused_ce {requested}: this model's forward has no logits_to_keep (remote code); "
                              "use --fused_ce none")
        kind = "none"  # remote-code models without logits_to_keep: the model's own logits
    kind = zero3_fused_ce(kind, requested, model)
    return LossSetup(kind, requested, logit_transform(config))


def zero3_fused_ce(fused: str, requested: str, model: Any) -> str:
    """The chunked loss recomputes the output layer in backward, outside any module's backward. ZeRO-3 re-gathers a
    trainable output layer there but not a frozen one (LoRA, Q-LoRA): the recompute sees an empty weight and fails
    (deepspeed 0.19.8). There the model's own loss is used."""
    if fused != "chunked" or not is_deepspeed_zero3_enabled():
        return fused
    if any(p.requires_grad for p in model.get_output_embeddings().parameters()):
        return fused
    if requested == "chunked":
        raise ConfigError("--fused_ce chunked does not work with a frozen output layer under ZeRO-3 (LoRA/Q-LoRA); "
                          "use --fused_ce auto or none, or ZeRO-2")
    return "none"


def build_trainer(model, training_args, tokenizer, data, batches: Batches, loss: LossSetup, info: ModelInfo
                  ) -> tuple[ChatTrainer, ThroughputCallback, PreemptionCallback]:
    preemption, clock = PreemptionCallback(), ThroughputCallback()
    trainer = ChatTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train.dataset,
        eval_dataset=data.eval.dataset if data.eval else None,
        data_collator=padding_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=[preemption, clock, EpochCallback(batches.sampler), LossPlotCallback(),
                   *([EarlyStoppingCallback(training_args.early_stopping_patience)]
                     if training_args.early_stopping_patience > 0 else [])],
        loss=loss,
        packed_sampler=batches.sampler,
        flash_kwargs=info.attn_implementation.startswith("flash_attention"),
        eval_tokens_per_batch=batches.budget,
        stop_on_save_error=training_args.stop_on_save_error,
    )
    return trainer, clock, preemption


def train(trainer: ChatTrainer, training_args: TrainingArguments) -> None:
    with training_args.main_process_first(local=False, desc="checking checkpoints"):  # the main one moves them
        resume = resolve_resume(training_args)
    if resume and training_args.process_index == 0:
        log(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint, or the newest complete checkpoint in output_dir when the same command runs again.

    A save that was killed before its commit left only output_dir/.chattune-staging: removed. A checkpoint that is
    not complete is moved aside with a warning and the one before it is used; an explicit path must be complete."""
    out, given = training_args.output_dir, training_args.resume_from_checkpoint
    staging = os.path.join(out, checkpoints.STAGING)
    if os.path.isdir(staging):
        shutil.rmtree(staging, ignore_errors=True)
        log(f"removed {staging}: an unfinished checkpoint save of an earlier run (stopped while saving)")
    if given and given.lower() not in ("true", "latest", "last"):
        if not os.path.isdir(given):
            raise ConfigError(f"--resume_from_checkpoint {given}: no such checkpoint directory")
        why = checkpoints.problem(given)
        if why:
            raise ConfigError(f"--resume_from_checkpoint {given}: the checkpoint is incomplete ({why}); pass an "
                              "earlier checkpoint, or leave the flag out to resume from the newest complete one")
        return given
    if not given and (training_args.overwrite_output_dir or not os.path.isdir(out)):
        return None
    last = checkpoints.latest_complete(out, warn=log)
    if given and last is None:
        raise ConfigError(f"--resume_from_checkpoint {given}: no complete checkpoint-* in {out}")
    return last


def stop_preempted(trainer: ChatTrainer, preemption: PreemptionCallback) -> None:
    """Training stopped early on a signal: say where the checkpoint is (only if one was written), tear down, exit."""
    if trainer.is_world_process_zero():
        if preemption.checkpoint:
            log(f"stopped by signal {preemption.signal}: checkpoint saved in {preemption.checkpoint}; run the same "
                "command again to resume")
        else:
            log(f"stopped by signal {preemption.signal} at step {trainer.state.global_step}: no checkpoint could be "
                "written; a re-run resumes from the previous checkpoint, if any")
    finish_distributed()
    raise SystemExit(EXIT_PREEMPTED)


def finish_distributed() -> None:
    """Every rank waits until the main process has written all files, then the process group is shut down before the
    interpreter exits. Without this a rank that finished first sometimes aborted at exit ("terminate called without
    an active exception", gloo, torch 2.13) and torchrun killed the main process while it was writing the model."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def checkpoint_bytes(info: ModelInfo, training_args: TrainingArguments) -> tuple[int, int]:
    """Rough (result, checkpoint) sizes in bytes: the saved weights, plus Adam's two fp32 moments per trainable
    parameter (and DeepSpeed's fp32 master copy) in a checkpoint."""
    if info.mode == "full":
        result = info.total_params * (4 if info.dtype == torch.float32 or not training_args.deepspeed else 2)
    else:
        result = info.trainable_params * 4
    optimizer = info.trainable_params * (12 if training_args.deepspeed else 8)
    return result, result + optimizer


def disk_space_warning(training_args: TrainingArguments, info: ModelInfo, steps: int) -> str | None:
    """A warning when output_dir's filesystem cannot hold the checkpoints the run keeps and its result."""
    strategy = getattr(training_args.save_strategy, "value", training_args.save_strategy)
    saves = {"steps": steps // max(1, int(training_args.save_steps)),
             "epoch": int(training_args.num_train_epochs)}.get(strategy, 0)
    kept = min(saves, training_args.save_total_limit) if training_args.save_total_limit else saves
    result, checkpoint = checkpoint_bytes(info, training_args)
    need, free = kept * checkpoint + result, checkpoints.free_bytes(training_args.output_dir)
    if need <= free:
        return None
    gb = checkpoints.size_text
    return (f"WARNING: {training_args.output_dir} has {gb(free)} free; {kept} checkpoints of ~{gb(checkpoint)} and "
            f"the result (~{gb(result)}) need ~{gb(need)}: free space, lower --save_total_limit, or choose another "
            "--output_dir")


def save_final(trainer, tokenizer, setup, data_args, training_args, info: ModelInfo) -> None:
    """The result in output_dir; if that fails (full disk, lost permission) it is written where it fits, the user
    is told where, and the run ends with an error: trained weights are never lost to a failed write."""
    out = training_args.output_dir
    error = None
    try:
        write_result(trainer, out, tokenizer, setup, data_args, info)
    except OSError as e:
        if e.errno not in SAVE_ERRNOS:
            raise
        error = e
    if trainer.on_every_rank(error is None):
        return
    rescue = rescue_dir(trainer, out, checkpoint_bytes(info, training_args)[0])
    write_result(trainer, rescue, tokenizer, setup, data_args, info)
    cause = error.strerror if error is not None else "it failed on another process"
    raise SaveError(f"the trained result could not be written to {out} ({cause}): it was saved to {rescue} instead. "
                    "Move it where it belongs; nothing else is lost.")


def rescue_dir(trainer, out: str, needed: int) -> str:
    """A new directory on a filesystem with room for the result (the temp dir, else home), the same on all ranks."""
    import tempfile
    import time

    path = None
    if trainer.is_world_process_zero():
        roots = [tempfile.gettempdir(), os.path.expanduser("~")]
        root = next((r for r in roots if checkpoints.free_bytes(r) > 1.2 * needed), roots[0])
        path = os.path.join(root, f"chattune-rescued-{os.path.basename(os.path.abspath(out))}-"
                                  f"{time.strftime('%Y%m%d-%H%M%S')}")
    if trainer.args.world_size > 1:
        box = [path]
        torch.distributed.broadcast_object_list(box, src=0)
        path = box[0]
    return path


def write_result(trainer, out: str, tokenizer, setup, data_args, info: ModelInfo) -> None:
    """Plain Hugging Face files (gathered under ZeRO-3), tokenizer with chat template, generation config, state."""
    trainer.save_model(out)  # all ranks take part (ZeRO-3 gathers); only the main process writes
    if not trainer.is_world_process_zero():
        return
    trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
    tokenizer.save_pretrained(out)
    write_run_files(out, trainer, setup, data_args, info)


def set_trained_stops(model, tokenizer, setup) -> None:
    """The model's generation config stops on the trained end-of-turn tokens from the start, so every save writes
    the generation_config.json of the result: a full model's checkpoints too (their manifest records its size)."""
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(list(setup.stop_tokens)) if i is not None]
    generation = base_model(model).generation_config
    generation.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id


def write_run_files(out: str, trainer, setup, data_args, info: ModelInfo,
                    replace_generation_config: bool = True) -> None:
    """What serving and the later steps need besides the weights: generation_config.json stopping on the trained
    end-of-turn tokens, and chattune.json (template, its variables, stops, mode, base). In the result and in every
    checkpoint, so a model merged from a checkpoint stops like one merged from the result. In a committed checkpoint
    only files its manifest does not list are added (`replace_generation_config` false): a full model's checkpoint
    has its generation_config.json already, written from the same config."""
    generation = base_model(trainer.model).generation_config
    if replace_generation_config or not os.path.isfile(os.path.join(out, "generation_config.json")):
        generation.save_pretrained(out)
    with open(os.path.join(out, "chattune.json"), "w") as f:
        json.dump({"template": setup.name, "template_kwargs": data_args.parsed_template_kwargs(),
                   "stop_tokens": list(setup.stop_tokens), "mode": info.mode,
                   "model_max_length": trainer.args.model_max_length,
                   "base_model": trainer.model.config._name_or_path, "version": __version__}, f, indent=1)
