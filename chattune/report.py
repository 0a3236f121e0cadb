"""What the run will do (the plan, printed before training) and what it did (run_report.json)."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from chattune import __version__
from chattune.model import ModelInfo


def _estimates(info: ModelInfo, training_args, lora_args, world_size: int, config: Any, trust_remote_code: bool,
               data, packed: bool, steps: int, micro_batches: int | None) -> tuple[float | None, str | None]:
    """(GB per GPU, time of the run on this GPU kind) from the config and the real lengths of the prepared data:
    the largest micro-batch is the packing budget, or the batch padded to the longest sample."""
    from dataclasses import replace

    from chattune.collate import sample_lengths
    from chattune.memory import (
        GB,
        GPU_KINDS,
        data_plan,
        estimate,
        estimate_seconds,
        format_duration,
        run_setup,
        shape_from_config,
        token_weighted_length,
    )

    try:
        shape = shape_from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an architecture that cannot be built on the meta device: no estimate, no failure
        return None, None
    setup = run_setup(training_args, lora_args, info.mode, world_size)
    lengths = np.asarray(sample_lengths(data.train.dataset), dtype=np.int64)
    if len(lengths) and not packed:
        setup = replace(setup, micro_batch_tokens=min(setup.micro_batch_tokens,
                                                      training_args.per_device_train_batch_size * int(lengths.max())))
    gb = round(estimate(shape, setup)["total"] / GB, 1)
    kind = gpu_kind()
    if kind is None or not len(lengths):
        return gb, None
    per_step = training_args.gradient_accumulation_steps
    processed = float(lengths.sum())
    if micro_batches is None:  # padded: every micro-batch as wide as its longest sample, padding computed too
        padded = data_plan(lengths, training_args.per_device_train_batch_size, 0, packing=False,
                           seed=training_args.seed)
        micro_batches, processed = padded.micro_batches, float(padded.processed_tokens)
    tokens_per_micro_batch = processed / max(micro_batches, 1)
    run_micro_batches = steps * per_step
    seconds = estimate_seconds(shape, setup, run_micro_batches * tokens_per_micro_batch, kind,
                               sequence_tokens=token_weighted_length(lengths),
                               micro_batches=run_micro_batches)
    return gb, f"~{format_duration(seconds)} on {GPU_KINDS[kind].name} (estimate)"


def gpu_kind() -> str | None:
    """This machine's GPU as a key of memory.GPU_KINDS, if it is one of them."""
    if not torch.cuda.is_available():
        return None
    import re

    name = torch.cuda.get_device_name(0).upper()
    for key, pattern in (("H100", r"\bH100\b"), ("A100", r"\bA100\b"), ("L40S", r"\bL40S\b"),
                         ("RTX4090", r"\b4090\b"), ("RTX3090", r"\b3090\b")):
        if re.search(pattern, name):
            return key
    return None


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
    gb, duration = _estimates(info, training_args, lora_args, world_size, config, model_args.trust_remote_code, data,
                              packed=micro_batches is not None, steps=steps, micro_batches=micro_batches)
    return {
        "model": model_args.model_name_or_path,
        "mode": info.mode,
        "dtype": str(info.dtype).replace("torch.", ""),
        "attention": info.attn_implementation,
        "batches": info.packing,
        "loss": "fused linear+CE (" + info.fused_ce + ")" if info.fused_ce != "none" else "standard",
        "logit_transform": info.logit_transform,
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
        "modules_to_save": info.modules_to_save_reason or "-",
        "processes": world_size,
        "deepspeed": training_args.deepspeed or "-",
        "global_batch_samples": round(per_step, 1),
        "global_batch_tokens": round(per_step * tokens_per_sample),
        "steps": steps,
        "evaluation": info.evaluation,
        "estimated_gb_per_gpu": gb,
        "estimated_time": duration,
        "notes": list(info.notes),
    }


def format_plan(p: dict[str, Any]) -> str:
    pct = 100 * p["trainable_params"] / max(1, p["total_params"])
    loss = p["loss"] + (f", logit transform {p['logit_transform']}" if p["logit_transform"] != "none" else "")
    lines = [
        "plan:",
        f"  model      {p['model']}",
        f"  mode       {p['mode']} ({p['dtype']}, attention {p['attention']}, deepspeed {p['deepspeed']})",
        f"  batches    {p['batches']}, loss {loss}",
        f"  trainable  {p['trainable_params']:,} of {p['total_params']:,} parameters ({pct:.2f}%)",
        f"  embeddings {p['modules_to_save']}" if p["mode"] != "full" else "  embeddings trained (full fine-tuning)",
        f"  processes  {p['processes']}",
        f"  batch      {p['global_batch_samples']} samples, ~{p['global_batch_tokens']:,} tokens per optimizer step",
        f"  steps      {p['steps']}" + (f", {p['estimated_time']}" if p.get("estimated_time") else ""),
        f"  eval       {p['evaluation']}",
        f"  memory     ~{p['estimated_gb_per_gpu']} GB per GPU (estimate; --estimate_memory for the breakdown)"
        if p["estimated_gb_per_gpu"] else "  memory     (no estimate for this architecture)",
    ]
    lines += [f"  note       {note}" for note in p["notes"]]
    return "\n".join(lines)


def run_report(trainer, clock, the_plan: dict, data) -> dict[str, Any]:
    history = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "plan": the_plan,
        "data": data.train.report.to_dict(),
        "eval_data": data.eval.report.to_dict() if data.eval is not None else None,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens_seen": trainer.state.num_input_tokens_seen or 0,  # over the whole run, resumed parts included
        "tokens_this_process": clock.tokens,  # since this process started (or resumed) training
        "trained_tokens_per_epoch": data.train.report.trained_tokens,
        "wall_seconds": round(clock.seconds, 2),
        "tokens_per_second": clock.tokens_per_second,
        "peak_gpu_memory_gb": round(peak, 2) if peak is not None else None,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else _train_loss(trainer),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        # with --load_best_model_at_end / --early_stopping_patience the saved model is the best checkpoint's
        "best_eval_loss": trainer.state.best_metric if trainer.args.load_best_model_at_end else None,
        "best_checkpoint": trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None,
        "stopped_early": bool(trainer.args.early_stopping_patience and trainer.state.max_steps
                              and trainer.state.global_step < trainer.state.max_steps),
        "loss_path": trainer.loss.kind,  # as trained: auto falls back to "none" if the first-batch check fails
        "versions": {
            "chattune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, **_optional_versions(),
        },
    }


def format_done(out: str, report: dict[str, Any]) -> str:
    parts = [f"saved to {out}: final loss {report['final_loss']}"]
    if report.get("best_checkpoint"):
        stop = f", stopped early at step {report['steps']}" if report.get("stopped_early") else ""
        parts.append(f"best eval loss {report['best_eval_loss']:.4f} (the saved model is "
                     f"{Path(report['best_checkpoint']).name}{stop})")
    elif report["eval_loss"] is not None:
        parts.append(f"eval loss {report['eval_loss']:.4f}")
    parts.append(f"{report['tokens_per_second']:,.0f} tokens/s")
    if report["peak_gpu_memory_gb"] is not None:
        parts.append(f"peak GPU memory {report['peak_gpu_memory_gb']} GB")
    return ", ".join(parts)


def _train_loss(trainer) -> float | None:
    """The run's mean loss when no step was logged (fewer steps than --logging_steps)."""
    summary = [h for h in trainer.state.log_history if "train_loss" in h]
    return summary[-1]["train_loss"] if summary else None


def _optional_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("peft", "accelerate", "deepspeed", "bitsandbytes", "datasets", "flash-attn", "liger-kernel",
                 "triton", "gptqmodel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
