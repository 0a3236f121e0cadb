#!/usr/bin/env python
"""Reading speed: N synthetic conversations read and validated (chattune.data.load_conversations), as JSONL and as a
JSON array, and the JSON array parsed by ijson's C backend for comparison (when ijson is installed).

    python bench/read_speed.py [--n 100000]

CPU seconds of this process (stable under load), records per second. Our array parser is kept over ijson although
ijson parses faster: see chattune/data/reader.py for why (lone surrogates turned into "?", memory exhausted on deep
nesting, no line/column in errors).
"""

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the model learns to answer questions about code data and language".split()
    return [{"conversations": [{"from": "human", "value": " ".join(rng.choices(words, k=rng.randint(5, 60)))},
                               {"from": "gpt", "value": " ".join(rng.choices(words, k=rng.randint(5, 120)))}]}
            for _ in range(n)]


def timed(label: str, n: int, work) -> tuple:
    start = time.process_time()
    count = work()
    seconds = time.process_time() - start
    assert count == n, (label, count)
    return label, seconds, n / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    from chattune.data.load import load_conversations

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = records(args.n)
        jsonl, array = os.path.join(tmp, "data.jsonl"), os.path.join(tmp, "data.json")
        with open(jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
        with open(array, "w") as f:
            json.dump(data, f, indent=1)
        del data
        rows.append(timed("JSONL, chattune (read + validate)", args.n,
                          lambda: len(load_conversations(jsonl).conversations)))
        rows.append(timed("JSON array, chattune (read + validate)", args.n,
                          lambda: len(load_conversations(array).conversations)))
        from chattune.data.reader import source_chunks

        rows.append(timed("JSON array, chattune (parse only)", args.n,
                          lambda: sum(len(chunk.records) for chunk in source_chunks(array, "file"))))
        if importlib.util.find_spec("ijson"):
            import ijson

            def parse() -> int:
                with open(array, "rb") as f:
                    return sum(1 for _ in ijson.items(f, "item", use_float=True))

            rows.append(timed(f"JSON array, ijson {ijson.backend} (parse only)", args.n, parse))
    print(f"\n{args.n:,} conversations")
    print("| reader | CPU s | records/s |\n|---|---:|---:|")
    for label, seconds, rate in rows:
        print(f"| {label} | {seconds:.2f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
