"""The run's plan: every decision of a training run, made once, by one pure function, with the reason for each.

`make_plan(args, model, lengths, hardware, output)` reads only its arguments: the parsed flags, what the model's
class declares (`ModelClass`, read from the config), the prepared data's sample lengths, the machine
(`Hardware`, pretended in tests) and what the output directory holds (`OutputDir`). The plan it returns is frozen;
the run carries it out (`chattune.train.run`), prints it as it is (`Plan.format`) and writes it into
run_report.json (`Plan.to_dict`). Nothing downstream changes the parsed flags: the Trainer gets its own copy of
them, derived from the plan (`trainer_arguments`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from chattune.errors import ConfigError
from chattune.train.architecture import (
    ModelClass,
    choose_attention,
    compute_dtype,
    mode_of,
)
from chattune.train.batches import (
    StepShape,
    epoch_steps,
    micro_batches_per_step,
    natural_micro_batches,
)
from chattune.train.decisions import (
    Decision,
    Recompute,
    plan_experts,
    plan_objective,
    plan_optimizer,
    plan_recompute,
    plan_router_aux,
)
from chattune.train.linear_attention import kernel_problem
from chattune.train.loss import LogitTransform, liger_runs_here
from chattune.train.memory import GB, ModelShape, disk_warning, estimate, run_setup
from chattune.train.resume import OutputDir, Resume, plan_resume
from chattune.train.timing import (
    GPU_KINDS,
    DataPlan,
    estimate_seconds,
    format_duration,
    token_weighted_length,
)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: schedulers read it as "terminated", the checkpoint is on disk
EXIT_STOPPED = 130  # 128 + SIGINT: stopped by the user (Ctrl-C), the checkpoint is on disk
LARGEST_BUDGET = 16384  # tokens per packed micro-batch the planner picks at most


@dataclass(frozen=True)
class Hardware:
    """The machine and launch the run plans for: read once (`here`), pretended in tests."""

    cuda: bool = False
    gpu_name: str | None = None
    gpu_memory_gb: float = 0.0  # of one GPU; 0 when unknown
    flash_problem: str | None = "no CUDA GPU"  # why flash-attention cannot run, None when it can
    varlen_problem: str | None = "no CUDA GPU"  # why torch's varlen attention cannot run, None when it can
    liger_problem: str | None = "no CUDA GPU"  # why Liger's kernels cannot run, None when they can
    linear_attention_problem: str | None = "no CUDA GPU"  # why Gated DeltaNet kernels cannot run, None when they can
    processes: int = 1
    rank: int = 0

    @classmethod
    def here(cls, training_args: Any) -> Hardware:
        import torch

        from chattune.train.architecture import flash_attn_problem
        from chattune.train.varlen import varlen_problem

        cuda = torch.cuda.is_available() and not training_args.use_cpu
        props = torch.cuda.get_device_properties(0) if cuda else None
        return cls(cuda=cuda, gpu_name=props.name if props else None,
                   gpu_memory_gb=props.total_memory / GB if props else 0.0,
                   flash_problem=flash_attn_problem(compute_dtype(training_args)) if cuda else "no CUDA GPU",
                   varlen_problem=varlen_problem(cuda),
                   liger_problem=liger_runs_here(), linear_attention_problem=kernel_problem(cuda),
                   processes=training_args.world_size,
                   rank=training_args.process_index)

    @property
    def gpu_kind(self) -> str | None:
        """The GPU as a key of timing.GPU_KINDS, if it is one of them."""
        import re

        name = (self.gpu_name or "").upper()
        for key, pattern in (("H100", r"\bH100\b"), ("A100", r"\bA100\b"), ("L40S", r"\bL40S\b"),
                             ("RTX4090", r"\b4090\b"), ("RTX3090", r"\b3090\b")):
            if re.search(pattern, name):
                return key
        return None


@dataclass(frozen=True)
class Batch:
    """Optimizer steps and micro-batches (chattune.train.batches): the step is the user's recipe."""

    packing: Decision
    shape: StepShape
    samples_per_step: float  # global; exact, or the mean when steps are cut by tokens
    tokens_per_step: int  # global real tokens per step, the mean
    micro_batches_per_step: int  # per process: the Trainer's gradient accumulation
    steps_per_epoch: int
    steps: int
    epochs: float
    peak_micro_batch_tokens: int  # the largest micro-batch of the first epoch, padding included
    processed_tokens_per_epoch: int  # what the GPUs compute per epoch, padding included

    def data_summary(self, lengths: np.ndarray) -> DataPlan:
        """The planner's view of the data as these steps batch it."""
        return DataPlan(len(lengths), int(lengths.sum()), self.processed_tokens_per_epoch,
                        self.steps_per_epoch * self.micro_batches_per_step * self.shape.processes,
                        self.peak_micro_batch_tokens, token_weighted_length(lengths), self.shape.packed)


@dataclass(frozen=True)
class Schedule:
    evaluation: str  # when, in words
    eval_strategy: str  # what the Trainer is told: no | steps | epoch
    eval_steps: float | None
    evaluate_after_training: bool
    saves: str


@dataclass(frozen=True)
class Plan:
    model: str
    mode: str  # full | lora | qlora
    dtype: str
    processes: int
    deepspeed: str | None
    attention: Decision
    sample_boundaries: bool  # packed rows carry cu_seq_lens: flash-attention and linear-attention layers read them
    batch: Batch
    loss: Decision  # liger | chunked | none
    logit_transform: LogitTransform
    recompute: Recompute
    schedule: Schedule
    resume: Resume
    stop: str
    memory_gb: float | None
    time: str | None
    notes: tuple[str, ...] = ()
    router_aux: float | None = None  # MoE: the load-balancing loss's weight (0: off); None: no routers to record
    router_aux_why: str = ""
    optimizer: Decision = Decision("adamw_torch", "")
    experts: Decision | None = None  # MoE: how the experts run
    objective: Decision | None = None  # --stage dpo: the preference loss, and where its reference log-probs come from
    adapted: dict[str, Any] | None = None  # after the model is built: trainable parameters, modules trained in full

    def with_model(self, **facts: Any) -> Plan:
        return dataclasses.replace(self, adapted=facts)

    def to_dict(self) -> dict[str, Any]:
        """The plan as run_report.json holds it (and as `format` prints it): every decision with its reason."""
        b, a = self.batch, self.adapted or {}
        return {
            "model": self.model, "mode": self.mode, "dtype": self.dtype, "processes": self.processes,
            "deepspeed": self.deepspeed or "-",
            "attention": self.attention.choice, "attention_why": self.attention.why,
            "batches": (f"packed, {b.shape.budget} tokens per micro-batch" if b.shape.packed else "padded"),
            "batches_why": b.packing.why,
            "global_batch_samples": round(b.samples_per_step, 1), "global_batch_tokens": b.tokens_per_step,
            "tokens_per_step": b.shape.tokens_per_step or None, "micro_batches_per_step": b.micro_batches_per_step,
            "samples_per_micro_batch": None if b.shape.packed else b.shape.per_device,
            "steps": b.steps, "steps_per_epoch": b.steps_per_epoch, "epochs": b.epochs,
            "loss": "standard" if self.loss.choice == "none" else f"fused linear+CE ({self.loss.choice})",
            "loss_why": self.loss.why, "logit_transform": self.logit_transform.describe(),
            "objective": self.objective.choice if self.objective else "supervised (cross-entropy on trained tokens)",
            "reference": self.objective.why if self.objective else None,
            "optimizer": self.optimizer.choice, "optimizer_why": self.optimizer.why,
            "experts": self.experts.choice if self.experts else None,
            "experts_why": self.experts.why if self.experts else None,
            "router_aux_loss_coef": self.router_aux, "router_aux_why": self.router_aux_why or None,
            "gradient_checkpointing": self.recompute.decision.choice,
            "gradient_checkpointing_why": self.recompute.decision.why,
            "evaluation": self.schedule.evaluation, "saves": self.schedule.saves,
            "resume": self.resume.source, "resume_why": self.resume.why,
            "set_aside": list(self.resume.set_aside), "removed": list(self.resume.remove), "stop": self.stop,
            "estimated_gb_per_gpu": self.memory_gb, "estimated_time": self.time,
            "trainable_params": a.get("trainable_params"), "total_params": a.get("total_params"),
            "modules_to_save": a.get("modules_to_save_reason") or "-", "adapters": a.get("adapters"),
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """The plan as printed before training: the same values as `to_dict`."""
        p = self.to_dict()
        if p["logit_transform"] != "none":
            p["loss"] += f", logit transform {p['logit_transform']}"
        unit = "pairs" if self.objective else "samples"
        step = (f"{p['global_batch_samples']:g} {unit}" if not p["tokens_per_step"]
                else f"~{p['global_batch_samples']:g} {unit} (steps of ~{p['tokens_per_step']:,} tokens)")
        cut = (f"at most {p['samples_per_micro_batch']} {unit} each, padded to their longest"
               if p["samples_per_micro_batch"] else p["batches"].split(", ", 1)[1])
        lines = [
            "plan:",
            f"  model      {p['model']}",
            f"  mode       {p['mode']} ({p['dtype']}, {p['processes']} process(es), deepspeed {p['deepspeed']})",
        ]
        if p["trainable_params"] is not None:
            pct = 100 * p["trainable_params"] / max(1, p["total_params"])
            lines.append(f"  trainable  {p['trainable_params']:,} of {p['total_params']:,} parameters ({pct:.2f}%)")
            if p["adapters"]:
                lines.append("  adapters   " + "; ".join(f"{a['kind']} {a['modules']} ({a['params']:,} parameters)"
                                                       for a in p["adapters"]))
            lines.append(f"  embeddings {p['modules_to_save']}" if p["mode"] != "full"
                         else "  embeddings trained (full fine-tuning)")
        lines += [
            f"  attention  {p['attention']}: {p['attention_why']}",
            f"  batches    {p['batches'].split(',')[0]}: {p['batches_why']}",
            f"  batch      {step}, ~{p['global_batch_tokens']:,} tokens per optimizer step; "
            f"{p['micro_batches_per_step']} micro-batch(es) per process and step, {cut}",
            f"  steps      {p['steps']} ({p['steps_per_epoch']} per epoch, {p['epochs']:g} epoch(s))"
            + (f", {p['estimated_time']}" if p["estimated_time"] else ""),
            *([f"  objective  {p['objective']}; reference: {p['reference']}"] if self.objective else []),
            f"  loss       {p['loss']}: {p['loss_why']}",
            *([f"  routers    load-balancing loss x {p['router_aux_loss_coef']:g} ({p['router_aux_why']})"
               if p["router_aux_loss_coef"] else f"  routers    no load-balancing loss ({p['router_aux_why']})"]
              if p["router_aux_loss_coef"] is not None else []),
            f"  optimizer  {p['optimizer']}: {p['optimizer_why']}",
            *([f"  experts    {p['experts']}: {p['experts_why']}"] if p["experts"] else []),
            f"  recompute  {p['gradient_checkpointing']}: {p['gradient_checkpointing_why']}",
            f"  eval       {p['evaluation']}",
            f"  saves      {p['saves']}",
            f"  resume     {p['resume'] or 'no'}: {p['resume_why']}",
            f"  stop       {p['stop']}",
            f"  memory     ~{p['estimated_gb_per_gpu']} GB per GPU (estimate; --estimate_memory for the breakdown)"
            if p["estimated_gb_per_gpu"] else "  memory     (no estimate for this architecture)",
        ]
        return "\n".join(lines + [f"  note       {note}" for note in p["notes"]])


# --------------------------------------------------------------------------------------------------------------
# The decisions
# --------------------------------------------------------------------------------------------------------------


def make_plan(model_args: Any, data_args: Any, training_args: Any, lora_args: Any, cls: ModelClass,
              lengths: Any, hardware: Hardware, output: OutputDir, *, has_eval: bool,
              transform: LogitTransform = LogitTransform(), shape: ModelShape | None = None) -> Plan:
    """Every decision of the run from its inputs alone (see the module docstring). Raises ConfigError for
    combinations that cannot run."""
    lengths = np.asarray(lengths, dtype=np.int64)
    mode = _mode(model_args, training_args, lora_args, cls)
    attention = choose_attention(model_args.attn_implementation, training_args.packing, cls, cuda=hardware.cuda,
                                 flash_problem=hardware.flash_problem, varlen_problem=hardware.varlen_problem)
    notes = list(attention.notes) + ([f"{cls.quantized} base: LoRA on its quantized linear layers"]
                                     if cls.quantized else [])
    if cls.linear_attention and hardware.linear_attention_problem:
        notes.append("Gated DeltaNet layers run the slow torch path (exact, much slower than the CUDA kernels): "
                     f"{hardware.linear_attention_problem}")
    if training_args.compile_layers:
        notes.append("decoder layers compiled (torch.compile per layer, --compile_layers): the first steps are slow")
    packing = Decision("packed" if attention.packing else "padded", _packing_why(training_args.packing, attention))
    setup = run_setup(training_args, lora_args, mode, hardware.processes)
    experts = plan_experts(model_args, cls, mode, setup.zero_stage)
    setup = dataclasses.replace(setup, nf4_experts=experts is not None and experts.choice == "nf4")
    budget = plan_budget(training_args, shape, setup, hardware) if attention.packing else 0
    batch = plan_batch(training_args, lengths, hardware.processes, packing, budget)
    setup = dataclasses.replace(setup, micro_batch_tokens=max(batch.peak_micro_batch_tokens, 1))
    recompute = plan_recompute(training_args, shape, setup, hardware.gpu_memory_gb, hardware.cuda)
    setup = recompute.setup(setup)
    memory_gb = round(estimate(shape, setup)["total"] / GB, 1) if shape is not None else None
    time = _time(shape, setup, batch, lengths, hardware) if shape is not None else None
    disk = disk_warning(training_args, lora_args, mode, shape, batch.steps, output.free_bytes) if shape else None
    return Plan(
        model=model_args.model_name_or_path, mode=mode, dtype=str(compute_dtype(training_args)).replace("torch.", ""),
        processes=hardware.processes, deepspeed=training_args.deepspeed or None,
        attention=Decision(attention.implementation or "the model's own", _attention_why(model_args, attention, cls)),
        sample_boundaries=attention.packing and (cls.linear_attention or (attention.implementation or "").startswith(
            ("flash_attention", "torch_varlen"))),
        batch=batch, loss=plan_loss(training_args, lora_args, cls, mode, hardware), logit_transform=transform,
        objective=plan_objective(training_args, mode),
        recompute=recompute, schedule=plan_schedule(training_args, has_eval),
        resume=plan_resume(training_args, output), stop=STOP_CONTRACT, memory_gb=memory_gb, time=time,
        notes=tuple(notes + ([disk] if disk else [])), **plan_router_aux(training_args, cls),
        optimizer=plan_optimizer(training_args, hardware), experts=experts,
    )


def check_model_flags(model_args: Any, training_args: Any, lora_args: Any, cls: ModelClass, hardware: Hardware
                      ) -> None:
    """The decisions that can fail on the flags and the model's class alone, taken before any data is read (so a
    combination that cannot run is refused in seconds); make_plan takes them again, with the data."""
    mode = _mode(model_args, training_args, lora_args, cls)
    choose_attention(model_args.attn_implementation, training_args.packing, cls, cuda=hardware.cuda,
                     flash_problem=hardware.flash_problem, varlen_problem=hardware.varlen_problem)
    plan_loss(training_args, lora_args, cls, mode, hardware)
    plan_objective(training_args, mode)


STOP_CONTRACT = ("SIGTERM, SIGUSR1 or $CHATTUNE_STOP_FILE: a checkpoint at the end of the current step on every rank, "
                 f"exit {EXIT_PREEMPTED} (slurm.sbatch requeues then); Ctrl-C (SIGINT): the same, exit {EXIT_STOPPED} "
                 "(a second Ctrl-C stops at once); the same command resumes. After the last step: the result is "
                 "saved, exit 0")


def _mode(model_args: Any, training_args: Any, lora_args: Any, cls: ModelClass) -> str:
    """full, lora or qlora; a quantized checkpoint trains LoRA on its quantized layers (GPTQ only)."""
    name, method = model_args.model_name_or_path, cls.quantized
    if method and not training_args.use_lora:
        raise ConfigError(f"{name} is a {method}-quantized model: its weights cannot be fine-tuned in full. Train a "
                          "LoRA adapter on it (--use_lora --q_lora), or fine-tune the full-precision model")
    if method and method != "gptq":
        raise ConfigError(f"{name} is a {method}-quantized model; chattune trains LoRA on float, NF4 (--q_lora) and "
                          "GPTQ bases. Use the full-precision model with --q_lora")
    return "qlora" if method else mode_of(training_args, lora_args)


def _packing_why(requested: str, attention: Any) -> str:
    if requested != "auto":
        return f"--packing {requested}"
    if attention.packing:
        return f"{attention.implementation} skips the other samples' blocks of a packed row"
    return next((n.removeprefix("padded batches: ") for n in attention.notes if n.startswith("padded")), "auto")


def _attention_why(model_args: Any, attention: Any, cls: ModelClass) -> str:
    if attention.implementation is None:
        return f"{cls.name} runs its own (remote) code"
    if model_args.attn_implementation != "auto":
        return f"--attn_implementation {model_args.attn_implementation}"
    return {"flash_attention_2": "flash-attention runs here and the model supports it",
            "flex_attention": "packed rows on CUDA without flash-attention"}.get(
        attention.implementation, "no CUDA attention kernel that skips masked blocks here")


def plan_budget(training_args: Any, shape: ModelShape | None, setup: Any, hardware: Hardware) -> int:
    """Tokens per packed micro-batch: --max_tokens_per_batch, else the largest power of two (up to 16,384) whose
    estimated peak fits in 90% of this GPU, else the padded worst case (batch x max length)."""
    given = training_args.max_tokens_per_batch
    longest = training_args.model_max_length * (2 if getattr(training_args, "pairs", False) else 1)  # a pair: two
    floor = training_args.per_device_train_batch_size * longest
    if given:
        if given < longest:
            what = "twice --model_max_length (a pair holds two sequences)" if longest > training_args.model_max_length \
                else "--model_max_length"
            raise ConfigError(f"--max_tokens_per_batch {given} is below {what} {longest}: the longest samples would "
                              "fit no micro-batch")
        return given
    if shape is None or not hardware.gpu_memory_gb:
        return floor
    fits = [2**k for k in range(10, 15) if 2**k >= longest and 2**k <= LARGEST_BUDGET
            and estimate(shape, dataclasses.replace(setup, micro_batch_tokens=2**k))["total"] / GB
            <= 0.9 * hardware.gpu_memory_gb]
    return max(fits + [longest]) if fits else max(floor, longest)


def plan_batch(training_args: Any, lengths: np.ndarray, processes: int, packing: Decision, budget: int) -> Batch:
    """Steps of exactly the samples the user asked for (or of --tokens_per_step tokens), cut into micro-batches."""
    per_step = 0 if training_args.tokens_per_step else (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * processes)
    shape = StepShape(per_step, training_args.tokens_per_step, training_args.per_device_train_batch_size, budget,
                      processes, training_args.data_seed or training_args.seed)
    if shape.packed and len(lengths) and int(lengths.max()) > budget:
        raise ConfigError(f"--max_tokens_per_batch {budget} is below the longest sample ({int(lengths.max())} "
                          "tokens): it would fit no micro-batch; raise it to at least --model_max_length")
    steps_per_epoch = len(epoch_steps(lengths, shape, 0)) if len(lengths) else 0
    if training_args.max_steps > 0:
        steps, epochs = training_args.max_steps, training_args.max_steps / max(steps_per_epoch, 1)
    else:
        epochs = training_args.num_train_epochs
        steps = math.ceil(steps_per_epoch * epochs)
    k = micro_batches_per_step(lengths, shape, math.ceil(epochs)) if len(lengths) else 1
    first = [natural_micro_batches(s, lengths, shape) for s in epoch_steps(lengths, shape, 0)] if len(lengths) else []
    widths = [int(lengths[b].sum()) if shape.packed else int(lengths[b].max()) * len(b) for s in first for b in s]
    real = int(lengths.sum())
    return Batch(packing, shape, samples_per_step=len(lengths) / max(steps_per_epoch, 1) if not per_step else per_step,
                 tokens_per_step=round(real / max(steps_per_epoch, 1)), micro_batches_per_step=k,
                 steps_per_epoch=steps_per_epoch, steps=steps, epochs=round(epochs, 4),
                 peak_micro_batch_tokens=max(widths, default=0),
                 processed_tokens_per_epoch=sum(widths))


def plan_loss(training_args: Any, lora_args: Any, cls: ModelClass, mode: str, hardware: Hardware) -> Decision:
    """The loss path: fused (Liger on CUDA, else chunked) where the model's hidden states can be taken, else the
    model's own logits. Checked against the model's own loss on the first micro-batch when training starts."""
    from chattune.train.memory import zero_setup_from_config

    requested = training_args.fused_ce
    zero3 = zero_setup_from_config(training_args.deepspeed)[0] == 3
    if requested == "none":
        return Decision("none", "--fused_ce none")
    if not cls.logits_to_keep:
        if requested != "auto":
            raise ConfigError(f"--fused_ce {requested}: {cls.name}'s forward has no logits_to_keep (remote code); "
                              "use --fused_ce none")
        return Decision("none", f"{cls.name}'s forward has no logits_to_keep (remote code)")
    liger_problem = hardware.liger_problem or ("ZeRO-3 partitions the output layer" if zero3 else None) or (
        "remote code: its output layer may not be a plain linear layer" if cls.remote_code else None)
    if requested == "liger" and getattr(training_args, "pairs", False):
        raise ConfigError("--fused_ce liger: preference losses need every sequence's log-prob, and Liger's fused "
                          "kernel gives one sum; use --fused_ce auto or chunked")
    if requested == "liger":
        if liger_problem:
            raise ConfigError(f"--fused_ce liger: {liger_problem}; use --fused_ce chunked")
        return Decision("liger", "--fused_ce liger")
    frozen_head = mode != "full" and lora_args.lora_modules_to_save in ("auto", "none")
    if zero3 and frozen_head:
        # The chunked loss recomputes the output layer in backward, outside any module's backward: ZeRO-3 re-gathers
        # a trainable output layer there but not a frozen one (deepspeed 0.19.8), and under `auto` whether the
        # output layer is trained is known only once the weights are read.
        if requested == "chunked":
            raise ConfigError("--fused_ce chunked does not work with a frozen output layer under ZeRO-3 (LoRA/Q-LoRA);"
                              " use --fused_ce auto or none, or ZeRO-2")
        return Decision("none", "ZeRO-3 with a frozen output layer (the chunked loss cannot re-gather it)")
    if requested == "chunked":
        return Decision("chunked", "--fused_ce chunked")
    if getattr(training_args, "pairs", False):
        return Decision("chunked", "chunks of the output layer, recomputed in backward (preference losses need "
                                   "per-sequence log-probs)")
    if hardware.cuda and liger_problem is None:
        return Decision("liger", "Liger's fused kernel on CUDA")
    why = "no CUDA GPU" if not hardware.cuda else liger_problem
    return Decision("chunked", f"chunks of the output layer, gradients formed in the forward (Liger's kernel: {why})")


def _every(steps: float) -> str:
    """--save_steps / --eval_steps in words: a number of steps, or (below 1) a share of the run, as transformers
    reads it."""
    return f"every {steps:g} steps" if steps >= 1 else f"every {steps:.0%} of the run"


def plan_schedule(training_args: Any, has_eval: bool) -> Schedule:
    """Evaluation data given means evaluation happens: as --eval_strategy says, else with every checkpoint, else once
    after training."""
    save = str(getattr(training_args.save_strategy, "value", training_args.save_strategy))
    strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    limit = training_args.save_total_limit
    saves = {"steps": _every(training_args.save_steps), "epoch": "every epoch", "best": "at a new best",
             "no": "none"}.get(save, save) + (f", the newest {limit} kept" if limit and save != "no" else "")
    if not has_eval:
        return Schedule("none (no evaluation data)", "no", None, False, saves)
    if strategy == "steps":
        return Schedule(_every(training_args.eval_steps), "steps", training_args.eval_steps, False, saves)
    if strategy == "epoch":
        return Schedule("every epoch", "epoch", None, False, saves)
    if save == "steps":
        return Schedule(f"{_every(training_args.save_steps)} (with each checkpoint)", "steps",
                        training_args.save_steps, False, saves)
    if save == "epoch":
        return Schedule("every epoch (with each checkpoint)", "epoch", None, False, saves)
    return Schedule("once, after training", "no", None, True, saves)


def _time(shape: ModelShape, setup: Any, batch: Batch, lengths: np.ndarray, hardware: Hardware) -> str | None:
    kind = hardware.gpu_kind
    if kind is None or not len(lengths):
        return None
    micro_batches = batch.steps * batch.micro_batches_per_step
    tokens = batch.processed_tokens_per_epoch / max(batch.steps_per_epoch, 1) / batch.shape.processes * batch.steps
    seconds = estimate_seconds(shape, setup, tokens, kind, sequence_tokens=token_weighted_length(lengths),
                               micro_batches=micro_batches)
    return f"~{format_duration(seconds)} on {GPU_KINDS[kind].name} (estimate)"


def trainer_arguments(plan: Plan, training_args: Any) -> Any:
    """The Trainer's own copy of the flags, as the plan decided them (the parsed flags stay as the user gave them)."""
    changes: dict[str, Any] = dict(
        remove_unused_columns=False,  # our columns are named for the collator, not the model signature
        label_names=["labels"],  # a PeftModel hides the signature Trainer infers label names from
        gradient_accumulation_steps=plan.batch.micro_batches_per_step, optim=plan.optimizer.choice,
        eval_strategy=plan.schedule.eval_strategy, do_eval=plan.schedule.eval_strategy != "no",
        # a nan/inf loss is logged as what it is and ends the run (callbacks.DivergenceCallback); the stock filter logs
        # the window's earlier mean instead (0 when every step is nan), and reads each micro-batch's loss on the host
        logging_nan_inf_filter=False,
    )
    if plan.schedule.eval_steps is not None:
        changes["eval_steps"] = plan.schedule.eval_steps
    if training_args.include_num_input_tokens_seen in (False, "no"):
        changes["include_num_input_tokens_seen"] = "all" if plan.batch.shape.packed else "non_padding"
    recompute = plan.recompute
    changes["activation_checkpointing"] = recompute.every > 0
    if recompute.every > 0:
        kwargs = training_args.activation_checkpointing_kwargs
        kwargs = dict(kwargs) if isinstance(kwargs, dict) else {"use_reentrant": False}
        changes["activation_checkpointing_kwargs"] = {**kwargs, "every_n_layers": recompute.every,
                                                      "offload": recompute.offload}
    return dataclasses.replace(training_args, **changes)
