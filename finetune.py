#!/usr/bin/env python
"""Fine-tune a chat LLM on your conversations: full, LoRA or Q-LoRA; one GPU, many GPUs (DeepSpeed) or nodes.

Accepts Qwen finetune.py's flags with their meaning, plus all of Hugging Face TrainingArguments:

    python finetune.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --data_path data.json \
        --output_dir output --use_lora --bf16 True

See README.md for the wrappers in finetune/ and every flag.
"""

import sys

from chattune.cli import main_guard


def main(argv=None) -> int:
    from chattune.launch import init_from_mpi
    from chattune.train.args import parse_args
    from chattune.train.run import run

    init_from_mpi()  # under mpirun: rank/world size from MPI, before the process group starts
    with main_guard():
        run(*parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
