"""Trainer callbacks: preemption (signals, a stop file), the run's clock, per-epoch reshuffling of packed bins, the
loss logged at the last step, a loss that is not a number, the loss plot."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import torch
from transformers import TrainerCallback


class PreemptionCallback(TrainerCallback):
    """On SIGTERM/SIGUSR1 (cluster preemption, SLURM's --signal), SIGINT (Ctrl-C), or when the file named by
    $CHATTUNE_STOP_FILE appears, save a checkpoint at the end of the current step and stop (a second Ctrl-C stops at
    once, without a checkpoint). Every rank stops at the same step: the flag is
    reduced across ranks once per step.

    A signal that lands after the last step's check stops nothing: `stopped_early` stays False, training has finished
    and the caller saves the result as usual. `checkpoint` is the directory actually written for the stop, if any.

    The stop file is for launchers that do not forward signals to the training processes intact (torchrun gives its
    workers 30 s after a SIGTERM, which is too short to save a large model): finetune/slurm.sbatch traps the
    scheduler's signal and touches the file instead."""

    def __init__(self) -> None:
        self.signal: int = 0  # the signal received (on this rank), whenever it came
        self.stopped_early = False  # training stopped before its last step because of a signal (same on all ranks)
        self.checkpoint: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signal:  # Ctrl-C twice: now, not at the end of the step
                raise KeyboardInterrupt
            print("\nCtrl-C: a checkpoint is saved at the end of this step, then the run stops (Ctrl-C again to stop "
                  "at once, without one)", file=sys.stderr, flush=True)
        self.signal = signum

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
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
            self.stopped_early = state.global_step < state.max_steps
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_early:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.checkpoint = path if os.path.isdir(path) else None

    def restore_handlers(self) -> None:
        """The signal handlers from before training, put back by the caller once `train()` has returned or raised (not
        at on_train_end: a signal between that and the return would meet the pre-training handler)."""
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler)


class ThroughputCallback(TrainerCallback):
    """Wall time and tokens of this process's training loop (a resumed run counts only its own tokens and time)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0
        self.tokens_at_start = 0
        self.tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen or 0  # restored from the checkpoint when resuming

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start
        self.tokens = (state.num_input_tokens_seen or 0) - self.tokens_at_start

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class EpochCallback(TrainerCallback):
    """Reshuffles the packed micro-batches every epoch (also after a resume)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.sampler is not None:
            self.sampler.set_epoch(int(state.epoch or 0))


class LastStepLogCallback(TrainerCallback):
    """Logs the loss at the last optimizer step. The Trainer's summary `train_loss` adds the steps since the last log
    as this process's own loss, not the mean over processes (trainer.py L1998): on two ZeRO-3 ranks a 2-step run
    reported 17.1 where every logged step said 12.8. Logged, those steps are averaged over the ranks like every
    logged loss, and the summary is the mean of what was logged."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


LOSS_PLOT = "loss.png"


class DivergenceCallback(TrainerCallback):
    """Ends the run at the end of the first optimizer step whose loss was nan or inf on any rank, before that step is
    saved or evaluated: its update made the weights not numbers too, and every later step would be wasted. `step`
    says where, for the error the run ends with (run.train)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.trainer.take_nonfinite()
        if flag is None:
            return
        flag = flag.float()
        if args.world_size > 1:  # every rank stops at the same step (the others' gradients are nan too by now)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            self.step = state.global_step
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False


def plot_loss(log_history: list[dict], path: str | os.PathLike) -> bool:
    """Training loss, evaluation loss and the learning rate against the step, from Trainer's log history, as a PNG
    (written to a temporary name, then renamed). False when there is nothing to plot yet."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    rates = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "step" in h]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="evaluation loss", linewidth=1.5)
        best = min(evals, key=lambda e: e[1])
        axes.annotate(f"best {best[1]:.4f}", best, textcoords="offset points", xytext=(0, -14), ha="center")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (per trained token)")
    axes.grid(alpha=0.3)
    lines, labels = axes.get_legend_handles_labels()
    if rates:
        rate_axes = axes.twinx()
        rate_axes.plot(*zip(*rates, strict=True), color="gray", linestyle=":", label="learning rate", linewidth=1)
        rate_axes.set_ylabel("learning rate")
        more, more_labels = rate_axes.get_legend_handles_labels()
        lines, labels = lines + more, labels + more_labels
    axes.legend(lines, labels, loc="best", framealpha=0.8)
    figure.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    figure.savefig(tmp)
    os.replace(tmp, path)
    return True


class LossPlotCallback(TrainerCallback):
    """Writes loss.png next to trainer_state.json: in each checkpoint and in the output directory, refreshed at every
    save and at the end, so a user looks at the curves instead of parsing JSON. A plot that cannot be written is a
    warning, never a failed run."""

    def _write(self, args, state, folder: str) -> None:
        if not state.is_world_process_zero:
            return
        try:
            if os.path.isdir(folder):
                plot_loss(state.log_history, os.path.join(folder, LOSS_PLOT))
        except Exception as e:  # noqa: BLE001 - a plot must never cost the run
            from chattune.cli import log

            log(f"warning: could not write {LOSS_PLOT} in {folder}: {e}")

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        self._write(args, state, args.output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state, args.output_dir)


class CheckpointFilesCallback(TrainerCallback):
    """Writes the run's own files (`write(folder)`: generation config with the trained stops, chattune.json) into
    each checkpoint, so what is merged or served from a checkpoint behaves like the result. A file that cannot be
    written is a warning naming the checkpoint: the weights are saved, and the result gets the files at the end."""

    def __init__(self, write) -> None:
        self.write = write

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not state.is_world_process_zero or not os.path.isdir(folder):
            return
        try:
            self.write(folder)
        except Exception as e:  # noqa: BLE001 - a missing extra file must never cost the run
            from chattune.cli import log

            log(f"warning: could not write the generation config and chattune.json into {folder}: "
                f"{getattr(e, 'strerror', None) or e}; the final result will have them")
