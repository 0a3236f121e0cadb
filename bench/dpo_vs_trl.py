#!/usr/bin/env python
"""Preference training speed: chattune's --stage dpo against TRL's DPOTrainer on the same pairs, model and GPU, each
side in its own process.

    python bench/dpo_vs_trl.py --model Qwen/Qwen2.5-0.5B-Instruct          # LoRA DPO, bf16, one GPU
    python bench/dpo_vs_trl.py --model /models/qwen3-4b --steps 30 --batch 8 --max_length 2048
    python bench/dpo_vs_trl.py --shape 0.5b                               # random-init Qwen2.5-0.5B, offline
    python bench/dpo_vs_trl.py --tiny                                     # CPU smoke run (no timing value)

The pairs are synthetic (seeded): a user prompt and two answers of lognormal lengths (median --median tokens of
text), written once as a JSONL file in TRL's conversational format, which chattune reads as is. Both sides train
LoRA (r 16, all linear layers, no dropout: TRL's disable_dropout default), sigmoid DPO with beta 0.1, the same pairs
per optimizer step (--batch, no accumulation), the same --max_length, the same learning rate, no gradient
checkpointing, bf16 on a GPU. Each side uses its own defaults otherwise (chattune: packing where a CUDA attention
kernel keeps samples apart, the chunked output layer; TRL: padded batches, its own log-prob path).

A child (`--side chattune|trl`) times its optimizer steps with a callback and prints one `RESULT {json}` line:
seconds per step after --warmup steps. The parent turns that into pairs/s and tokens/s (the mean tokens of a pair,
both sides, as chattune's tokenizer counts them, the same for both sides) and prints one table. A side that fails or
passes --timeout gets a row saying so; TRL missing is a row too (pip install trl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT_PREFIX = "RESULT "
SIDES = ("chattune", "trl")
WORDS = ("the of and to in is that for it as with was on be by this are from or have not at an they which you one "
         "model data train loss token pair chosen rejected answer prompt reward policy reference batch step").split()


def synthetic_pairs(n: int, median: int, seed: int = 0) -> list[dict]:
    """Seeded pairs: a user prompt and two answers of lognormal word counts (median `median`)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS, max(1, words)).tolist()).capitalize() + "."

    lengths = lambda: int(np.clip(rng.lognormal(math.log(median), 0.6), 4, 8 * median))  # noqa: E731
    return [{"prompt": [{"role": "user", "content": text(lengths() // 2)}],
             "chosen": [{"role": "assistant", "content": text(lengths())}],
             "rejected": [{"role": "assistant", "content": text(lengths())}]} for _ in range(n)]


def random_model(path: Path, shape: str) -> str:
    """A random-init Qwen2.5 of a real shape (bench/throughput.py's QWEN25: 0.5b, 1.5b, 7b) with the tests' offline
    Qwen tokenizer: nothing is downloaded (the GPU machines reach no hub). `tiny`: the tests' 2-layer Qwen2."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "bench"))
    from fixtures import _save, build_model, qwen_tokenizer
    from throughput import QWEN25

    if shape == "tiny":
        return str(build_model("qwen2", path))

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**QWEN25[shape], use_cache=False)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    return str(_save(path, model, qwen_tokenizer(), [151645, 151643]))


# ---------------------------------------------------------------------------------------------------------------------
# The children
# ---------------------------------------------------------------------------------------------------------------------


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    return StepTimer()


def run_chattune(a: argparse.Namespace, timer) -> None:
    from chattune.train import run as run_module
    from chattune.train.args import parse_args

    build = run_module.build_trainer

    def with_timer(*args, **kwargs):
        trainer, clock, preemption = build(*args, **kwargs)
        trainer.add_callback(timer)
        return trainer, clock, preemption

    run_module.build_trainer = with_timer
    argv = ["--model_name_or_path", a.model, "--data_path", a.data, "--output_dir", a.out, "--stage", "dpo",
            "--use_lora", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--max_steps", str(a.steps),
            "--per_device_train_batch_size", str(a.batch), "--gradient_accumulation_steps", "1",
            "--model_max_length", str(a.max_length), "--learning_rate", "5e-6", "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", "1", "--preview_data", "0", "--gradient_checkpointing", "False",
            "--data_cache_dir", os.path.join(a.out, "cache"), "--seed", "0", "--overwrite_output_dir", "True",
            *(["--bf16", "True"] if a.bf16 else ["--use_cpu", "True"])]
    run_module.run(*parse_args(argv))


def run_trl(a: argparse.Namespace, timer) -> None:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(a.data, encoding="utf-8")]
    config = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                       max_steps=a.steps, learning_rate=5e-6, max_length=a.max_length, beta=0.1,
                       loss_type=["sigmoid"], save_strategy="no", report_to="none", logging_steps=1, bf16=a.bf16,
                       use_cpu=not a.bf16, gradient_checkpointing=False, seed=0)
    trainer = DPOTrainer(model=a.model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(a.model),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                         callbacks=[timer])
    trainer.train()


def child(a: argparse.Namespace) -> None:
    timer = step_timer()
    (run_chattune if a.side == "chattune" else run_trl)(a, timer)
    times = timer.times[a.warmup:]
    seconds = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    print(RESULT_PREFIX + json.dumps({"seconds_per_step": seconds, "steps": len(timer.times)}), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------------------------------


def mean_pair_tokens(model: str, data: str, max_length: int) -> float:
    """Tokens of a pair (both sides), as the chat template renders them, cut at max_length: what every step
    processes per pair on either side."""
    from chattune.data.chat_templates import setup_chat_template
    from chattune.data.encode import EncodeJob, encode_conversations
    from chattune.data.load import load_conversations
    from chattune.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    setup = setup_chat_template(tokenizer, "auto", [])
    conversations = load_conversations(data, pairs=True).conversations
    job = EncodeJob(conversations, tokenizer, {}, list(setup.stop_tokens), max_length, pairs=True)
    lengths = encode_conversations((0, len(conversations)), job)["kept_length"]
    return float(lengths.sum()) / len(conversations)


def run_side(side: str, a: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", a.model, "--data", a.data, "--out", str(out / side),
           "--steps", str(a.steps), "--batch", str(a.batch), "--max_length", str(a.max_length),
           "--warmup", str(a.warmup), *(["--bf16"] if a.bf16 else [])]
    if side == "trl":
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            return {"error": "trl not installed (pip install trl)"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
    if proc.returncode or line is None:
        return {"error": f"failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
    return json.loads(line[len(RESULT_PREFIX):])


def table(results: dict[str, dict], pair_tokens: float, a: argparse.Namespace) -> str:
    lines = [f"LoRA DPO, {a.batch} pairs per step, max length {a.max_length}, ~{pair_tokens:.0f} tokens per pair, "
             f"{a.steps} steps ({a.warmup} warm-up not timed)",
             "| side | s/step | pairs/s | tokens/s | note |", "|---|---:|---:|---:|---|"]
    for side, r in results.items():
        if "error" in r:
            lines.append(f"| {side} | - | - | - | {r['error']} |")
            continue
        pairs = a.batch / r["seconds_per_step"]
        lines.append(f"| {side} | {r['seconds_per_step']:.3f} | {pairs:.2f} | {pairs * pair_tokens:,.0f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model path or hub id (or --shape)")
    p.add_argument("--shape", choices=("0.5b", "1.5b", "7b"), help="a random-init Qwen2.5 of this shape instead")
    p.add_argument("--data", help="pairs JSONL (default: synthetic pairs written to a temporary file)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (per device)")
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--median", type=int, default=150, help="median words of an answer in the synthetic pairs")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per side")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random model")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:
        return child(a)
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        out = Path(tmp)
        if a.tiny:
            a.model, a.steps, a.warmup, a.batch, a.max_length, a.median = random_model(out / "m", "tiny"), 4, 1, 2, 256, 20
        elif a.shape:
            a.model = random_model(out / "m", a.shape)
        elif not a.model:
            p.error("--model or --shape is required (or --tiny)")
        import torch

        a.bf16 = torch.cuda.is_available()
        if not a.data:
            a.data = str(out / "pairs.jsonl")
            with open(a.data, "w", encoding="utf-8") as f:
                for row in synthetic_pairs((a.steps + 2) * a.batch, a.median):
                    f.write(json.dumps(row) + "\n")
        pair_tokens = mean_pair_tokens(a.model, a.data, a.max_length)
        results = {side: run_side(side, a, out) for side in SIDES}
        print(table(results, pair_tokens, a))


if __name__ == "__main__":
    main()
