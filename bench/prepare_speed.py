#!/usr/bin/env python
"""Data preparation speed and memory: N synthetic ShareGPT conversations (JSONL) through the training path
(chattune.data.prepare: read, validate, render, tokenize, cache), cold and cached.

    python bench/prepare_speed.py --model_name_or_path MODEL_DIR [--n 100000 1000000] [--num_proc 2]

Each measurement runs in a fresh process, so the peak resident memory printed is that of the run alone: the main
process and the largest worker (ru_maxrss).
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = "the model learns to answer questions about code data and language in many short turns".split()


def write_synthetic(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def say(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            turns = []
            for _ in range(rng.choice([1, 1, 2, 3])):
                turns += [{"from": "human", "value": say(rng.randint(5, 40))},
                          {"from": "gpt", "value": say(rng.randint(10, 120))}]
            f.write(json.dumps({"conversations": turns}) + "\n")


def child(model: str, data: str, cache: str, num_proc: int | None) -> None:
    from chattune.data.prepare import prepare_files
    from chattune.data.tokenizer import prepare_tokenizer

    tok, setup = prepare_tokenizer(model, "auto")
    start = time.perf_counter()
    prepared = prepare_files(data, tok, stop_tokens=setup.stop_tokens, max_length=4096, cache_dir=cache,
                             num_proc=num_proc)
    _ = len(prepared.dataset)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "tokens": prepared.report.tokens, "from_cache": prepared.from_cache,
        "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def measure(model: str, data: str, cache: str, num_proc: int | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", model, data, cache, str(num_proc or 0)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, data, cache, num_proc = sys.argv[2:6]
        child(model, data, cache, int(num_proc) or None)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_name_or_path", required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000])
    ap.add_argument("--num_proc", type=int, default=None)
    args = ap.parse_args()
    rows = []
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "data.jsonl")
            write_synthetic(data, n)
            size = os.path.getsize(data) / 2**20
            for label in ("cold", "cached"):
                r = measure(args.model_name_or_path, data, os.path.join(tmp, "cache"), args.num_proc)
                rate = f"{r['tokens'] / r['seconds']:,.0f}" if label == "cold" else "-"
                rows.append((f"{n:,}", f"{size:,.0f}", label, r["seconds"], rate, r["main_mb"], r["worker_mb"]))
    print(f"\n{os.cpu_count()} cores, num_proc {args.num_proc or 'auto'}")
    head = ("conversations", "MB", "run", "seconds", "tokens/s", "peak MB main", "peak MB worker")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for n, mb, label, seconds, rate, main_mb, worker_mb in rows:
        print(f"| {n} | {mb} | {label} | {seconds:.1f} | {rate} | {main_mb:,.0f} | {worker_mb:,.0f} |")


if __name__ == "__main__":
    main()
