"""The end of a run: the result written as plain Hugging Face files (gathered under ZeRO-3) with what serving and
the later steps need, rescued where it fits when the output directory cannot take it; or, stopped by a signal, the
checkpoint named and the process group torn down."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import torch

from chattune import __version__
from chattune.cli import log
from chattune.train import checkpoints
from chattune.train.layout import complete_from_base, skipped_on_load
from chattune.train.loss import base_model
from chattune.train.plan import EXIT_PREEMPTED, EXIT_STOPPED, Plan
from chattune.train.trainer import ChatTrainer, SaveError


def stop_preempted(trainer: ChatTrainer, preemption: Any) -> None:
    """Training stopped early on a signal: say where the checkpoint is (only if one was written), tear down, exit."""
    if trainer.is_world_process_zero():
        if preemption.checkpoint:
            log(f"stopped by signal {signal.Signals(preemption.signal).name}: checkpoint saved in {preemption.checkpoint}; run the same "
                "command again to resume")
        else:
            log(f"stopped by signal {signal.Signals(preemption.signal).name} at step {trainer.state.global_step}: no checkpoint could be "
                "written; a re-run resumes from the previous checkpoint, if any")
    finish_distributed()
    raise SystemExit(EXIT_STOPPED if preemption.signal == signal.SIGINT else EXIT_PREEMPTED)


def finish_distributed() -> None:
    """Every rank waits until the main process has written all files, then the process group is shut down before the
    interpreter exits. Without this a rank that finished first sometimes aborted at exit ("terminate called without
    an active exception", gloo, torch 2.13) and torchrun killed the main process while it was writing the model."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def save_final(trainer, tokenizer, setup, data_args, training_args, plan: Plan) -> None:
    """The result in output_dir; if that fails (full disk, lost permission) it is written where it fits, the user
    is told where, and the run ends with an error: trained weights are never lost to a failed write."""
    import time

    out = training_args.output_dir
    error, started = None, time.time()
    try:
        write_result(trainer, out, tokenizer, setup, data_args, plan)
    except Exception as e:
        error = checkpoints.write_failure(e, out)
        if error is None:
            raise
    if trainer.on_every_rank(error is None):
        return
    if trainer.is_world_process_zero() and os.path.isdir(out):  # what it wrote would look like a result, and fail
        for entry in os.scandir(out):
            if entry.is_file() and entry.stat().st_mtime >= started - 1:
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
    rescue = rescue_dir(trainer, out, result_bytes(trainer.model, plan.mode))
    write_result(trainer, rescue, tokenizer, setup, data_args, plan)
    cause = error.strerror if error is not None else "it failed on another process"
    raise SaveError(f"the trained result could not be written to {out} ({cause}): it was saved to {rescue} instead. "
                    "Move it where it belongs; nothing else is lost.")


def result_bytes(model: Any, mode: str) -> int:
    """Bytes of the weights the result holds: every weight (full fine-tuning) or the trainable ones (an adapter)."""
    params = [p for p in model.parameters() if mode == "full" or p.requires_grad]
    return sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size() for p in params)


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


def write_result(trainer, out: str, tokenizer, setup, data_args, plan: Plan) -> None:
    """Plain Hugging Face files (gathered under ZeRO-3), tokenizer with chat template, generation config, state."""
    trainer.save_model(out)  # all ranks take part (ZeRO-3 gathers); only the main process writes
    if not trainer.is_world_process_zero():
        return
    trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
    tokenizer.save_pretrained(out)
    write_run_files(out, trainer, setup, data_args, plan.mode)
    if plan.mode == "full":  # the whole model: in the base checkpoint's layout (chattune.train.layout)
        model = base_model(trainer.accelerator.unwrap_model(trainer.model))
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        complete_from_base(out, plan.model, carry=skipped_on_load(model), untrained=frozen)


def set_trained_stops(model, tokenizer, setup) -> None:
    """The model's generation config stops on the trained end-of-turn tokens from the start, so every save writes
    the generation_config.json of the result: a full model's checkpoints too (their manifest records its size)."""
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(list(setup.stop_tokens)) if i is not None]
    generation = base_model(model).generation_config
    generation.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id


def write_run_files(out: str, trainer, setup, data_args, mode: str,
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
                   "stop_tokens": list(setup.stop_tokens), "mode": mode,
                   "model_max_length": trainer.args.model_max_length,
                   "base_model": trainer.model.config._name_or_path,
                   "base_fingerprint": getattr(trainer, "base_fingerprint", None), "version": __version__}, f, indent=1)
