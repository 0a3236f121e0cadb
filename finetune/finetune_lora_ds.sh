#!/usr/bin/env bash
# LoRA on every GPU of this node (or of all nodes), DeepSpeed ZeRO-2. Options: bash finetune/finetune_lora_ds.sh -h
description="LoRA adapter training, DeepSpeed ZeRO-2, every GPU of every node (torchrun)."
mode=lora launcher=torchrun deepspeed_default=zero2.json
# shellcheck source=finetune/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
launch "$FINETUNE" "${DEFAULTS[@]}" --use_lora True "${DEEPSPEED_FLAGS[@]}" "$@"
