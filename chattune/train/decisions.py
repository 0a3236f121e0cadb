"""Decisions of the plan that stand on their own: the optimizer, the recompute (activation checkpointing) for the GPU
at hand, the MoE routers' load-balancing loss, and the preference objective. Each returns what it chose with the reason, for
`chattune.train.plan.make_plan`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chattune.errors import ConfigError
from chattune.train.architecture import ModelClass
from chattune.train.memory import (
    RECOMPUTE_HEADROOM,
    ModelShape,
    Setup,
    least_recompute,
    recompute_asked,
    recompute_words,
    with_recompute,
    zero_setup_from_config,
)


@dataclass(frozen=True)
class Decision:
    choice: str
    why: str


def plan_optimizer(training_args: Any, hardware: Any) -> Decision:
    """--optim, or for auto: torch's fused AdamW on CUDA (one kernel launch per step instead of several per tensor,
    as transformers defaults to), the plain one on CPU and with ZeRO-Offload (DeepSpeed steps the optimizer itself
    on the CPU there)."""

    requested = getattr(training_args, "optim_requested", str(training_args.optim))
    if requested != "auto":
        return Decision(requested, "--optim")
    if zero_setup_from_config(training_args.deepspeed)[1]:
        return Decision("adamw_torch", "ZeRO-Offload: the optimizer steps on the CPU")
    if hardware.cuda:
        return Decision("adamw_torch_fused", "fused AdamW on CUDA")
    return Decision("adamw_torch", "no CUDA GPU")


def plan_router_aux(training_args: Any, cls: ModelClass) -> dict[str, Any]:
    """The MoE routers' load-balancing loss: --router_aux_loss_coef, else the config's coefficient where the class
    computes that loss (its experts' loads are recorded either way)."""
    given = training_args.router_aux_loss_coef
    if cls.router_aux is None:
        if given:
            raise ConfigError(f"--router_aux_loss_coef {given}: {cls.name} computes no router load-balancing loss "
                              "(a dense model, or an MoE class without one); leave the flag out")
        return {}
    if given is not None and given < 0:
        raise ConfigError(f"--router_aux_loss_coef {given}: must be 0 (off) or positive")
    if getattr(training_args, "pairs", False):  # the preference losses compare answers; the routers stay as they are
        if given:
            raise ConfigError(f"--router_aux_loss_coef {given}: preference training (--stage dpo) adds no "
                              "load-balancing loss; leave the flag out")
        return {"router_aux": 0.0, "router_aux_why": "preference training adds none"}
    if given is not None:
        return {"router_aux": float(given), "router_aux_why": f"--router_aux_loss_coef {given:g}"}
    return {"router_aux": cls.router_aux, "router_aux_why": "the model config's router_aux_loss_coef"}


@dataclass(frozen=True)
class Recompute:
    decision: Decision
    every: int = 0  # 0: off; n: every n-th decoder layer recomputed (1: all)
    offload: bool = False  # the recomputed layers' inputs kept in host memory

    def setup(self, setup: Setup) -> Setup:
        """The planner's setup with this recompute."""
        return with_recompute(setup, self.every, self.offload)


def plan_recompute(training_args: Any, shape: ModelShape | None, setup: Setup, gpu_memory_gb: float,
                   cuda: bool) -> Recompute:
    """--gradient_checkpointing as given; else the least recompute whose estimate fits 90% of the GPU: none, every
    4th, 3rd or 2nd layer, all layers, then all with their inputs in host memory (memory.least_recompute). Off on
    CPU (no memory to save), all layers where the GPU's memory or the model's size is unknown."""
    asked = recompute_asked(training_args)
    if asked is not None:
        kwargs = training_args.activation_checkpointing_kwargs or {}
        kwargs = kwargs if isinstance(kwargs, dict) else {}
        every, offload = int(kwargs.get("every_n_layers", 1)), bool(kwargs.get("offload", False))
        flag = f"--gradient_checkpointing {asked}"
        if not asked:
            return Recompute(Decision("off", flag))
        return Recompute(Decision(recompute_words(every, offload), flag), every, offload)
    if not cuda:
        return Recompute(Decision("off", "no CUDA GPU: no device memory to save (--gradient_checkpointing True to "
                                         "force)"))
    if shape is None or not gpu_memory_gb:
        return Recompute(Decision("all layers", "the GPU's memory or the model's size is unknown"), 1)
    every, offload, gb = least_recompute(shape, setup, gpu_memory_gb)
    fit = "fits" if gb <= RECOMPUTE_HEADROOM * gpu_memory_gb else "is still above"
    less = "" if every == 0 else " (less recompute does not fit)"
    why = f"the estimate {gb:.1f} GB {fit} 90% of the GPU's {gpu_memory_gb:g} GB{less}"
    return Recompute(Decision(recompute_words(every, offload), why), every, offload)


def plan_experts(model_args: Any, cls: ModelClass, mode: str = "lora", zero_stage: int = 0) -> Decision | None:
    """How an MoE model's experts run: --experts_implementation, else under Q-LoRA 4-bit stacks (nf4,
    chattune.train.experts4bit), else transformers' grouped GEMM (one kernel over all experts and their tokens,
    instead of a Python loop over the experts). None for a model without fused experts."""
    given = model_args.experts_implementation
    if not cls.experts:
        if given != "auto":
            raise ConfigError(f"--experts_implementation {given}: {cls.name} has no fused MoE experts whose "
                              "implementation can be chosen; leave the flag out")
        return None
    nf4 = mode == "qlora" and not cls.quantized and zero_stage != 3
    if given == "nf4" and not nf4:
        raise ConfigError("--experts_implementation nf4 stores the experts in 4 bits, for --q_lora on a float base "
                          "without ZeRO-3; leave the flag out")
    if given == "nf4" or (given == "auto" and nf4):
        return Decision("nf4", "Q-LoRA: the fused experts are stored in 4 bits (bitsandbytes quantizes only nn.Linear) "
                        "and dequantized one expert at a time")
    bf16 = " (the experts stay in bf16)" if nf4 else ""
    if given != "auto":
        return Decision(given, f"--experts_implementation{bf16}")
    if mode == "qlora" and not cls.quantized:  # ZeRO-3 partitions each stack over the ranks
        bf16 = " (ZeRO-3: the experts stay in bf16, partitioned; 4-bit experts need whole stacks)"
    return Decision("grouped_mm", f"transformers' grouped GEMM over all experts at once (not a loop over them){bf16}")


def plan_objective(training_args: Any, mode: str) -> Decision | None:
    """--stage dpo: the preference loss, and where the reference log-probs come from (the reason)."""
    from chattune.train.preference import PrefLoss

    if not getattr(training_args, "pairs", False):
        return None
    objective = PrefLoss.from_args(training_args)
    if objective.reference_free:
        return Decision(objective.describe(), "none (reference-free loss: no reference weights, no second forward)")
    if mode != "full":
        return Decision(objective.describe(), "the base model with the adapter disabled (no second copy of the "
                                              "weights; one more forward without gradients per micro-batch)")
    if zero_setup_from_config(training_args.deepspeed)[0] == 3:
        return Decision(objective.describe(), "a frozen copy of the base model, partitioned like the policy (ZeRO-3; "
                                              "one more forward without gradients)")
    return Decision(objective.describe(), "a frozen copy of the base model (full fine-tuning: one more copy of the "
                                          "weights in memory, one more forward without gradients)")
