"""MoE experts: transformers' grouped GEMM (what the plan picks) against batched_mm and the loop over experts (eager),
and Q-LoRA's 4-bit experts (nf4: chattune.train.experts4bit, a loop dequantizing one expert at a time).

One sparse MoE block of a real config (default Qwen3.6-35B-A3B's: hidden 2048, 256 experts of 512, top-8), random
weights, forward and backward of a micro-batch of tokens, each implementation timed in its own process on the same
inputs. Prints ms per forward+backward, the speed-up over eager, the peak memory, and the largest output difference
against eager (the implementations must agree; nf4's weights are the 4-bit ones, so it differs by quantization).

    python bench/experts.py                 # CUDA, bf16
    python bench/experts.py --tiny          # a smoke run on CPU (no timing value)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chattune, for the nf4 row

IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager", "nf4")


def one(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = transformers.Qwen3_5MoeTextConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.expert_size, num_experts=args.experts,
        num_experts_per_tok=args.top_k, shared_expert_intermediate_size=args.expert_size, num_hidden_layers=1,
        layer_types=["full_attention"])
    config._experts_implementation = args.implementation
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
        Qwen3_5MoeSparseMoeBlock,
    )

    torch.manual_seed(0)
    block = Qwen3_5MoeSparseMoeBlock(config).to(device=device, dtype=dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if args.implementation == "nf4":
        from chattune.train import experts4bit

        experts4bit.register()
        experts4bit.quantize_experts(block)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, generator=None, requires_grad=True)

    def step():
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()
        return out

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        out = step()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    torch.save(out.detach().float().cpu(), args.dump)
    return {"implementation": args.implementation, "ms": ms, "peak_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU: a smoke run, no timing value")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--expert_size", type=int, default=512)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per implementation")
    parser.add_argument("--implementation", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.implementation:
        print("RESULT " + json.dumps(one(args)))
        return
    if args.tiny:
        args.tokens, args.hidden, args.expert_size, args.experts, args.top_k = 64, 32, 16, 8, 2
        args.steps, args.warmup = 2, 1
    import tempfile

    import torch

    rows, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for implementation in IMPLEMENTATIONS:
            dump = f"{tmp}/{implementation}.pt"
            flags = [f"--{k}={v}" for k, v in vars(args).items()
                     if k not in ("implementation", "dump", "tiny", "timeout") and v is not None]
            cmd = [sys.executable, __file__, *flags, f"--implementation={implementation}", f"--dump={dump}"]
            cmd += ["--tiny"] if args.tiny else []
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append((implementation, None, "timed out"))
                continue
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                error = (proc.stderr.strip().splitlines() or ["failed"])[-1][:80]
                rows.append((implementation, None, error))
                continue
            rows.append((implementation, json.loads(line[7:]), ""))
            outputs[implementation] = torch.load(dump)
    eager = next((r[1]["ms"] for r in rows if r[0] == "eager" and r[1]), None)
    print(f"experts: {args.experts} x {args.expert_size} (top-{args.top_k}), hidden {args.hidden}, {args.tokens} "
          "tokens, forward + backward")
    print("| implementation | ms per step | vs eager | peak GB | max diff vs eager | note |")
    print("|---|---:|---:|---:|---:|---|")
    for implementation, result, note in rows:
        if result is None:
            print(f"| {implementation} | - | - | - | - | {note} |")
            continue
        speed = f"{eager / result['ms']:.2f}x" if eager else "-"
        peak = f"{result['peak_gb']:.2f}" if result["peak_gb"] is not None else "-"
        diff = ((outputs[implementation] - outputs["eager"]).abs().max().item() if "eager" in outputs else None)
        diff_text = f"{diff:.2e}" if diff is not None else "-"
        note = note or ("4-bit weights (quantization error)" if implementation == "nf4" else "")
        print(f"| {implementation} | {result['ms']:.1f} | {speed} | {peak} | {diff_text} | {note} |")


if __name__ == "__main__":
    main()
