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


def exit_process(code: int) -> None:
    """One process of a multi-process run ends without the interpreter's shutdown: its files are written and the
    process group is gone (finish_distributed), but a gloo rank still sometimes aborted while shutting down
    ("terminate called without an active exception", exit -6, torch 2.13; see pytorch#179291), and torchrun then
    reported a failed run whose result was complete. atexit handlers still run and output is flushed."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
