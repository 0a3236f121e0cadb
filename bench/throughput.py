#!/usr/bin/env python
"""Training throughput: the Qwen-style baseline against chattune's defaults, side by side in one process.

    python bench/throughput.py                         # full-1.5b, lora-7b, qlora-7b on one GPU
    python bench/throughput.py --runs lora-7b --steps 20
    python bench/throughput.py --tiny                  # CPU smoke test with a tiny shape (no timing value)

Models are random-init with the real Qwen2.5 shapes (configs written below, nothing downloaded); data are synthetic
conversations with lognormal lengths (median 400 tokens, the answer ~70% of each sample). Both sides run through the
same ChatTrainer code path a user runs; they differ only in batching, attention and loss:

* baseline (Qwen's finetune.py): every sample padded to model_max_length, fixed-size batches, sdpa, plain loss.
* chattune: padding-free packing into token-budget micro-batches, flex_attention (CUDA), fused linear+CE (Liger on
  CUDA), Liger RMSNorm/SwiGLU/RoPE kernels when installed.

Prints one table per run: real (non-padding) tokens/s, MFU, peak memory, first/last loss.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

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


@dataclass
class Setting:
    label: str
    mode: str  # full | lora | qlora
    size: str
    max_length: int
    batch_size: int  # baseline samples per micro-batch
    tokens_per_batch: int  # chattune token budget per micro-batch


RUNS = {
    "full-1.5b": Setting("1.5B full", "full", "1.5b", 2048, 4, 8192),
    "lora-7b": Setting("7B LoRA r64", "lora", "7b", 512, 2, 4096),
    "qlora-7b": Setting("7B Q-LoRA NF4 r64", "qlora", "7b", 512, 2, 4096),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def synthetic_dataset(n: int, max_length: int, vocab: int, seed: int = 0):
    """Token ids with lognormal lengths (median 400), truncated at max_length; the first 30% of each is prompt."""
    import datasets

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(400), 0.7, n).astype(int), 32, max_length)
    ids, labels = [], []
    for length in lengths:
        x = rng.integers(1000, vocab - 1000, length).tolist()
        prompt = int(length * 0.3)
        ids.append(x)
        labels.append([-100] * prompt + x[prompt:])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def build_model(setting: Setting, device: str, attn: str, liger: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chattune.args import LoraArguments, TrainingArguments  # noqa: F401
    from chattune.model import apply_lora

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen2Config(**QWEN25[setting.size], max_position_embeddings=32768, use_cache=False,
                         attn_implementation=attn)
    init_dtype = torch.float32 if setting.mode == "full" else dtype  # full fine-tuning keeps fp32 master weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(init_dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    if liger:
        from chattune.train import apply_liger_kernels

        apply_liger_kernels(model, required=False)
    if setting.mode == "qlora":
        quantize_nf4(model, dtype)
    if setting.mode in ("lora", "qlora"):
        args = _training_args(device, setting)
        lora = LoraArguments(lora_r=64, lora_alpha=16, lora_dropout=0.05, q_lora=setting.mode == "qlora")
        model = apply_lora(model, args, lora, [])
    return model


def quantize_nf4(model, dtype) -> None:
    """Swap every decoder nn.Linear for a bitsandbytes NF4 Linear4bit (double quant, storage in the compute dtype),
    as from_pretrained(quantization_config=BitsAndBytesConfig(...)) does on a real checkpoint."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
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


def _training_args(device: str, setting: Setting, **kw):
    from chattune.args import TrainingArguments

    return TrainingArguments(
        output_dir="/tmp/chattune-bench", use_cpu=device == "cpu", bf16=device == "cuda", report_to="none",
        save_strategy="no", logging_steps=1, learning_rate=1e-5 if setting.mode == "full" else 2e-4,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False, label_names=["labels"], per_device_train_batch_size=setting.batch_size,
        lr_scheduler_type="constant", disable_tqdm=True, dataloader_num_workers=0, **kw,
    )


class Timer:
    """Times the steps after `warmup` (kernel compilation, autotuning and allocator growth excluded)."""

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


def train_flops_per_token(setting: Setting, mean_len: float) -> float:
    """Model FLOPs per real token: 6N (full) or 4N (frozen base: no weight gradients) for the matmuls, plus causal
    attention, forward + backward. Recomputation for gradient checkpointing is not counted (standard MFU)."""
    c = QWEN25[setting.size]
    d, layers, ff, v = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    n_linear = layers * (d * d * 2 + 2 * d * kv + 3 * d * ff) + d * v
    per_matmul_param = 6 if setting.mode == "full" else 4
    attention = 3 * 2 * 2 * layers * d * mean_len / 2  # QK^T and AV, causal half, x3 for fwd+bwd
    return per_matmul_param * n_linear + attention


def run_side(setting: Setting, side: str, device: str, steps: int, warmup: int, dataset, tiny: bool) -> dict:
    from chattune.collate import PackedBatchSampler, PaddingCollator
    from chattune.train import ChatTrainer, sample_lengths

    chattune_side = side == "chattune"
    attn = "flex_attention" if chattune_side and device == "cuda" else "sdpa"
    model = build_model(setting, device, attn, liger=chattune_side and device == "cuda")
    args = _training_args(device, setting, max_steps=steps,
                          include_num_input_tokens_seen="all" if chattune_side else "non_padding")
    sampler = PackedBatchSampler(sample_lengths(dataset), setting.tokens_per_batch) if chattune_side else None
    fused = "none"
    if chattune_side:
        from chattune.loss import resolve_fused_ce

        fused = resolve_fused_ce("auto", model.get_output_embeddings(), zero3=False)
    timer = Timer(warmup)
    trainer = ChatTrainer(
        model=model, args=args, train_dataset=dataset, callbacks=[timer.callback], packed_sampler=sampler,
        fused_ce=fused,
        # Qwen's script pads every sample to model_max_length
        data_collator=PaddingCollator(0, pad_to_multiple_of=1 if chattune_side else setting.max_length),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    result = {
        "side": side, "attention": attn, "loss_path": fused if fused != "none" else "logits + CE",
        "tokens_per_s": timer.tokens / timer.seconds if timer.seconds else float("nan"),
        "peak_gb": peak, "first_loss": losses[0], "last_loss": losses[-1],
    }
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def gpu_peak_tflops() -> float:
    if not torch.cuda.is_available():
        return float("nan")
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="full-1.5b,lora-7b,qlora-7b", help=f"comma separated: {', '.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU: a smoke test, no timing value")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in names if r not in RUNS]
    if unknown:
        sys.exit(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    peak = gpu_peak_tflops()
    import transformers

    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}", flush=True)
    for name in names:
        setting = RUNS[name]
        if args.tiny:
            setting = Setting(setting.label + " (tiny)", setting.mode if setting.mode != "qlora" else "lora", "tiny",
                              256, 2, 512)
        n_samples = max(64, (args.steps + 2) * setting.tokens_per_batch // 300)
        dataset = synthetic_dataset(n_samples, setting.max_length, QWEN25[setting.size]["vocab_size"])
        mean_len = float(np.mean([len(x) for x in dataset["input_ids"]]))
        flops = train_flops_per_token(setting, mean_len)
        rows = [run_side(setting, side, device, args.steps, args.warmup, dataset, args.tiny)
                for side in ("baseline", "chattune")]
        print(f"\n{setting.label}: max_length {setting.max_length}, baseline {setting.batch_size} samples/micro-batch"
              f" padded, chattune {setting.tokens_per_batch} tokens/micro-batch packed; mean sample {mean_len:.0f}"
              f" tokens; {args.steps} steps ({args.warmup} warm-up not timed)")
        print("| side | attention | loss | real tokens/s | MFU | peak GB | first loss | last loss |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            mfu = r["tokens_per_s"] * flops / (peak * 1e12) if peak == peak else float("nan")
            print(f"| {r['side']} | {r['attention']} | {r['loss_path']} | {r['tokens_per_s']:,.0f} | {mfu:.1%} |"
                  f" {r['peak_gb']:.1f} | {r['first_loss']:.3f} | {r['last_loss']:.3f} |")
        speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"speed-up {speedup:.2f}x, peak memory {rows[1]['peak_gb']:.1f} vs {rows[0]['peak_gb']:.1f} GB",
              flush=True)


if __name__ == "__main__":
    main()
