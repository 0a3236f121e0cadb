#!/usr/bin/env python
"""Tokenization speed: N synthetic ShareGPT conversations through validation + rendering + tokenization.

    python bench/prepare_speed.py --model_name_or_path MODEL_DIR [--n 100000] [--num_proc 2]

Prints one table: seconds for load+validate, tokenize (cold cache) and the cached re-run.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chattune.data import load_conversations  # noqa: E402
from chattune.prepare import prepare_dataset  # noqa: E402
from chattune.tokenizer import prepare_tokenizer  # noqa: E402

WORDS = "the model learns to answer questions about code data and language in many short turns".split()


def synthetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    records = []
    for _ in range(n):
        turns = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            turns += [{"from": "human", "value": say(rng.randint(5, 40))},
                      {"from": "gpt", "value": say(rng.randint(10, 120))}]
        records.append({"conversations": turns})
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_name_or_path", required=True)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--num_proc", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.jsonl")
        with open(path, "w") as f:
            for r in synthetic(args.n):
                f.write(json.dumps(r) + "\n")
        tok, setup = prepare_tokenizer(args.model_name_or_path, "auto")
        rows = []
        t = time.perf_counter()
        loaded = load_conversations(path)
        rows.append(("load + validate", time.perf_counter() - t))
        for label in ("tokenize (cold cache)", "tokenize (cached re-run)"):
            t = time.perf_counter()
            prepared = prepare_dataset(loaded.conversations, tok, stop_tokens=setup.stop_tokens, max_length=4096,
                                       cache_dir=os.path.join(tmp, "cache"), num_proc=args.num_proc)
            rows.append((label, time.perf_counter() - t))
    print(f"\n{args.n:,} conversations, {prepared.report.tokens:,} tokens, {os.cpu_count()} cores")
    print(f"| {'step':<26} | {'seconds':>8} |\n|{'-' * 28}|{'-' * 10}|")
    for label, seconds in rows:
        print(f"| {label:<26} | {seconds:>8.1f} |")


if __name__ == "__main__":
    main()
