#!/usr/bin/env python
"""Training throughput: Qwen's finetune.py recipe ("baseline") against chattune, each side in its own process.

    python bench/throughput.py                         # full-1.5b, lora-7b, qlora-7b on one GPU (~8 min per suite)
    python bench/throughput.py --runs lora-7b --steps 20
    python bench/throughput.py --deadline 420          # the whole table inside 7 minutes: late sides are skipped
    python bench/throughput.py --tiny                  # CPU smoke test with a tiny shape (no timing value)

Models are random-init with the real Qwen2.5 shapes (configs written below, nothing downloaded); data are synthetic
conversations with lognormal lengths (median 400 tokens, the answer ~70% of each sample). Every side runs through the
same ChatTrainer code path a user runs with Qwen's recipe: the same 16 samples per optimizer step, in the same order.
They differ in how those samples are cut into micro-batches and computed:

* baseline, Qwen's recipe: every sample padded to model_max_length, Qwen's per_device_train_batch_size (full: 1,
  LoRA/Q-LoRA: 2), sdpa attention, the model's own loss from full logits, no Liger kernels, all layers recomputed,
  adamw_torch.
* anchor: chattune's kernels at the packed budget of DESIGN.md's measured anchors (8,192 tokens for the 1.5B full
  run, 4,096 for 7B LoRA and Q-LoRA), recompute and optimizer as the baseline: the row to compare with the anchors.
* chattune, a real run's defaults on this GPU: padding-free packing into micro-batches of the budget the planner
  picks from the GPU's memory, the recompute it picks (none, every n-th layer, all), flex_attention (CUDA; sdpa on
  CPU), fused linear+cross-entropy loss (Liger on CUDA, chunked on CPU), Liger RMSNorm/SwiGLU/RoPE kernels (CUDA,
  when installed), fused AdamW on CUDA.

Liger patches the Qwen2 classes of the whole process, so the parent runs every side of every suite as a child process
(`--side NAME --runs SUITE`) that prints one `RESULT {json}` line. The parent prints one table per suite: real
(non-padding) tokens/s, MFU, allocated and reserved peaks beside the planner's estimate, first/last loss. A child
that fails, runs past --timeout, or would start after --deadline gets a "failed: ...", "timed out" or "skipped" row and
the other rows still print.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from importlib.metadata import version
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

QWEN25 = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}
# Qwen3.5 (Gated DeltaNet hybrid): transformers' Qwen3_5TextConfig defaults (32 layers, hidden 4096, every 4th layer
# softmax attention, ~9B parameters), and a 4-layer tiny one (3 linear + 1 full attention) for the CPU smoke run.
QWEN35 = {
    "9b": dict(),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=4, vocab_size=4096,
                 layer_types=["linear_attention"] * 3 + ["full_attention"]),
}


@dataclass(frozen=True)
class Suite:
    label: str
    mode: str  # full | lora | qlora
    size: str  # key of QWEN25
    max_length: int  # model_max_length: the baseline pads every sample to it
    batch_size: int  # Qwen's per_device_train_batch_size for this mode
    median_length: int = 400  # of the synthetic samples, in tokens
    arch: str = "qwen2"  # qwen2 (QWEN25 shapes) | qwen3_5 (QWEN35 shapes: Gated DeltaNet hybrid)
    anchor_tokens: int = 4096  # packed budget of DESIGN.md's measured anchors (the `anchor` side)

    @property
    def vocab_size(self) -> int:
        import transformers

        shape = QWEN25[self.size] if self.arch == "qwen2" else QWEN35[self.size]
        return shape.get("vocab_size") or transformers.Qwen3_5TextConfig().vocab_size


# Qwen's wrappers: finetune_ds.sh (full) per_device_train_batch_size 1; finetune_lora_single_gpu.sh and
# finetune_qlora_single_gpu.sh 2. They use model_max_length 512; the 1.5B suite keeps 2048 to show long contexts.
SUITES = {
    "full-1.5b": Suite("1.5B full", "full", "1.5b", 2048, 1, anchor_tokens=8192),
    "lora-7b": Suite("7B LoRA r64", "lora", "7b", 512, 2),
    "qlora-7b": Suite("7B Q-LoRA NF4 r64", "qlora", "7b", 512, 2),
    # packed against padded on today's Qwen: its linear-attention layers take the sample boundaries (gpu-marked row)
    "lora-qwen3.5": Suite("Qwen3.5 (9B shape) LoRA r64", "lora", "9b", 2048, 2, arch="qwen3_5"),
}
SIDES = ("baseline", "anchor", "chattune")
QWEN_SAMPLES_PER_STEP = 16  # Qwen's wrappers on one GPU (2 x 8, 1 x 16); GLOBAL_BATCH in finetune/_common.sh
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
MIN_SIDE_SECONDS = 30  # with less time left before --deadline a side is not started (start-up alone takes ~15 s)
RESULT_PREFIX = "RESULT "  # the child's result line; anything else on its stdout is library noise


def tiny_suite(suite: Suite) -> Suite:
    """The suite's mode (NF4 included: bitsandbytes runs it on CPU) on a 2-layer shape, with short samples (several
    per packed row), for a CPU smoke run."""
    return replace(suite, label=suite.label + " (tiny)", size="tiny", max_length=256, median_length=64,
                   anchor_tokens=1024)


def synthetic_lengths(n: int, suite: Suite, seed: int = 0) -> list[int]:
    """Lognormal sample lengths (median `suite.median_length`), clipped to [32, max_length]."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(math.log(suite.median_length), 0.7, n).astype(int)
    return np.clip(lengths, 32, suite.max_length).tolist()


def synthetic_dataset(lengths: list[int], vocab: int, seed: int = 0):
    """Random token ids of the given lengths; the first 30% of each sample is prompt (label -100)."""
    import datasets

    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for length in lengths:
        x = rng.integers(1000, vocab - 1000, length).tolist()
        prompt = int(length * 0.3)
        ids.append(x)
        labels.append([-100] * prompt + x[prompt:])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def sample_count(steps: int) -> int:
    """Enough samples for `steps` optimizer steps of the baseline (and of chattune, which needs about as many)."""
    return (steps + 2) * QWEN_SAMPLES_PER_STEP


# ---------------------------------------------------------------------------------------------------------------------
# What each side runs (pure: the parent prints it, the child runs it)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SidePlan:
    side: str
    attention: str
    fused_ce: str  # requested: "none" (the model's own loss) or "auto"
    liger: bool  # Liger kernels requested (applied on CUDA only)
    packed_tokens: int  # token budget of a packed micro-batch; 0: padded batches of Suite.batch_size samples
    accumulation: int  # micro-batches per optimizer step
    real_tokens_per_step: float  # expected, from the sample lengths
    recompute_every: int = 1  # gradient checkpointing: 0 off, n every n-th decoder layer (1: all)
    offload: bool = False  # the recomputed layers' inputs in host memory
    optim: str = "adamw_torch"
    estimate_gb: float = float("nan")  # the planner's estimate of this side's peak (chattune.train.memory)
    why: str = ""  # where the budget and the recompute come from

    def describe(self, suite: Suite) -> str:
        if self.packed_tokens:
            batch = f"packed micro-batches of <= {self.packed_tokens} tokens"
        else:
            batch = (f"{suite.batch_size} sample(s) per micro-batch (Qwen's per_device_train_batch_size) padded to "
                     f"{suite.max_length}")
        return (f"{self.side}: {batch}, {self.accumulation} micro-batches per optimizer step "
                f"(~{self.real_tokens_per_step:,.0f} real tokens), recompute {recompute_words(self)}, {self.optim}"
                + (f"; {self.why}" if self.why else ""))


def recompute_words(plan: SidePlan) -> str:
    from chattune.train.memory import recompute_words as words

    return words(plan.recompute_every, plan.offload)


def step_shape(suite: Suite, budget: int) -> Any:
    """Qwen's recipe: QWEN_SAMPLES_PER_STEP samples per optimizer step, the same samples on every side."""
    from chattune.train.batches import StepShape

    return StepShape(QWEN_SAMPLES_PER_STEP, 0, suite.batch_size, budget, 1, 0)


def model_shape(suite: Suite) -> Any:
    """The planner's parameter count of the suite's model (built on the meta device)."""
    import transformers

    from chattune.train.memory import shape_from_config

    if suite.arch == "qwen3_5":
        return shape_from_config(transformers.Qwen3_5TextConfig(**QWEN35[suite.size]))
    return shape_from_config(transformers.Qwen2Config(**QWEN25[suite.size]))


def planner_setup(suite: Suite, tokens: int, every: int, offload: bool, fused: bool, cuda: bool) -> Any:
    """The planner's view of one side (one GPU, no DeepSpeed, as the bench runs)."""
    from chattune.train.memory import Setup, with_recompute

    setup = Setup(mode=suite.mode, gpus=1, micro_batch_tokens=tokens, fused_ce=fused, lora_r=64,
                  bytes_per_weight=2 if cuda else 4)
    return with_recompute(setup, every, offload)


def planned_defaults(suite: Suite, shape: Any, cuda: bool, gpu_memory_gb: float) -> tuple[int, int, bool, str, str]:
    """(budget, recompute every, offload, optimizer, why) as a real run plans them for this GPU: chattune.train.plan's
    own functions on the suite's shape and flags (nothing passed for the budget, the recompute or the optimizer)."""
    from types import SimpleNamespace

    from chattune.train.decisions import plan_optimizer, plan_recompute
    from chattune.train.plan import Hardware, plan_budget

    flags = SimpleNamespace(max_tokens_per_batch=0, model_max_length=suite.max_length, pairs=False,
                            per_device_train_batch_size=suite.batch_size, recompute_requested=None,
                            gradient_checkpointing=None, activation_checkpointing_kwargs=None,
                            optim="auto", optim_requested="auto", deepspeed=None)
    hardware = Hardware(cuda=cuda, gpu_memory_gb=gpu_memory_gb if cuda else 0.0)
    floor = suite.batch_size * suite.max_length
    budget = plan_budget(flags, shape, planner_setup(suite, floor, 1, False, True, cuda), hardware)
    recompute = plan_recompute(flags, shape, planner_setup(suite, budget, 1, False, True, cuda), gpu_memory_gb, cuda)
    optim = plan_optimizer(flags, hardware).choice
    memory = f"{gpu_memory_gb:.0f} GB GPU" if cuda else "no GPU"
    return budget, recompute.every, recompute.offload, optim, f"budget and recompute planned for this machine " \
        f"({memory}): {recompute.decision.why}"


def plan_side(suite: Suite, side: str, lengths: list[int], cuda: bool, gpu_memory_gb: float = 0.0) -> SidePlan:
    """Qwen's recipe on every side (the same samples per optimizer step); the baseline pads every sample to
    model_max_length in micro-batches of Qwen's size, the others pack each step's samples into micro-batches of a
    token budget: the anchors' (anchor), or the one the planner picks for this GPU (chattune)."""
    import numpy as np

    from chattune.train.batches import micro_batches_per_step
    from chattune.train.memory import GB, estimate

    mean_length = sum(lengths) / len(lengths)
    per_step = QWEN_SAMPLES_PER_STEP * mean_length
    shape = model_shape(suite)
    if side == "baseline":
        accumulation = max(1, QWEN_SAMPLES_PER_STEP // suite.batch_size)
        setup = planner_setup(suite, suite.batch_size * suite.max_length, 1, False, False, cuda)
        return SidePlan(side, "sdpa", "none", False, 0, accumulation, per_step,
                        estimate_gb=estimate(shape, setup)["total"] / GB)
    if side == "anchor":
        budget, every, offload, optim, why = suite.anchor_tokens, 1, False, "adamw_torch", "DESIGN.md's anchor budget"
    else:
        budget, every, offload, optim, why = planned_defaults(suite, shape, cuda, gpu_memory_gb)
    budget = max(budget, suite.max_length)
    accumulation = micro_batches_per_step(np.asarray(lengths), step_shape(suite, budget), 1)
    attention = "flex_attention" if cuda and suite.arch == "qwen2" else "sdpa"  # no flex for Qwen3.5 in 5.23
    setup = planner_setup(suite, budget, every, offload, True, cuda)
    return SidePlan(side, attention, "auto", suite.arch == "qwen2", budget, accumulation, per_step, every, offload,
                    optim, estimate(shape, setup)["total"] / GB, why)


# ---------------------------------------------------------------------------------------------------------------------
# Child: one side of one suite, in this process
# ---------------------------------------------------------------------------------------------------------------------


def build_model(suite: Suite, plan: SidePlan, device: str, training_args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chattune.train.args import LoraArguments
    from chattune.train.hf import use_common_dtype_in_flex_attention
    from chattune.train.lora import apply_lora
    from chattune.train.run import apply_liger_kernels

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if plan.attention == "flex_attention":
        use_common_dtype_in_flex_attention()
    if suite.arch == "qwen3_5":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        from chattune.train.hf import install_packed_linear_attention

        install_packed_linear_attention("qwen3_5_text")  # exact on the torch path, the CUDA kernels when installed
        config, model_cls = Qwen3_5TextConfig(**QWEN35[suite.size], use_cache=False,
                                              attn_implementation=plan.attention), Qwen3_5ForCausalLM
    else:
        config, model_cls = Qwen2Config(**QWEN25[suite.size], max_position_embeddings=32768, use_cache=False,
                                        attn_implementation=plan.attention), Qwen2ForCausalLM
    init_dtype = torch.float32 if suite.mode == "full" else dtype  # full fine-tuning keeps fp32 master weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(init_dtype)
    torch.manual_seed(0)  # the same initial weights on both sides
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    if plan.liger:
        apply_liger_kernels(model, required=False)  # a no-op off CUDA
    if suite.mode == "qlora":
        quantize_nf4(model, dtype)
    if suite.mode in ("lora", "qlora"):  # Qwen's LoRA: r 64, alpha 16, dropout 0.05, every linear layer
        lora = LoraArguments(lora_r=64, lora_alpha=16, lora_dropout=0.05, q_lora=suite.mode == "qlora")
        model = apply_lora(model, training_args, lora, [])
    return model


def quantize_nf4(model, dtype) -> None:
    """Swap every decoder nn.Linear for a bitsandbytes NF4 Linear4bit (double quant, storage in the compute dtype),
    as from_pretrained(quantization_config=BitsAndBytesConfig(...)) does on a real checkpoint."""
    import gc

    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=dtype, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, quant_storage=dtype).to(child.weight.device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, q)
            del child
    model.is_loaded_in_4bit = True
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def make_training_args(device: str, suite: Suite, plan: SidePlan, steps: int):
    """Qwen's optimizer settings (lr, weight decay 0.1, adam_beta2 0.95), a constant schedule so short runs compare."""
    from chattune.train.args import TrainingArguments

    return TrainingArguments(
        output_dir="/tmp/chattune-bench", use_cpu=device == "cpu", bf16=device == "cuda", report_to="none",
        save_strategy="no", logging_steps=1, learning_rate=1e-5 if suite.mode == "full" else 3e-4,
        weight_decay=0.1, adam_beta2=0.95, lr_scheduler_type="constant", max_steps=steps,
        activation_checkpointing=plan.recompute_every > 0, optim=plan.optim,
        activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": max(1, plan.recompute_every),
                                         "offload": plan.offload},
        remove_unused_columns=False, label_names=["labels"], disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=suite.batch_size, model_max_length=suite.max_length,
        gradient_accumulation_steps=plan.accumulation,
        # packed rows hold no padding; padded rows are counted by their attention mask
        include_num_input_tokens_seen="all" if plan.packed_tokens else "non_padding",
    )


class Timer:
    """Times the optimizer steps after `warmup` (kernel compilation, autotuning and allocator growth excluded)."""

    def __init__(self, warmup: int) -> None:
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == warmup:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    timer.start, timer.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen

            def on_train_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.seconds = time.perf_counter() - timer.start
                timer.tokens = state.num_input_tokens_seen - timer.tokens_at_start

        self.callback = CB()
        self.start = self.seconds = 0.0
        self.tokens = self.tokens_at_start = 0


def liger_in_process() -> bool:
    """Whether Liger has patched this process's Qwen2 classes (what would contaminate a baseline built here)."""
    from transformers.models.qwen2 import modeling_qwen2

    patched = (modeling_qwen2.Qwen2RMSNorm, modeling_qwen2.Qwen2MLP, modeling_qwen2.apply_rotary_pos_emb)
    return any(obj.__module__.startswith("liger_kernel") for obj in patched)


def run_side(suite: Suite, plan: SidePlan, device: str, steps: int, warmup: int, dataset) -> dict:
    from transformers.trainer_callback import PrinterCallback

    from chattune.train.batches import PaddingCollator, StepSampler, sample_lengths
    from chattune.train.loss import liger_runs_here
    from chattune.train.trainer import ChatTrainer, LossSetup

    args = make_training_args(device, suite, plan, steps)
    model = build_model(suite, plan, device, args)
    loss_kind = plan.fused_ce if plan.fused_ce != "auto" else (
        "liger" if device == "cuda" and liger_runs_here() is None else "chunked")
    steps = StepSampler(sample_lengths(dataset), step_shape(suite, plan.packed_tokens), plan.accumulation, rank=0)
    timer = Timer(warmup)
    trainer = ChatTrainer(
        model=model, args=args, train_dataset=dataset, callbacks=[timer.callback],
        loss=LossSetup(loss_kind, requested=plan.fused_ce), steps=steps,
        boundaries=bool(plan.packed_tokens) and suite.arch == "qwen3_5",  # Gated DeltaNet needs the boundaries
        # Qwen's script pads every sample to model_max_length; packed batches do not use this collator
        data_collator=PaddingCollator(0, pad_to_multiple_of=8 if plan.packed_tokens else suite.max_length),
    )
    trainer.remove_callback(PrinterCallback)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "side": plan.side, "pid": os.getpid(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "attention": plan.attention, "loss_path": "logits + CE" if trainer.loss.kind == "none" else trainer.loss.kind,
        "liger": liger_in_process(),
        "tokens_per_s": timer.tokens / timer.seconds if timer.seconds else float("nan"),
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
        "reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else float("nan"),
        "first_loss": losses[0], "last_loss": losses[-1],
    }


def child_main(args: argparse.Namespace, suite: Suite) -> None:
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as chattune.train.model.enable_tf32 does for a real run
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        torch.set_num_threads(1)  # a 64-wide model gains nothing from threads; on a busy CI runner they contend (2x)
    lengths = synthetic_lengths(sample_count(args.steps), suite)
    plan = plan_side(suite, args.side, lengths, cuda=device == "cuda", gpu_memory_gb=gpu_memory_gb(device == "cuda"))
    dataset = synthetic_dataset(lengths, suite.vocab_size)
    result = run_side(suite, plan, device, args.steps, args.warmup, dataset)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Parent: one child per side and suite, then the tables
# ---------------------------------------------------------------------------------------------------------------------


def gpu_memory_gb(cuda: bool) -> float:
    from chattune.train.memory import GB

    return torch.cuda.get_device_properties(0).total_memory / GB if cuda else 0.0


def last_error_line(stderr: str, returncode: int) -> str:
    """The line that says why a child failed: the last non-empty line of its stderr (a traceback's exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {returncode}, nothing on stderr"


def run_child(name: str, side: str, args: argparse.Namespace, timeout: float) -> dict:
    """Run one side of one suite in a fresh interpreter; its result, or {"error": why} when it fails or times out."""
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--runs", name,
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
    # own session: on timeout the whole group goes (torch.compile's worker processes too)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        cut = " (--deadline)" if timeout < args.timeout else ""
        return {"side": side, "error": f"timed out after {timeout:.0f} s{cut}"}
    except BaseException:  # Ctrl-C reaches only the foreground group: the child's own session would live on
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    results = [line[len(RESULT_PREFIX):] for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode == 0 and results:
        return json.loads(results[-1])
    print(f"--- {name} {side} failed (exit code {proc.returncode}), end of its stderr:\n"
          + "\n".join(stderr.splitlines()[-20:]), file=sys.stderr, flush=True)
    why = last_error_line(stderr, proc.returncode) if proc.returncode else "exit code 0 without a RESULT line"
    return {"side": side, "error": f"failed: {why}"}


def train_flops_per_token(suite: Suite, mean_len: float) -> float:
    """Model FLOPs per real token: 6N (full) or 4N (frozen base: no weight gradients) for the matmuls, plus causal
    attention, forward + backward. Recomputation for gradient checkpointing is not counted (standard MFU). Qwen3.5
    from the planner's count (its linear-attention layers have no quadratic term)."""
    if suite.arch == "qwen3_5":
        import transformers

        from chattune.train.memory import Setup, shape_from_config
        from chattune.train.timing import flops_per_token

        shape = shape_from_config(transformers.Qwen3_5TextConfig(**QWEN35[suite.size]))
        return flops_per_token(shape, Setup(mode=suite.mode, gradient_checkpointing=False), mean_len)
    c = QWEN25[suite.size]
    d, layers, ff, v = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    n_linear = layers * (d * d * 2 + 2 * d * kv + 3 * d * ff) + d * v
    per_matmul_param = 6 if suite.mode == "full" else 4
    attention = 3 * 2 * 2 * layers * d * mean_len / 2  # QK^T and AV, causal half, x3 for fwd+bwd
    return per_matmul_param * n_linear + attention


def peak_tflops(device_name: str) -> float:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), float("nan"))


COLUMNS = ("side", "tokens/micro-batch", "recompute", "attention", "loss", "Liger kernels", "real tokens/s", "MFU",
           "allocated GB", "reserved GB", "estimate GB", "first loss", "last loss")


def table_row(r: dict, plan: SidePlan | None, flops_per_token: float) -> str:
    budget = ("padded" if not plan.packed_tokens else f"{plan.packed_tokens:,}") if plan else ""
    recompute = recompute_words(plan) if plan else ""
    estimate_gb = _number(plan.estimate_gb, ".1f") if plan else ""
    if "error" in r:
        cells = [r["side"], budget, recompute, r["error"].replace("|", "/")] + [""] * 9
        return "| " + " | ".join(cells) + " |"
    mfu = r["tokens_per_s"] * flops_per_token / (peak_tflops(r["device"]) * 1e12)
    cells = [r["side"], budget, recompute, r["attention"], r["loss_path"], "yes" if r["liger"] else "no",
             f"{r['tokens_per_s']:,.0f}", _number(mfu, ".1%"), _number(r["peak_gb"], ".1f"),
             _number(r.get("reserved_gb", float("nan")), ".1f"), estimate_gb, f"{r['first_loss']:.3f}",
             f"{r['last_loss']:.3f}"]
    return "| " + " | ".join(cells) + " |"


def _number(x: float, spec: str) -> str:
    return "n/a" if math.isnan(x) else format(x, spec)  # MFU and memory off CUDA


def print_suite(suite: Suite, plans: list[SidePlan], rows: list[dict], lengths: list[int], args) -> None:
    mean_len = sum(lengths) / len(lengths)
    on_cpu = args.tiny or not torch.cuda.is_available()
    device = next((r["device"] for r in rows if "device" in r), "cpu" if on_cpu else "the GPU")
    print(f"\n{suite.label} on {device}: max_length {suite.max_length}, mean sample {mean_len:.0f} tokens; "
          f"{args.steps} steps ({args.warmup} warm-up not timed)")
    for plan in plans:
        print(f"  {plan.describe(suite)}")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * 6 + "---:|" * 7)
    flops = train_flops_per_token(suite, mean_len)
    for plan, r in zip(plans, rows):
        print(table_row(r, plan, flops))
    base = rows[0]
    if "error" in base:
        print("speed-up: n/a (the baseline did not finish)", flush=True)
        return
    for r in rows[1:]:
        if "error" in r:
            print(f"{r['side']}: n/a (did not finish)", flush=True)
            continue
        memory = f", peak memory {r['peak_gb']:.1f} vs {base['peak_gb']:.1f} GB" if r["device"] != "cpu" else ""
        print(f"{r['side']}: speed-up {r['tokens_per_s'] / base['tokens_per_s']:.2f}x{memory}", flush=True)
    print("processes: " + ", ".join(f"{r['side']} pid {r['pid']}" for r in rows if "pid" in r), flush=True)


def parent_main(args: argparse.Namespace, names: list[str]) -> int:
    cuda = torch.cuda.is_available() and not args.tiny
    print(f"torch {version('torch')}, transformers {version('transformers')}, liger-kernel "
          f"{_version_or_none('liger-kernel')}; {time.strftime('%Y-%m-%d')}; each side in its own process",
          flush=True)
    deadline = time.monotonic() + args.deadline if args.deadline else math.inf
    failed = False
    for name in names:
        suite = tiny_suite(SUITES[name]) if args.tiny else SUITES[name]
        lengths = synthetic_lengths(sample_count(args.steps), suite)
        plans = [plan_side(suite, side, lengths, cuda, gpu_memory_gb(cuda)) for side in SIDES]
        rows = []
        for side in SIDES:
            left = deadline - time.monotonic()
            if left < MIN_SIDE_SECONDS:
                rows.append({"side": side, "error": f"skipped: --deadline {args.deadline:.0f} s reached"})
                continue
            start = time.perf_counter()
            print(f"{name}: {side} ...", file=sys.stderr, flush=True)
            rows.append(run_child(name, side, args, min(args.timeout, left)))
            print(f"{name}: {side} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        failed |= any("error" in r for r in rows)
        print_suite(suite, plans, rows, lengths, args)
    return 1 if failed else 0


def _version_or_none(package: str) -> str:
    try:
        return version(package)
    except Exception:
        return "not installed"


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="full-1.5b,lora-7b,qlora-7b", help=f"comma separated: {', '.join(SUITES)}")
    ap.add_argument("--steps", type=int, default=14, help="optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=4, help="first optimizer steps not timed")
    ap.add_argument("--timeout", type=float, default=480, help="seconds before a side's process is killed")
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds for the whole run: a side that would start with less than "
                         f"{MIN_SIDE_SECONDS} s left is skipped, a running one is cut at the deadline (0: none)")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU: a smoke test, no timing value")
    ap.add_argument("--side", choices=SIDES, help="(internal) run this one side of one suite in this process")
    args = ap.parse_args()
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    problems = [f"unknown run {r!r}; choose from {', '.join(SUITES)}" for r in names if r not in SUITES]
    if not names:
        problems.append("--runs names no suite")
    if not 0 <= args.warmup < args.steps:
        problems.append(f"--warmup {args.warmup} must be at least 0 and below --steps {args.steps}")
    if args.deadline < 0:
        problems.append(f"--deadline {args.deadline:g} must be 0 (none) or a number of seconds")
    if args.side and len(names) != 1:
        problems.append("--side runs one suite: pass a single name to --runs")
    if problems:
        ap.error("; ".join(problems))
    return args, names


def main() -> None:
    args, names = parse_args()
    if args.side:
        child_main(args, tiny_suite(SUITES[names[0]]) if args.tiny else SUITES[names[0]])
    else:
        sys.exit(parent_main(args, names))


if __name__ == "__main__":
    main()
