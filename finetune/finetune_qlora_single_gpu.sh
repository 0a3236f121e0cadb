#!/usr/bin/env bash
# Q-LoRA (4-bit NF4 base) on one GPU, one plain process. Options: bash finetune/finetune_qlora_single_gpu.sh -h
description="Q-LoRA: LoRA on a 4-bit NF4 base (or a GPTQ int4 base) on one GPU (a plain python process)."
mode=qlora launcher=python
# shellcheck source=finetune/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
launch "$FINETUNE" "${DEFAULTS[@]}" --use_lora True --q_lora True "$@"
