"""What the run did: run_report.json (its plan, the data report, the loss path as trained, speed, versions)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
import transformers

from chattune import __version__


def run_report(trainer, clock, plan: Any, data, expert_load: dict[str, Any] | None = None) -> dict[str, Any]:
    history = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "plan": plan.to_dict(),
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
        # MoE: tokens routed to each expert of each layer over this process's training, all ranks
        "expert_load": expert_load,
        # --stage dpo: rewards, margins and reward accuracy, of the last logged window and of the held-out pairs
        "preference": _preference(history, evals) if plan.objective is not None else None,
        "loss_path": trainer.loss.kind,  # as trained: auto falls back to "none" if the first-batch check fails
        "versions": {
            "chattune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, **_optional_versions(),
        },
    }


def _preference(history: list[dict], evals: list[dict]) -> dict[str, Any]:
    last = next((h for h in reversed(history) if "rewards/margins" in h), {})
    held = evals[-1] if evals else {}
    return {"train": {k: v for k, v in last.items() if k.startswith(("rewards/", "logps/"))} or None,
            "eval": {k.removeprefix("eval_"): v for k, v in held.items()
                     if k.startswith(("eval_rewards/", "eval_logps/")) or k == "eval_pairs"} or None}


def format_done(out: str, report: dict[str, Any]) -> str:
    parts = [f"saved to {out}: final loss {report['final_loss']}"]
    if report.get("best_checkpoint"):
        stop = f", stopped early at step {report['steps']}" if report.get("stopped_early") else ""
        parts.append(f"best eval loss {report['best_eval_loss']:.4f} (the saved model is "
                     f"{Path(report['best_checkpoint']).name}{stop})")
    elif report["eval_loss"] is not None:
        parts.append(f"eval loss {report['eval_loss']:.4f}")
    held = (report.get("preference") or {}).get("eval")
    if held:
        parts.append(f"held-out reward accuracy {held['rewards/accuracies']:.1%}, margin "
                     f"{held['rewards/margins']:.4f}")
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
