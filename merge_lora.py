#!/usr/bin/env python
"""Fold a LoRA / Q-LoRA adapter into its base model and save a plain Hugging Face model.

    python merge_lora.py --adapter_path output/qwen-lora --output_path output/qwen-merged

The base is the one named in the adapter (or --base_model_name_or_path). A Q-LoRA adapter is merged into the
full-precision base (never into 4-bit weights). The output has safetensors shards, the tokenizer with the training
chat template, the generation config (stop tokens) and chattune.json, and loads with from_pretrained.
"""

import argparse
import sys

from chattune.cli import main_guard


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter_path", required=True, help="directory written by finetune.py --use_lora")
    ap.add_argument("--output_path", required=True, help="where the merged model goes")
    ap.add_argument("--base_model_name_or_path", default=None, help="full-precision base (default: the adapter's)")
    ap.add_argument("--dtype", default="auto", help="auto (the base's) | bfloat16 | float16 | float32")
    ap.add_argument("--max_shard_size", default="5GB")
    from chattune.export.merge import add_trust_remote_code_flag

    add_trust_remote_code_flag(ap)
    args = ap.parse_args(argv)
    with main_guard():
        from chattune.errors import ConfigError
        from chattune.export.merge import (
            base_of,
            check_output_path,
            is_adapter_dir,
            merge_adapter,
            parse_dtype,
            save_model,
        )
        from chattune.staged import staged_dir

        if not is_adapter_dir(args.adapter_path):
            raise ConfigError(f"{args.adapter_path} holds no adapter_config.json: pass the output_dir of a "
                              "finetune.py --use_lora run")
        check_output_path(args.output_path, args.adapter_path)
        model, tokenizer = merge_adapter(args.adapter_path, args.base_model_name_or_path, parse_dtype(args.dtype),
                                         trust_remote_code=args.trust_remote_code == "true")
        with staged_dir(args.output_path) as staging:  # a kill leaves no folder that looks like a model
            copied = save_model(model, tokenizer, staging, source=args.adapter_path,
                                max_shard_size=args.max_shard_size,
                                base=base_of(args.adapter_path, args.base_model_name_or_path))
        print(f"merged model saved to {args.output_path}" + (
            f" (with {len(copied)} tensors of the base that transformers does not load, e.g. {copied[0]})"
            if copied else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
