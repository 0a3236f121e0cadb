"""Trainer wiring: model for the mode, plan, callbacks (preemption, run report), resume and the final save."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import time
from typing import Any

import torch
import transformers
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint

from chattune import __version__
from chattune.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments, flag
from chattune.cli import log
from chattune.collate import PackedBatchSampler, PackingCollator, PaddingCollator
from chattune.errors import ConfigError
from chattune.loss import accepts_logits_to_keep, causal_lm_loss, resolve_fused_ce
from chattune.model import (
    ModelInfo,
    apply_lora,
    count_parameters,
    load_model,
    resize_for_new_tokens,
    resolve_modules_to_save,
    resolve_packing,
)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: schedulers read it as "terminated", the checkpoint is on disk


# --------------------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------------------


class PreemptionCallback(TrainerCallback):
    """On SIGTERM/SIGUSR1 (cluster preemption, SLURM's --signal), or when the file named by $CHATTUNE_STOP_FILE
    appears, save a checkpoint at the end of the current step and stop. Every rank stops at the same step: the flag is
    reduced across ranks once per step.

    The stop file is for launchers that do not forward signals to the training processes intact (torchrun gives its
    workers 30 s after a SIGTERM, which is too short to save a large model): finetune/slurm.sbatch traps the
    scheduler's signal and touches the file instead."""

    def __init__(self) -> None:
        self.signal: int = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        stop_file = os.environ.get("CHATTUNE_STOP_FILE")
        if stop_file and os.path.exists(stop_file):
            self.signal = self.signal or signal.SIGUSR1
        flag = self.signal
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = args.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([flag], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        if flag:
            self.signal = flag
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ThroughputCallback(TrainerCallback):
    """Wall time and peak GPU memory of the training loop, for the run report."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------------------------------------------
# Trainer: packed micro-batches and a loss that never holds the whole batch's logits
# --------------------------------------------------------------------------------------------------------------


class ChatTrainer(transformers.Trainer):
    """`transformers.Trainer` with token-budget packing and fused/chunked cross-entropy.

    Everything else (optimizer, schedule, DeepSpeed, checkpoints, logging) is the stock Trainer. The loss is
    normalized by the Trainer's `num_items_in_batch` (trained tokens of the whole global batch), so packed and padded
    runs, any gradient accumulation and any number of ranks give the same loss.
    """

    def __init__(self, *args, packed_sampler: PackedBatchSampler | None = None, flash_kwargs: bool = False,
                 fused_ce: str = "none", **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_sampler = packed_sampler
        self.flash_kwargs = flash_kwargs
        self.fused_ce = fused_ce
        self._hidden: list[torch.Tensor] = []

    def get_train_dataloader(self):
        if self.packed_sampler is None:
            return super().get_train_dataloader()
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.packed_sampler, collate_fn=PackingCollator(self.flash_kwargs),
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_ce == "none" or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        # Run the wrapped model (DDP/DeepSpeed forward semantics intact), keep the decoder's last hidden state and let
        # the model compute logits for one position only; the loss comes from the hidden states.
        handle = base.get_decoder().register_forward_hook(self._keep_hidden)
        try:
            model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        hidden = self._hidden.pop()
        loss = causal_lm_loss(self.fused_ce, base.get_output_embeddings(), hidden, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP/DeepSpeed average gradients over ranks; undo that
        return loss

    def _keep_hidden(self, module, args, output):
        self._hidden.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)


class EpochCallback(TrainerCallback):
    """Reshuffles the packed micro-batches every epoch (also after a resume)."""

    def __init__(self, trainer: ChatTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer.packed_sampler
        if sampler is not None:
            sampler.set_epoch(int(state.epoch or 0))


# --------------------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------------------


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint, or the last checkpoint in output_dir when the same command runs again."""
    given = training_args.resume_from_checkpoint
    if given:
        if given.lower() in ("true", "latest", "last"):
            last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
            if last is None:
                raise ConfigError(f"--resume_from_checkpoint {given}: no checkpoint-* in {training_args.output_dir}")
            return last
        if not os.path.isdir(given):
            raise ConfigError(f"--resume_from_checkpoint {given}: no such checkpoint directory")
        return given
    if training_args.overwrite_output_dir or not os.path.isdir(training_args.output_dir):
        return None
    return get_last_checkpoint(training_args.output_dir)


def control_tokens_in_use(tokenizer: Any, dataset: Any) -> list[str]:
    """Special tokens the rendered template actually uses (looked up in the first samples)."""
    special = set(tokenizer.all_special_ids)
    used: set[int] = set()
    for row in dataset.select(range(min(8, len(dataset)))):
        used.update(i for i in row["input_ids"] if i in special)
    return tokenizer.convert_ids_to_tokens(sorted(used))


def build_model(model_args, training_args, lora_args, tokenizer, setup, train_dataset, packing: bool = False
                ) -> tuple[Any, ModelInfo]:
    model, info = load_model(model_args, training_args, lora_args, packing=packing)
    if flag(training_args.liger_kernels, "liger_kernels") != "false":
        apply_liger_kernels(model, required=flag(training_args.liger_kernels, "liger_kernels") == "true")
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


def sample_lengths(dataset: Any) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column("input_ids")).to_pylist()


def _estimated_gb(info: ModelInfo, training_args, lora_args, world_size: int, config: Any) -> float | None:
    from chattune.memory import GB, estimate, run_setup, shape_from_config

    try:
        shape = shape_from_config(config)
    except Exception:  # an architecture that cannot be built on the meta device: no estimate, no failure
        return None
    setup = run_setup(training_args, lora_args, info.mode, world_size)
    return round(estimate(shape, setup)["total"] / GB, 1)


def plan(info: ModelInfo, model_args, training_args, lora_args, data, world_size: int, config: Any,
         micro_batches: int | None = None) -> dict[str, Any]:
    """What the run will do. With packing a micro-batch is one bin of samples, so samples per step are an average."""
    report = data.train.report
    accumulation = training_args.gradient_accumulation_steps * world_size
    if micro_batches:
        steps_per_epoch = max(1, math.ceil(micro_batches / accumulation))
        per_step = report.kept / (micro_batches / accumulation)
    else:
        per_step = training_args.per_device_train_batch_size * accumulation
        steps_per_epoch = max(1, math.ceil(report.kept / per_step))
    steps = training_args.max_steps if training_args.max_steps > 0 else math.ceil(
        steps_per_epoch * training_args.num_train_epochs)
    tokens_per_sample = report.tokens / max(1, report.kept)
    return {
        "model": model_args.model_name_or_path,
        "mode": info.mode,
        "dtype": str(info.dtype).replace("torch.", ""),
        "attention": info.attn_implementation,
        "batches": info.packing,
        "loss": "fused linear+CE (" + info.fused_ce + ")" if info.fused_ce != "none" else "standard",
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
        "modules_to_save": info.modules_to_save_reason or "-",
        "processes": world_size,
        "deepspeed": training_args.deepspeed or "-",
        "global_batch_samples": round(per_step, 1),
        "global_batch_tokens": round(per_step * tokens_per_sample),
        "steps": steps,
        "estimated_gb_per_gpu": _estimated_gb(info, training_args, lora_args, world_size, config),
    }


def format_plan(p: dict[str, Any]) -> str:
    pct = 100 * p["trainable_params"] / max(1, p["total_params"])
    return "\n".join([
        "plan:",
        f"  model      {p['model']}",
        f"  mode       {p['mode']} ({p['dtype']}, attention {p['attention']}, deepspeed {p['deepspeed']})",
        f"  batches    {p['batches']}, loss {p['loss']}",
        f"  trainable  {p['trainable_params']:,} of {p['total_params']:,} parameters ({pct:.2f}%)",
        f"  embeddings {p['modules_to_save']}" if p["mode"] != "full" else "  embeddings trained (full fine-tuning)",
        f"  processes  {p['processes']}",
        f"  batch      {p['global_batch_samples']} samples, ~{p['global_batch_tokens']:,} tokens per optimizer step",
        f"  steps      {p['steps']}",
        f"  memory     ~{p['estimated_gb_per_gpu']} GB per GPU (estimate; --estimate_memory for the breakdown)"
        if p["estimated_gb_per_gpu"] else "  memory     (no estimate for this architecture)",
    ])


def apply_liger_kernels(model: Any, required: bool) -> None:
    """Liger's fused RMSNorm/SwiGLU/RoPE kernels (CUDA only), patched into the model before any adapter wraps it."""
    import importlib.util

    if not (torch.cuda.is_available() and importlib.util.find_spec("liger_kernel")):
        if required:
            raise ConfigError("--liger_kernels true needs liger-kernel on CUDA: pip install liger-kernel")
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    try:
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as e:  # an architecture Liger does not know: the plain modules stay
        if required:
            raise ConfigError(f"--liger_kernels true: {e}") from None
        log(f"liger kernels not applied: {e}")


def configure_trainer_args(training_args: TrainingArguments) -> None:
    """Settings this data pipeline needs, whatever the user passed."""
    training_args.remove_unused_columns = False  # our columns are named for the collator, not the model signature
    training_args.label_names = ["labels"]  # a PeftModel hides the signature Trainer infers label names from
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if training_args.include_num_input_tokens_seen in (False, "no"):
        training_args.include_num_input_tokens_seen = "non_padding"


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


def train_and_save(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                   lora_args: LoraArguments, tokenizer: Any, setup: Any, data: Any) -> transformers.Trainer:
    configure_trainer_args(training_args)
    packing = resolve_packing(flag(training_args.packing, "packing"), model_args.attn_implementation)
    budget = training_args.micro_batch_tokens()
    if packing and budget < training_args.model_max_length:
        raise ConfigError(f"--max_tokens_per_batch {budget} is below --model_max_length "
                          f"{training_args.model_max_length}: the longest samples would fit no micro-batch")
    sampler = None
    if packing:
        training_args.include_num_input_tokens_seen = "all"  # no padding in packed rows
        sampler = PackedBatchSampler(sample_lengths(data.train.dataset), budget,
                                     seed=training_args.data_seed or training_args.seed)
    transformers.set_seed(training_args.seed)  # before the adapter is created: its init must follow --seed
    model, info = build_model(model_args, training_args, lora_args, tokenizer, setup, data.train.dataset, packing)
    fused = resolve_fused_ce(training_args.fused_ce, model.get_output_embeddings(), is_deepspeed_zero3_enabled())
    if fused != "none" and not accepts_logits_to_keep(model):
        fused = "none"  # remote-code models without logits_to_keep: the model's own loss
    fused = zero3_fused_ce(fused, training_args.fused_ce, model)
    info.packing, info.fused_ce = (f"packed, {budget} tokens per micro-batch" if packing else "padded"), fused
    the_plan = plan(info, model_args, training_args, lora_args, data, training_args.world_size, model.config,
                    micro_batches=len(sampler) if sampler else None)
    if training_args.process_index == 0:
        log(format_plan(the_plan))
    preemption, clock = PreemptionCallback(), ThroughputCallback()
    trainer = ChatTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train.dataset,
        eval_dataset=data.eval.dataset if data.eval else None,
        data_collator=PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8),
        processing_class=tokenizer,
        callbacks=[preemption, clock],
        packed_sampler=sampler,
        flash_kwargs=info.attn_implementation.startswith("flash_attention"),
        fused_ce=fused,
    )
    trainer.add_callback(EpochCallback(trainer))
    resume = resolve_resume(training_args)
    if resume and training_args.process_index == 0:
        log(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    if preemption.signal:
        if training_args.process_index == 0:
            log(f"stopped by signal {preemption.signal}: checkpoint saved in {training_args.output_dir}; "
                "run the same command again to resume")
        raise SystemExit(EXIT_PREEMPTED)
    save_final(trainer, tokenizer, setup, data_args, training_args, info)
    if trainer.is_world_process_zero():
        report = run_report(trainer, clock, the_plan, data, info)
        with open(os.path.join(training_args.output_dir, "run_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        log(f"saved to {training_args.output_dir}: final loss {report['final_loss']}, "
            f"{report['tokens_per_second']:,.0f} tokens/s, peak GPU memory {report['peak_gpu_memory_gb']} GB")
    finish_distributed()
    return trainer


def finish_distributed() -> None:
    """Every rank waits until the main process has written all files, then the process group is shut down before the
    interpreter exits. Without this a rank that finished first sometimes aborted at exit ("terminate called without
    an active exception", gloo, torch 2.13) and torchrun killed the main process while it was writing the model."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def save_final(trainer, tokenizer, setup, data_args, training_args, info: ModelInfo) -> None:
    """Plain Hugging Face files (gathered under ZeRO-3), tokenizer with chat template, generation config, state."""
    out = training_args.output_dir
    trainer.save_model(out)  # all ranks take part (ZeRO-3 gathers); only the main process writes
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(out)
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(list(setup.stop_tokens)) if i is not None]
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation = base.generation_config
    generation.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    with open(os.path.join(out, "chattune.json"), "w") as f:
        json.dump({"template": setup.name, "template_kwargs": data_args.parsed_template_kwargs(),
                   "stop_tokens": list(setup.stop_tokens), "mode": info.mode,
                   "base_model": trainer.model.config._name_or_path, "version": __version__}, f, indent=1)


def run_report(trainer, clock: ThroughputCallback, the_plan: dict, data, info: ModelInfo) -> dict[str, Any]:
    history = [h for h in trainer.state.log_history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen or 0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "plan": the_plan,
        "data": data.train.report.to_dict(),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens_seen": tokens,
        "trained_tokens_per_epoch": data.train.report.trained_tokens,
        "wall_seconds": round(clock.seconds, 2),
        "tokens_per_second": tokens / clock.seconds if clock.seconds else 0.0,
        "peak_gpu_memory_gb": round(peak, 2) if peak is not None else None,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else _train_loss(trainer),
        "versions": {
            "chattune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, **_optional_versions(),
        },
    }


def _train_loss(trainer) -> float | None:
    """The run's mean loss when no step was logged (fewer steps than --logging_steps)."""
    summary = [h for h in trainer.state.log_history if "train_loss" in h]
    return summary[-1]["train_loss"] if summary else None


def _optional_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("peft", "accelerate", "deepspeed", "bitsandbytes", "datasets", "flash-attn", "liger-kernel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
