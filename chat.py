#!/usr/bin/env python
"""Chat with a trained model using the same chat template as training.

    python chat.py --model_name_or_path output/qwen-merged                    # interactive
    python chat.py --model_name_or_path output/qwen-lora --prompt "Hi!"      # adapter directory (base from it)
    python chat.py --model_name_or_path BASE --adapter_path output/qwen-lora --input_file prompts.jsonl

Works for base+adapter, merged, full and GPTQ models. Batch mode reads one prompt per line (plain text, or JSONL
with "prompt" or a "messages" history) and writes one JSON line per answer: {"prompt": ..., "response": ...}.
Interactive commands: /reset clears the history, /exit quits.
"""

import argparse
import json
import sys

from chattune.cli import main_guard


def read_prompts(path: str) -> list[list[dict]]:
    from chattune.errors import UserError

    histories = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {number}: not valid JSON ({e})") from None
                if "messages" in record:
                    histories.append(record["messages"])
                elif isinstance(record.get("prompt"), str):
                    histories.append([{"role": "user", "content": record["prompt"]}])
                else:
                    raise UserError(f"{path}: line {number}: expected a \"prompt\" string or a \"messages\" list")
            else:
                histories.append([{"role": "user", "content": line}])
    return histories


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", required=True, help="merged/full/GPTQ model, or an adapter directory")
    ap.add_argument("--adapter_path", default=None, help="adapter to apply on --model_name_or_path")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); no prompt = interactive")
    ap.add_argument("--input_file", default=None, help="prompts: text (one per line) or JSONL")
    ap.add_argument("--output_file", default=None, help="answers as JSONL (default stdout)")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--max_new_tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    from chattune.export.merge import add_trust_remote_code_flag

    add_trust_remote_code_flag(ap)
    args = ap.parse_args(argv)
    with main_guard():
        from chattune.export.chat import Chat

        chat = Chat.load(args.model_name_or_path, args.adapter_path, args.dtype, args.device,
                         trust_remote_code=args.trust_remote_code == "true", max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p)
        histories = [[{"role": "user", "content": p}] for p in args.prompt]
        if args.input_file:
            histories += read_prompts(args.input_file)
        if not histories:
            chat.interactive(args.system)
            return 0
        out = open(args.output_file, "w", encoding="utf-8") if args.output_file else sys.stdout
        for history in histories:
            answer = chat.reply(history, args.system)
            out.write(json.dumps({"prompt": history[-1]["content"], "response": answer}, ensure_ascii=False) + "\n")
            out.flush()
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
