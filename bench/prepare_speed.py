#!/usr/bin/env python
"""Data preparation speed and memory: N synthetic ShareGPT conversations (JSONL) through the training path
(chattune.data.prepare: read, validate, render, tokenize, cache), cold and cached, for conversations of 1-3 turns and
of 5-10 turns.

    python bench/prepare_speed.py --model_name_or_path MODEL_DIR [--n 100000 1000000] [--num_proc 2]
        [--turns 1-3 5-10] [--repeat 3]

Each measurement runs in a fresh process, so the peak resident memory printed is that of the run alone: the main
process and the largest worker (ru_maxrss). CPU seconds are those of the main process and its workers together
(user + system), which load on a shared machine changes less than wall time; "CPU s / M tokens" is the cost per
token, the number to compare between rows of different turn counts. With --repeat, the fastest of the runs is
shown (noise only ever adds time).
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


def write_synthetic(path: str, n: int, turns: tuple[int, int] = (1, 3), seed: int = 0) -> None:
    """n conversations of `turns` user/assistant pairs (1-3: weighted towards 1, as chat data is)."""
    rng = random.Random(seed)
    counts = [1, 1, 2, 3] if turns == (1, 3) else list(range(turns[0], turns[1] + 1))

    def say(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            turns = []
            for _ in range(rng.choice(counts)):
                turns += [{"from": "human", "value": say(rng.randint(5, 40))},
                          {"from": "gpt", "value": say(rng.randint(10, 120))}]
            f.write(json.dumps({"conversations": turns}) + "\n")


def child(model: str, data: str, cache: str, num_proc: int | None) -> None:
    from chattune.data.prepare import prepare_files
    from chattune.data.tokenizer import prepare_tokenizer

    tok, setup = prepare_tokenizer(model, "auto")
    start, cpu = time.perf_counter(), _cpu_seconds()
    prepared = prepare_files(data, tok, stop_tokens=setup.stop_tokens, max_length=4096, cache_dir=cache,
                             num_proc=num_proc)
    _ = len(prepared.dataset)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "cpu": _cpu_seconds() - cpu, "tokens": prepared.report.tokens,
        "from_cache": prepared.from_cache,
        "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
    ap.add_argument("--n", type=int, nargs="+", default=[20_000],
                    help="conversations per row of 1-3 turns; rows of more turns get as many tokens (about)")
    ap.add_argument("--turns", nargs="+", default=["1-3", "5-10"], help="turn ranges, one row each")
    ap.add_argument("--num_proc", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is shown")
    args = ap.parse_args()
    rows = []
    for n in args.n:
        for turns in args.turns:
            lo, hi = (int(x) for x in turns.split("-"))
            count = n if (lo, hi) == (1, 3) else max(1, int(n * 1.75 / ((lo + hi) / 2)))
            with tempfile.TemporaryDirectory() as tmp:
                data = os.path.join(tmp, "data.jsonl")
                write_synthetic(data, count, (lo, hi))
                size = os.path.getsize(data) / 2**20
                for label in ("cold", "cached"):
                    runs = []
                    for k in range(args.repeat):
                        cache = os.path.join(tmp, f"cache{k}" if label == "cold" else "cache0")
                        runs.append(measure(args.model_name_or_path, data, cache, args.num_proc))
                    r = min(runs, key=lambda r: r["cpu"])
                    per_m = f"{r['cpu'] / r['tokens'] * 1e6:.2f}" if label == "cold" else "-"
                    rows.append((f"{count:,}", turns, f"{size:,.0f}", label, r["tokens"], r["seconds"], r["cpu"],
                                 per_m, r["main_mb"], r["worker_mb"]))
    print(f"\n{os.cpu_count()} cores, num_proc {args.num_proc or 'auto'}, fastest of {args.repeat}")
    head = ("conversations", "turns", "MB", "run", "tokens", "wall s", "CPU s", "CPU s / M tokens", "peak MB main",
            "peak MB worker")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for n, turns, mb, label, tokens, seconds, cpu, per_m, main_mb, worker_mb in rows:
        print(f"| {n} | {turns} | {mb} | {label} | {tokens / 1e6:.2f} M | {seconds:.1f} | {cpu:.1f} | {per_m} | "
              f"{main_mb:,.0f} | {worker_mb:,.0f} |")


if __name__ == "__main__":
    main()
