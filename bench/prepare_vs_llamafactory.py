#!/usr/bin/env python
"""Data preparation against LLaMA-Factory's, on the same synthetic ShareGPT file, tokenizer and worker count.

LLaMA-Factory pins other library versions than ours, so it runs from its own virtualenv:

    python -m venv /opt/lf && /opt/lf/bin/pip install torch==2.13.0 llamafactory==0.9.5
    python bench/prepare_vs_llamafactory.py --model_name_or_path MODEL_DIR --llamafactory_python /opt/lf/bin/python \
        [--n 10000] [--turns 1-3 5-10] [--num_proc 2] [--repeat 2]

Each side prepares the file cold (a fresh cache) in a fresh process: chattune through its training path
(bench/prepare_speed.py's child), LLaMA-Factory through `llamafactory.data.get_dataset` with its `qwen` template,
`preprocessing_num_workers` workers and `overwrite_cache`. CPU seconds are the process's and its workers' (user +
system); each side divides by the tokens it produced. With --repeat, the fastest run is shown.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_speed import measure, write_synthetic  # noqa: E402

LLAMAFACTORY = r'''
import json, os, resource, sys, time
model, data, workdir, num_proc = sys.argv[1:5]
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer

with open(os.path.join(workdir, "dataset_info.json"), "w") as f:
    json.dump({"bench": {"file_name": data, "formatting": "sharegpt", "columns": {"messages": "conversations"}}}, f)
model_args, data_args, training_args, _, _ = get_train_args(dict(
    stage="sft", do_train=True, model_name_or_path=model, dataset="bench", dataset_dir=workdir, template="qwen",
    cutoff_len=4096, output_dir=os.path.join(workdir, "out"), overwrite_cache=True, report_to="none",
    preprocessing_num_workers=int(num_proc), finetuning_type="lora", use_cpu=True))
tokenizer_module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)

def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

start, used = time.perf_counter(), cpu()
dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)["train_dataset"]
tokens = sum(len(ids) for ids in dataset["input_ids"])
print(json.dumps({"seconds": time.perf_counter() - start, "cpu": cpu() - used, "tokens": tokens,
                  "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
'''


def measure_llamafactory(python: str, model: str, data: str, workdir: str, num_proc: int) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(workdir, "hf_datasets"), DISABLE_VERSION_CHECK="1")
    out = subprocess.run([python, "-c", LLAMAFACTORY, model, data, workdir, str(num_proc)], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        sys.exit(f"LLaMA-Factory's preparation failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_name_or_path", required=True, help="a directory with a Qwen2/2.5 tokenizer")
    ap.add_argument("--llamafactory_python", required=True, help="the python of a virtualenv with llamafactory")
    ap.add_argument("--n", type=int, default=10_000, help="conversations of 1-3 turns; other rows get as many tokens")
    ap.add_argument("--turns", nargs="+", default=["1-3", "5-10"])
    ap.add_argument("--num_proc", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for turns in args.turns:
        lo, hi = (int(x) for x in turns.split("-"))
        count = args.n if (lo, hi) == (1, 3) else max(1, int(args.n * 1.75 / ((lo + hi) / 2)))
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "data.jsonl")
            write_synthetic(data, count, (lo, hi))
            for tool in ("chattune", "LLaMA-Factory"):
                runs = []
                for k in range(args.repeat):
                    work = os.path.join(tmp, f"{tool}{k}")
                    os.makedirs(work)
                    runs.append(measure(args.model_name_or_path, data, work, args.num_proc) if tool == "chattune"
                                else measure_llamafactory(args.llamafactory_python, args.model_name_or_path, data,
                                                          work, args.num_proc))
                r = min(runs, key=lambda r: r["cpu"])
                rows.append((f"{count:,}", turns, tool, r["tokens"], r["seconds"], r["cpu"],
                             r["cpu"] / r["tokens"] * 1e6, r["main_mb"], r["worker_mb"]))
    print(f"\n{os.cpu_count()} cores, {args.num_proc} workers, cold, fastest of {args.repeat}")
    head = ("conversations", "turns", "tool", "tokens", "wall s", "CPU s", "CPU s / M tokens", "peak MB main",
            "peak MB worker")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for n, turns, tool, tokens, seconds, cpu, per_m, main_mb, worker_mb in rows:
        print(f"| {n} | {turns} | {tool} | {tokens / 1e6:.2f} M | {seconds:.1f} | {cpu:.1f} | {per_m:.2f} | "
              f"{main_mb:,.0f} | {worker_mb:,.0f} |")


if __name__ == "__main__":
    main()
