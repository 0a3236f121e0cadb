#!/usr/bin/env bash
# LoRA on one GPU, one plain process (no launcher, no MPI). Options: bash finetune/finetune_lora_single_gpu.sh -h
description="LoRA adapter training on one GPU (a plain python process)."
mode=lora launcher=python
# shellcheck source=finetune/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
launch "$FINETUNE" "${DEFAULTS[@]}" --use_lora True "$@"
